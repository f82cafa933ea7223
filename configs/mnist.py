"""Distil the shipped MNIST DiT teacher (assets/mnist_teacher) into a few-step generator.

Default (the README's main job): Phased DMD, 4-step 2-phase with SGTS inside each phase,
LoRA experts on the frozen teacher, per-phase full fake scores, teacher CFG 3, TTUR 5, AdamW
beta1 = 0. About 8 minutes on 2 CPU cores, install included:

  python main.py --config=configs/mnist.py --workdir=/tmp/pdmd_mnist

Variants (the comparison in docs/results/mnist.md uses the same budget for each):

  python main.py --config=configs/mnist.py:method=phased_dmd,steps=4 ...   # 4-step 4-phase
  python main.py --config=configs/mnist.py:method=dmd2_sgts ...             # DMD2 / SGTS
  python main.py --config=configs/mnist.py:method=dmd ...                   # one-step DMD
  python main.py --config=configs/mnist.py:method=dmd_multistep ...         # vanilla 4-step
  python main.py --config=configs/mnist.py:runlocal ...                     # seconds (tests)
  python main.py --config=configs/mnist.py --config.generator.lora_rank=0 ...  # full-copy experts
  python main.py --config=configs/mnist.py --config.teacher.unconditional=True \
      --config.teacher.guidance_scale=1 ...                                # the null class only
"""

import ml_collections

from pdmd_jax import configs as blocks

# Attention + MLP projections. On a divided video DiT this leaves the temporal branch (qkv_t,
# proj_t) and any all-frames branch (qkv_j, proj_j) frozen at the teacher's: adapting qkv_t /
# proj_t too cost motion in a one-seed probe (docs/results/video.md, Reading).
LORA_TARGETS = r"blocks\.(\d+\.)?(qkv|proj|fc1|fc2)\.kernel"


def get_config(arg=None):
  a = blocks.parse_arg(arg, method="phased_dmd_sgts", steps=4, phases=2, runlocal=False, seed=0)
  c = blocks.method(ml_collections.ConfigDict(), a.method, a.steps, a.phases, shift=3.0,
                    seed=a.seed)   # shift 3 as Qwen-Image: grid 1, .9, .75, .5, 0 for N = 4

  c.teacher = ml_collections.ConfigDict()
  c.teacher.type = "dit"                   # a trained DiT teacher (pdmd_jax/families/dit)
  c.teacher.path = ""                      # "" = the shipped assets/mnist_teacher
  c.teacher.guidance_scale = 3.0           # CFG of the teacher in the DMD gradient (and reference)
  c.teacher.cfg_norm = "none"              # none | sample | token: CFG rescaled to the conditional's norm
  c.teacher.unconditional = False          # True: distil the null class only (guidance_scale 1):
                                           #   diversity as coverage of the digit classes
  c.teacher.arch = ml_collections.ConfigDict()   # {} = trained weights; DiTConfig fields = a
  c.teacher.perturb = 0.05                 #   random DiT (planning, benchmarks), weights + N(0, perturb)

  c.model = ml_collections.ConfigDict()    # the experts/fakes share the teacher's architecture
  c.model.name = "dit"
  c.model.remat = False
  c.model.scan_layers = False
  c.model.attention = "dense"              # dense | blockwise (models/attention.py; long sequences)

  # LoRA experts on the frozen teacher (rank 0 = full copies); the paper: AdamW (0, 0.999).
  c.generator = blocks.lora(blocks.generator(1e-3 if a.runlocal else 3e-4, grad_clip=1.0),
                            rank=16, alpha=16.0, targets=LORA_TARGETS)
  # One fake score per phase: full parameters (the paper); lora_rank > 0 = shared backbone,
  # LoRA fakes on the frozen teacher.
  c.fake = blocks.lora(blocks.fake(1e-4, grad_clip=1.0, ttur=2 if a.runlocal else 5),
                       rank=0, alpha=16.0, targets=LORA_TARGETS)
  c.anchor = blocks.anchor()                      # the ODE anchor term (off)
  c.gan = blocks.gan()                            # DMD2's GAN term with real digits (off)
  c.t_sampler = blocks.t_sampler(0.02, 0.98)      # DMD's margins of the re-noise t
  c.train = blocks.train(8 if a.runlocal else 32, 4 if a.runlocal else 300,
                         log_every=2 if a.runlocal else 20, ckpt_every=4 if a.runlocal else 100)
  c.health = blocks.health(2 if a.runlocal else 50, 2 if a.runlocal else 4)
  c.mesh = blocks.mesh(data=-1, fsdp=1, tensor=1, context=1)
  c.eval = blocks.evaluation(40 if a.runlocal else 500,   # classes in turn: 50 seeds per class
                             2 if a.runlocal else 8)
  return c
