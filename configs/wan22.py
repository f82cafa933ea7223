r"""Phased DMD on Wan2.2 A14B (T2V or I2V): the paper's setting (spec §3.1, §3.7, §4).

4-step 2-phase Phased DMD with SGTS inside each phase, grid 1, .938, .833, .625, 0 (shift 5),
MoE teacher (high-noise expert at t >= 0.875 for T2V, 0.9 for I2V), phase 1 re-noise t clamped
to the boundary (the paper's torch.clamp), generator experts = LoRA (rank 64, alpha 8, lr 5e-5)
on the expert owning each phase (phase 1 -> high noise, phase 2 -> low noise), full-parameter
fake scores (lr 4e-7) started from the teacher at each phase, TTUR 5, AdamW betas (0, 0.999),
global batch 64, 81 frames at 480 x 832 (latent 16 x 21 x 60 x 104), bf16 compute, scanned
and rematerialised blocks.

Inputs (validated before anything compiles; a missing one stops the run with instructions):
  teacher.path     a diffusers Wan2.2 root: model_index.json, transformer/ (high noise) and
                   transformer_2/ (low noise), each config.json + *.safetensors:
                     huggingface-cli download Wan-AI/Wan2.2-T2V-A14B-Diffusers \
                       --local-dir weights/Wan2.2-T2V-A14B-Diffusers \
                       --include 'model_index.json' 'transformer/*' 'transformer_2/*'
  data.embeddings  prompt embeddings (umT5) written once, anywhere with torch:
                     python scripts/write_wan_embeddings.py --prompts prompts.txt \
                       --model Wan-AI/Wan2.2-T2V-A14B-Diffusers --out weights/wan22_prompts.safetensors

Variants (after the colon, comma-separated):
  task=t2v|i2v   T2V-A14B (boundary 0.875) or I2V-A14B (boundary 0.9, 36 input channels;
                 the embeddings file then also holds each prompt's image `condition` latent)
  res=480p|720p  480 x 832 or 720 x 1280, 81 frames
  tiny           the same code path on a random 2-layer Wan (written to a temp dir in the
                 diffusers layout and loaded back) with random stand-in embeddings: CPU, minutes

  python main.py --config=configs/wan22.py:tiny --workdir=/tmp/wan_tiny
  python main.py --config=configs/wan22.py:task=i2v,tiny --workdir=/tmp/wan_tiny_i2v

TPU pod slice (e.g. v5p-64: 32 chips, one process per host; --distributed calls
jax.distributed.initialize(), which finds the slice on its own). Copy the weights and the
embeddings to every host (or a shared disk), then:

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="\
    cd ~/pdmd_jax && python main.py --distributed --config=configs/wan22.py \
      --config.teacher.path=/mnt/disks/wan/Wan2.2-T2V-A14B-Diffusers \
      --config.data.embeddings=/mnt/disks/wan/wan22_prompts.safetensors \
      --workdir=gs://$BUCKET/pdmd/wan22_t2v"

GPU nodes (8 x 80 GB per node; one process per node with all its GPUs, batch 64 must be a
multiple of the device count). Under SLURM jax.distributed.initialize() reads the job; else
set its coordinator through the environment on every node (node rank 0..N-1):

  JAX_COORDINATOR_ADDRESS=$HEAD_NODE:1234 JAX_NUM_PROCESSES=$NNODES JAX_PROCESS_ID=$NODE_RANK \
  python main.py --distributed --config=configs/wan22.py \
    --config.teacher.path=/data/Wan2.2-T2V-A14B-Diffusers \
    --config.data.embeddings=/data/wan22_prompts.safetensors --workdir=/shared/pdmd/wan22_t2v

Memory (bf16 compute; pure FSDP over all devices by default): teacher 2 x 14B with its block
weights in bf16 (58 GB), per phase a fp32 fake pair 2 x 14B + AdamW moments (336 GB), LoRA
experts ~0.3B each: about 0.7 TB plus activations. At 480p x 81 frames, blockwise attention and
--config.mesh.fsdp=16 --config.mesh.context=4 on 64 devices: 55 GiB per device
(docs/scale.md; the paper used 64 GPUs).
"""

import ml_collections
from ml_collections import config_dict

from pdmd_jax import configs as blocks

RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
LORA_TARGETS = (r"blocks\.(\d+\.)?(attn1\.(to_q|to_k|to_v|to_out)|"
                r"attn2\.(to_q|to_k|to_v|to_out)|ffn\.(fc1|fc2))\.kernel")


