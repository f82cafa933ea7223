"""Distil the shipped moving-digits video DiT (assets/video_teacher) into a few-step generator.

The paper's main video setting on a problem that runs on a CPU: Phased DMD, 4-step 2-phase with
SGTS inside each phase, LoRA experts on the frozen teacher, per-phase full fake scores, teacher
CFG 3, TTUR 5, AdamW beta1 = 0. Evaluation adds optical flow, dynamic degree and warp error to
the per-frame digit metrics (pdmd_jax/evaluation/video_metrics.py); in-loop health logs motion
against the teacher's.

  python main.py --config=configs/video_teacher.py --workdir=/tmp/vt   # first: the teacher
  python main.py --config=configs/video.py --workdir=/tmp/pdmd_video

The teacher is read from assets/video_teacher (where configs/video_teacher.py writes it); none
ships yet (see configs/video_teacher.py), so train one first or pass ``:teacher=DIR``.

Variants (experiments/video_motion.py runs them on the same budget):

  python main.py --config=configs/video.py:method=phased_dmd,steps=4 ...   # 4-step 4-phase
  python main.py --config=configs/video.py:method=dmd2_sgts ...             # DMD2 / SGTS
  python main.py --config=configs/video.py:runlocal,teacher=/tmp/vt ...     # seconds (tests)
"""

import ml_collections
from ml_collections import config_dict

from pdmd_jax import assets
from pdmd_jax.config_util import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, method="phased_dmd_sgts", steps=4, phases=2, runlocal=False, seed=0,
                teacher="")
  single_phase = a.method in ("dmd", "dmd_multistep", "dmd2_sgts")
  c = ml_collections.ConfigDict()
  c.seed = a.seed                          # seeds the run's rng (noise, t, SGTS stop, labels)
  c.method = a.method                      # dmd | dmd_multistep | dmd2_sgts | phased_dmd | phased_dmd_sgts
  c.num_steps = 1 if a.method == "dmd" else a.steps
  c.num_phases = 1 if single_phase else (c.num_steps if a.method == "phased_dmd" else a.phases)
  c.shift = 3.0                            # grid/t-sampler shift (Qwen-Image uses 3)
  c.grid_times = ()                        # () = shifted uniform grid: 1, .9, .75, .5, 0 for N=4
  c.phase_order = "progressive"
  c.schedule = "flow_matching"

  c.teacher = ml_collections.ConfigDict()
  c.teacher.type = "dit"                   # a trained network teacher
  c.teacher.path = a.teacher or assets.path("video_teacher")
  c.teacher.guidance_scale = 3.0           # CFG of the teacher in the DMD gradient (and reference)

  c.model = ml_collections.ConfigDict()    # the experts/fakes share the teacher's architecture
  c.model.name = "dit"
  c.model.remat = False
  c.model.scan_layers = False

  c.generator = ml_collections.ConfigDict()
  c.generator.lora_rank = 16               # LoRA experts on the frozen teacher; 0 = full copies
  c.generator.lora_alpha = 16.0
  c.generator.lora_targets = r"blocks\.(\d+\.)?(qkv|proj|fc1|fc2)\.kernel"  # attention + MLP
  c.generator.lr = 1e-3 if a.runlocal else 3e-4   # AdamW of the active expert's LoRA
  c.generator.b1 = 0.0                     # the paper: beta1 = 0, beta2 = 0.999
  c.generator.b2 = 0.999
  c.generator.weight_decay = 0.0
  c.generator.grad_clip = 1.0
  c.generator.weighting = "dmd_normalized"  # DMD's per-sample normaliser carried to subintervals
  c.generator.norm_floor = 1e-4

  c.fake = ml_collections.ConfigDict()     # one fake score per phase
  c.fake.lora_rank = 0                     # 0 = full-parameter fakes (the paper); > 0 = shared
  c.fake.lora_alpha = 16.0                 #   backbone: LoRA fakes on the frozen teacher
  c.fake.lora_targets = c.generator.lora_targets
  c.fake.lr = 1e-4
  c.fake.b1 = 0.0
  c.fake.b2 = 0.999
  c.fake.weight_decay = 0.0
  c.fake.grad_clip = 1.0
  c.fake.target = "eq13"                   # eq13 (the paper) | eq11 | naive
  c.fake.clamp_final_phase = False
  c.fake.ttur = 2 if a.runlocal else 5     # fake updates per generator update

  c.t_sampler = ml_collections.ConfigDict()
  c.t_sampler.t_min = 0.02                 # DMD's lower margin of the re-noise t
  c.t_sampler.t_max = 0.98                 # DMD's upper margin
  c.t_sampler.shift = config_dict.placeholder(float)   # None = the grid's shift
  c.t_sampler.phase1_floor = config_dict.placeholder(float)
  c.t_sampler.floor_mode = "clamp"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8 if a.runlocal else 16
  c.train.num_steps = 4 if a.runlocal else 200    # generator updates over all phases
  c.train.log_every = 2 if a.runlocal else 20
  c.train.ckpt_every = 4 if a.runlocal else 100
  c.train.max_to_keep = 2

  c.health = ml_collections.ConfigDict()   # in-loop health (pdmd_jax/health.py)
  c.health.every = 2 if a.runlocal else 50  # generator updates between checks; 0 = off
  c.health.seeds = 2 if a.runlocal else 3   # noises per class
  c.health.min_fraction = 0.0               # stop early below this fraction of the teacher's
                                            # diversity or motion

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                         # batch-only axis (-1: all remaining devices)
  c.mesh.fsdp = 1                          # batch + parameters
  c.mesh.tensor = 1                        # attention heads and MLP width (logical axis rules)
  c.mesh.context = 1                       # parameters like fsdp (tokens in pdmd_jax.plan)

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 20 if a.runlocal else 300  # classes in turn: 30 seeds per class
  c.eval.teacher_substeps = 2 if a.runlocal else 8  # reference: 8 Euler steps per grid interval
  c.eval.seed = 1234
  return c
