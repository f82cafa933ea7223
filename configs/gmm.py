"""Distil an exact Gaussian-mixture teacher (the engine's proof ground).

Default: Phased DMD, 4-step 4-phase, on the 8-mode ring in 2-D (about 2 minutes on 2 cores):

  python main.py --config=configs/gmm.py --workdir=/tmp/pdmd_gmm

Variants go after a colon, leaves after --config.:

  python main.py --config=configs/gmm.py:method=dmd2_sgts,steps=4 --workdir=/tmp/sgts
  python main.py --config=configs/gmm.py:method=phased_dmd_sgts,steps=4,phases=2,dim=16 ...
  python main.py --config=configs/gmm.py:runlocal --workdir=/tmp/tiny   # seconds; used by tests
  python main.py --config=configs/gmm.py --config.fake.target=naive ...  # the biased ablation
"""

import ml_collections
from ml_collections import config_dict

from pdmd_jax.config_util import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, method="phased_dmd", steps=4, phases=4, dim=2, runlocal=False, seed=0)
  single_phase = a.method in ("dmd", "dmd_multistep", "dmd2_sgts")
  c = ml_collections.ConfigDict()
  c.seed = a.seed                          # seeds the run's rng (noise, t, SGTS stop, labels)
  c.method = a.method                      # dmd | dmd_multistep | dmd2_sgts | phased_dmd | phased_dmd_sgts
  c.num_steps = 1 if a.method == "dmd" else a.steps   # N sampling steps of the distilled generator
  c.num_phases = 1 if single_phase else (c.num_steps if a.method == "phased_dmd" else a.phases)  # K
  c.shift = 3.0                            # timestep shift of the grid and t-samplers (Qwen: 3, Wan: 5)
  c.grid_times = ()                        # explicit grid 1 > ... > 0 (N+1 values); () = shifted uniform
  c.phase_order = "progressive"            # progressive (the paper) | interleaved (ModelTC's trainer)
  c.schedule = "flow_matching"             # flow_matching | vp_cosine

  c.teacher = ml_collections.ConfigDict()
  c.teacher.type = "gmm"                   # exact Gaussian-mixture teacher
  c.teacher.dataset = "ring" if a.dim == 2 else "random"   # ring (2-D only) | random
  c.teacher.dim = a.dim                    # data dimension D
  c.teacher.num_modes = 8 if a.dim == 2 else 12             # modes M
  c.teacher.num_classes = 2 if a.dim == 2 else 4            # class labels (mode i has class i % C)
  c.teacher.radius = 2.0                   # modes lie at this distance from the origin
  c.teacher.std = 0.15                     # isotropic std tau of every mode
  c.teacher.guidance_scale = 1.0           # CFG scale of the teacher in the DMD loss (1 = exact target)
  c.teacher.seed = 0                       # placement of the random mixture's modes

  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp"                     # network of the experts and fake scores
  c.model.width = 32 if a.runlocal else (64 if a.dim == 2 else 128)
  c.model.depth = 2 if a.runlocal else 3   # residual blocks
  c.model.time_dim = 64                    # sinusoidal embedding of 1000 t

  c.init_fit = ml_collections.ConfigDict()  # regression of the MLP onto the exact teacher velocity
  c.init_fit.steps = 50 if a.runlocal else 3000
  c.init_fit.batch_size = 512
  c.init_fit.lr = 2e-3                     # Adam, cosine decay
  c.init_fit.p_uncond = 0.1                # fraction of null labels (the fit also learns v(x, t, null))

  c.generator = ml_collections.ConfigDict()
  c.generator.lr = 1e-4                    # AdamW of the active expert
  c.generator.b1 = 0.0                     # beta1 = 0 as in the paper
  c.generator.b2 = 0.999
  c.generator.weight_decay = 0.0
  c.generator.grad_clip = 0.0              # global-norm clip; 0 = off
  c.generator.weighting = "exact"          # exact w_{t|s} | dmd_normalized (DMD's per-sample normaliser)
  c.generator.norm_floor = 1e-4            # floor of the dmd_normalized normaliser

  c.fake = ml_collections.ConfigDict()
  c.fake.lr = 1e-4                         # AdamW of the phase's fake score
  c.fake.b1 = 0.0
  c.fake.b2 = 0.999
  c.fake.weight_decay = 0.0
  c.fake.grad_clip = 0.0
  c.fake.target = "eq13"                   # eq13 (clamped, the paper) | eq11 | naive (biased ablation)
  c.fake.clamp_final_phase = False         # apply Eq. 13's min(1, 10 t^2) weight also when s = 0
  c.fake.ttur = 5                          # fake updates per generator update (TTUR)

  c.t_sampler = ml_collections.ConfigDict()  # re-noise t: u ~ U(u_k, u_max), t = shift(u)
  # Lower margin of the re-noise t; a phase's range is (max(t_k, t_min), t_max]. 0.05 (DMD uses
  # 0.02) caps the last phase's weight w_t = (1-t)^2/t at ~18: without it, rare t near 0 turn
  # the fake score's small error into gradient spikes that stall Adam (std ratio 1.59 -> 0.81,
  # see docs/results/gmm_ring.md).
  c.t_sampler.t_min = 0.05
  c.t_sampler.t_max = 1.0
  c.t_sampler.shift = config_dict.placeholder(float)  # shift of the re-noise t; None = the grid's shift
  c.t_sampler.phase1_floor = config_dict.placeholder(float)  # Wan2.2-style floor of phase 1's t
  c.t_sampler.floor_mode = "clamp"         # clamp (the paper) | resample

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64 if a.runlocal else 256
  c.train.num_steps = 8 if a.runlocal else 2000   # generator updates over all phases (split evenly)
  c.train.log_every = 4 if a.runlocal else 50     # steps between metric writes
  c.train.ckpt_every = 4 if a.runlocal else 500   # steps between checkpoints (and at each phase end)
  c.train.max_to_keep = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                         # data-parallel axis size (-1: all remaining devices)
  c.mesh.fsdp = 1                          # parameter-sharding axis size

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 500 if a.runlocal else 10_000   # samples for the metrics table
  c.eval.teacher_substeps = 8 if a.runlocal else 64    # Euler sub-steps per grid interval (teacher reference)
  c.eval.seed = 1234
  return c