def get_config(arg=None):
  a = blocks.parse_arg(arg, task="t2v", res="480p", tiny=False, seed=0)
  if a.task not in ("t2v", "i2v"):
    raise ValueError(f"config variant task={a.task!r} is unknown; allowed: ['t2v', 'i2v']")
  if a.res not in RESOLUTIONS:
    raise ValueError(f"config variant res={a.res!r} is unknown; allowed: {sorted(RESOLUTIONS)}")
  boundary = {"t2v": 0.875, "i2v": 0.9}[a.task]
  # 4-step 2-phase with SGTS inside each phase; shift 5 (Wan, following Self-Forcing); the
  # paper's Table 1 grid (x1000: 1000 938 833 625); phase 2 trains after phase 1 is frozen.
  c = blocks.method(ml_collections.ConfigDict(), "phased_dmd_sgts", 4, 2, shift=5.0,
                    seed=a.seed, grid_times=(1.0, 0.938, 0.833, 0.625, 0.0))

  c.teacher = ml_collections.ConfigDict()
  c.teacher.type = "wan22"                 # pdmd_jax/families/wan22
  c.teacher.task = a.task                  # t2v | i2v
  c.teacher.path = f"weights/Wan2.2-{a.task.upper()}-A14B-Diffusers"   # diffusers root
  c.teacher.random = a.tiny                # random tiny experts instead of teacher.path
  c.teacher.seed = 0                       # of the random experts
  c.teacher.boundary = boundary            # high-noise expert at t >= boundary (model_index.json)
  # CFG in the DMD gradient and the reference sampler: not reported by the paper; Wan2.2's
  # own defaults (T2V: 4.0 high / 3.0 low, I2V: 3.5 / 3.5). The fakes are unguided.
  c.teacher.guidance_scale = {"t2v": 4.0, "i2v": 3.5}[a.task]
  c.teacher.guidance_scale_low = config_dict.placeholder(float)   # None: guidance_scale
  c.teacher.guidance_scale_low = {"t2v": 3.0, "i2v": 3.5}[a.task]
  c.teacher.route = "switch"               # switch: one expert when the batch is on one side

  c.model = ml_collections.ConfigDict()    # numerics of every Wan copy (architecture: the files)
  c.model.dtype = "float32" if a.tiny else "bfloat16"   # compute
  c.model.param_dtype = "float32"          # fakes at lr 4e-7 need fp32 weights
  c.model.teacher_dtype = ""               # frozen teacher: "" = model.dtype | float32
  c.model.scan_layers = True
  c.model.remat = "full"                   # none | full | dots
  c.model.attention = "blockwise"          # no [L, L] logits (480p: 32,760 tokens) | dense
  c.model.num_layers = 0                   # 0 = the weights'; fewer only for AOT planning

  # LoRA experts (rank 64, alpha 8, lr 5e-5) on the teacher expert owning each phase; weight
  # decay not reported, clip 1.0 as ModelTC's trainer.
  c.generator = blocks.lora(blocks.generator(5e-5, grad_clip=1.0), rank=8 if a.tiny else 64,
                            alpha=8.0, targets=LORA_TARGETS)
  # Full-parameter fake MoE pair per phase (lr 4e-7); lora_rank > 0: shared backbone, a LoRA
  # pair on the frozen teacher experts (then raise fake.lr, e.g. 5e-5).
  c.fake = blocks.lora(blocks.fake(4e-7, grad_clip=1.0, ttur=2 if a.tiny else 5), rank=0,
                       alpha=8.0, targets=LORA_TARGETS)
  # T(t_k, 1): the paper's re-noise range, DMD's lower margin; phase 1: t = max(t, boundary)
  # (clamp: the paper, a 1/6 point mass at 0.875 | resample).
  c.anchor = blocks.anchor()                      # the ODE anchor term (off)
  c.gan = blocks.gan()                            # DMD2's GAN term (off; DiT families only)
  c.t_sampler = blocks.t_sampler(0.02, 1.0, phase1_floor=boundary)

  c.data = ml_collections.ConfigDict()
  height, width = (64, 64) if a.tiny else RESOLUTIONS[a.res]
  c.data.height = height
  c.data.width = width
  c.data.num_frames = 5 if a.tiny else 81  # latent frames (n - 1) / 4 + 1
  c.data.embeddings = "" if a.tiny else "weights/wan22_prompts.safetensors"   # "" = random
  c.data.text_len = 16 if a.tiny else 512  # umT5 states zero-padded to this (diffusers: 512)
  c.data.random_prompts = 16               # the random stand-in (data.embeddings == "")
  c.data.random_length = 8
  c.data.max_table_gb = 8.0                # the in-memory table sits on every device
  c.data.stream = False                    # True: read each batch's rows from the .safetensors
  c.data.eval_prompts = 64                 #   file instead; evaluation draws from its first rows

  c.train = blocks.train(2 if a.tiny else 64, 2 if a.tiny else 800,   # 800: not reported
                         log_every=1 if a.tiny else 10, ckpt_every=2 if a.tiny else 50)
  c.mesh = blocks.mesh(data=1, fsdp=-1)    # all devices shard parameters and batch
  c.eval = blocks.evaluation(2 if a.tiny else 16,
                             2 if a.tiny else 10,   # 4 x 10 = 40 Euler steps (paper: 40, CFG 4)
                             batch_size=2 if a.tiny else 8,
                             vae_path="",   # diffusers Wan VAE (e.g. <root>/vae) to decode videos
                             decode=0)      # how many samples to decode (needs eval.vae_path)
  return c
