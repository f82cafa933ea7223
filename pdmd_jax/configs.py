"""Helpers for configs/*.py: variants after the colon, the blocks every config shares, loading.

Config files are loaded by path (``--config=configs/<name>.py[:arg]``), so the blocks they
share live here rather than in a sibling module of configs/. Every block returns a
ConfigDict whose keys the config file may then override; each key's meaning is commented
once, here.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINGLE_PHASE_METHODS = ("dmd", "dmd_multistep", "dmd2_sgts")


def parse_arg(arg, **defaults):
  """'a=1,b=x,runlocal' -> ConfigDict over ``defaults`` (big_vision style); bare names are True."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config variant {key!r} is unknown; allowed: {sorted(defaults)}")
    if not value:
      out[key] = True
    else:
      out[key] = type(defaults[key])(value) if not isinstance(defaults[key], bool) else value in ("1", "true", "True")
  return out


def load(spec: str):
  """get_config(arg) of 'path/to/config.py[:arg]' (a relative path is tried from the working
  directory, then from the repository root)."""
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(ROOT, path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {spec.partition(':')[0]!r} not found (nor under {ROOT})")
  name = "pdmd_config_" + os.path.splitext(os.path.basename(path))[0]
  mod_spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


# ============================================================================================
# Shared blocks
# ============================================================================================

def set_leaf(config, key: str, value) -> None:
  """Sets the dotted field ``key`` (e.g. "generator.lr") of a ConfigDict to ``value``."""
  node = config
  *path, leaf = key.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value


def method(c, name: str, steps: int, phases: int, *, shift: float, seed: int = 0,
           grid_times=(), steps_per_phase=()):
  """The method and its phase plan (README "Methods as phase plans") on ``c``."""
  c.seed = seed                            # seeds the run's rng (noise, t, SGTS stop, labels)
  c.method = name                          # dmd | dmd_multistep | dmd2_sgts | phased_dmd
                                           #   | phased_dmd_sgts | phased_dmd_multistep
  c.num_steps = 1 if name == "dmd" else steps   # N sampling steps of the distilled generator
  c.num_phases = (1 if name in SINGLE_PHASE_METHODS else
                  (c.num_steps if name == "phased_dmd" else phases))   # K
  c.shift = shift                          # timestep shift of the grid and t-samplers
  c.grid_times = tuple(grid_times)         # explicit grid 1 > ... > 0 (N+1 values); () = shifted uniform
  c.steps_per_phase = tuple(steps_per_phase)   # grid steps per phase (K values, sum N); () = N/K
  c.phase_order = "progressive"            # progressive (the paper) | interleaved (ModelTC's trainer)
  c.schedule = "flow_matching"             # flow_matching | vp_cosine
  return c


def optimizer(lr: float, *, grad_clip: float = 0.0, weight_decay: float = 0.0,
              **extra) -> ml_collections.ConfigDict:
  """AdamW of a trained part (generator experts or fake scores) plus that part's options."""
  c = ml_collections.ConfigDict()
  c.lr = lr
  c.b1 = 0.0                               # beta1 = 0 as in the paper
  c.b2 = 0.999
  c.weight_decay = weight_decay
  c.grad_clip = grad_clip                  # global-norm clip; 0 = off
  for k, v in extra.items():
    c[k] = v
  return c


def generator(lr: float, *, weighting: str = "dmd_normalized", **kw):
  """The generator experts' optimizer and DMD-gradient options."""
  return optimizer(lr, weighting=weighting,   # exact w_{t|s} | dmd_normalized (DMD's normaliser)
                   norm_floor=1e-4,           # floor of the dmd_normalized normaliser
                   # sample_sum: surrogate summed over a sample's elements, mean over the batch
                   # (gradient g / B); element_mean: mean over every element as DMD2, LightX2V
                   # and Self-Forcing (g / (B D)): grad_clip is in those units then.
                   loss_reduction="sample_sum",
                   # EMA of each expert (DMD2, FastGen): decay 0 = off; the average follows the
                   # weights for an expert's first ema_start updates. Samplers use it (eval.ema).
                   ema_decay=0.0, ema_start=0, **kw)


def fake(lr: float, *, ttur: int = 5, **kw):
  """The fake scores' optimizer and objective (Eq. 11/13)."""
  return optimizer(lr, target="eq13",         # eq13 (clamped, the paper) | eq11 | naive (biased)
                   clamp_final_phase=False,   # Eq. 13's min(1, 10 t^2) weight also when s = 0
                   # IDA (SenseFlow, in LightX2V): after each generator update fake <- lam fake
                   # + (1 - lam) expert (LoRA experts merged); 1.0 = off, the recipes use 0.97.
                   ida_lambda=1.0,
                   ttur=ttur, **kw)           # fake updates per generator update (TTUR)


def anchor(weight: float = 0.0, *, teacher_steps: int = 16):
  """The ODE anchor (DMD's regression loss, LightX2V's phased "diversity" term): the update of
  phase ``phase`` always stops at ``step`` and pulls that step's jump to the boundary toward
  the teacher's ODE solution from the same input (phase 0, step 0: the same noise)."""
  c = ml_collections.ConfigDict()
  c.weight = weight                        # 0 = off; relative to the DMD term, same reduction
  c.teacher_steps = teacher_steps          # teacher Euler steps (uniform in unshifted u)
  c.phase = 0                              # the phase it applies to (0 = the first)
  c.step = 0                               # its step within that phase (the fixed stop step)
  c.distance = "mse"                       # mse | features (the family's map, e.g. digit classifier)
  return c


def gan(*, gen_weight: float = 3e-3, disc_weight: float = 1e-2):
  """DMD2's GAN term: a discriminator head on a score network's middle-block tokens, trained
  against real data re-noised at the phase's t (the only term that reads data)."""
  c = ml_collections.ConfigDict()
  c.enabled = False                        # off: the paper's data-free recipe
  c.gen_weight = gen_weight                # softplus(-D(G)) in the generator loss (DMD2 ImageNet
                                           #   3e-3, SDXL 5e-3); in element-mean DMD-loss units
  c.disc_weight = disc_weight              # the discriminator loss in the fake's loss (DMD2 1e-2)
  c.source = "fake"                        # fake (DMD2; also trains the fake) | teacher (FastGen)
  c.layer = -1                             # tokens after this block; -1 = the middle (depth // 2)
  c.width = 0                              # head channels; 0 = the tokens' width
  c.data_source = ""                       # real data: "" = the teacher's own training data (its
  c.tfds_dir = ""                          #   card); "tfds:NAME" = a prepared tfds dataset here
  return c


def lora(c, *, rank: int, alpha: float, targets: str):
  """LoRA fields on a generator/fake block: rank 0 = full-parameter copies."""
  c.lora_rank = rank
  c.lora_alpha = alpha
  c.lora_targets = targets                 # regex over '.'-joined kernel paths
  return c


def t_sampler(t_min: float, t_max: float, *, phase1_floor=None):
  """Re-noise t of phase k: u ~ U(u_k, u_max), t = shift(u), within (max(t_k, t_min), t_max]."""
  c = ml_collections.ConfigDict()
  c.t_min = t_min
  c.t_max = t_max
  c.shift = config_dict.placeholder(float)          # None = the grid's shift
  c.phase1_floor = (config_dict.placeholder(float) if phase1_floor is None
                    else phase1_floor)              # Wan2.2-style floor of phase 1's t
  c.floor_mode = "clamp"                            # clamp (the paper) | resample
  return c


def train(batch_size: int, num_steps: int, *, log_every: int, ckpt_every: int,
          max_to_keep: int = 2):
  c = ml_collections.ConfigDict()
  c.batch_size = batch_size                # global batch
  c.num_steps = num_steps                  # generator updates over all phases
  c.phase_steps = ()                       # progressive: updates of each phase (sum num_steps); () = even
  c.log_every = log_every                  # steps between metric writes
  c.ckpt_every = ckpt_every                # steps between checkpoints (and at each phase end)
  c.max_to_keep = max_to_keep
  # Progressive order: a phase's fake score is dropped when its phase ends (the next phase's
  # fake starts from the teacher); True also writes it to checkpoints_frozen/ for analysis.
  c.keep_finished_fakes = False
  # Memory of one device (GiB) for the fit check before compiling (state + teacher, dense
  # attention logits); 0: the device's own limit (GPU/TPU memory_stats; no check on CPU).
  c.device_memory_gib = 0.0
  return c


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, context: int = 1):
  """Device mesh sizes (one may be -1: all remaining devices); see pdmd_jax/sharding.py."""
  c = ml_collections.ConfigDict()
  c.data = data                            # batch only
  c.fsdp = fsdp                            # batch and parameters
  c.tensor = tensor                        # attention heads and MLP width
  c.context = context                      # tokens of activations, parameters like fsdp
  return c


def health(every: int, seeds: int, min_fraction: float = 0.0):
  """In-loop health (pdmd_jax/health.py)."""
  c = ml_collections.ConfigDict()
  c.every = every                          # generator updates between checks; 0 = off
  c.seeds = seeds                          # noises per class
  c.min_fraction = min_fraction            # stop early below this fraction of the teacher's diversity
  return c


def evaluation(num_samples: int, teacher_substeps: int, seed: int = 1234, **extra):
  c = ml_collections.ConfigDict()
  c.num_samples = num_samples              # samples of the metrics table
  c.teacher_substeps = teacher_substeps    # Euler sub-steps per grid interval (teacher reference)
  c.seed = seed
  c.ema = True                             # sample with the experts' EMA when generator.ema_decay > 0
  c.every_phase = True                     # main.py: also evaluate when each progressive phase ends
  for k, v in extra.items():
    c[k] = v
  return c
