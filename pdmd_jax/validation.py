"""Config validation: every field checked, before anything is built or compiled.

``validate(config)`` checks the fields every run has (method, plan, optimisers, t-sampler,
train, mesh), then hands the config and its plan to the family's own ``validate``
(``pdmd_jax/families/<teacher.type>``). It raises ValueError naming the field and its
allowed values (FileNotFoundError for missing weights or data) and returns the PhasePlan, so
callers never build a plan from an unchecked config. ``fail``, ``choice``, ``positive`` are
the checks families use.
"""

from __future__ import annotations

import numpy as np

from pdmd_jax import families
from pdmd_jax import losses
from pdmd_jax import methods
from pdmd_jax import schedule as S
from pdmd_jax.data import tfds_data


def fail(field, value, allowed):
  raise ValueError(f"config.{field}={value!r} is not allowed; allowed: {allowed}")


def choice(config, field, allowed):
  value = get(config, field)
  if value not in allowed:
    fail(field, value, list(allowed))


def positive(config, field, integer=False, minimum=None):
  """Integer >= minimum (default 1), or number > 0 (or >= minimum when given)."""
  value = get(config, field)
  number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if integer:
    lo = 1 if minimum is None else minimum
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= lo):
      fail(field, value, f"an integer >= {lo}")
  elif minimum is None:
    if not (number and value > 0):
      fail(field, value, "a number > 0")
  elif not (number and value >= minimum):
    fail(field, value, f"a number >= {minimum}")


def has(config, field) -> bool:
  node = config
  for part in field.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def get(config, field):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def validate(config, *, files: bool = True) -> methods.PhasePlan:
  """Checks ``config`` (a ConfigDict from configs/*.py) and returns its PhasePlan.

  files: also check that the family's weight and data files exist (False: AOT planning).
  """
  choice(config, "method", methods.METHODS)
  choice(config, "phase_order", methods.PHASE_ORDERS)
  choice(config, "schedule", tuple(S.SCHEDULES))
  positive(config, "num_steps", integer=True)
  positive(config, "num_phases", integer=True)
  n, k, m = config.num_steps, config.num_phases, config.method
  if m == "dmd" and (n, k) != (1, 1):
    fail("num_steps", n, "1 with num_phases=1 for method 'dmd' (one-step DMD)")
  if m in ("dmd_multistep", "dmd2_sgts") and k != 1:
    fail("num_phases", k, f"1 for method {m!r}")
  if m == "phased_dmd" and k != n:
    fail("num_phases", k, f"num_steps={n} for 'phased_dmd' (N-step N-phase); use "
          "'phased_dmd_sgts' or 'phased_dmd_multistep' for K < N")
  sizes = tuple(config.get("steps_per_phase", ()))
  if sizes:
    if (len(sizes) != k or sum(sizes) != n
        or not all(isinstance(v, int) and v >= 1 for v in sizes)):
      fail("steps_per_phase", sizes, f"() (N/K each) or num_phases={k} integers >= 1 summing to "
           f"num_steps={n}")
  elif n % k:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    fail("num_phases", k, f"a divisor of num_steps={n}: {divisors} (or set steps_per_phase)")
  positive(config, "shift")
  grid = tuple(config.grid_times)
  if grid:
    g = np.asarray(grid, dtype=np.float64)
    if g.shape != (n + 1,):
      fail("grid_times", grid, f"{n + 1} values (num_steps + 1) from 1 down to 0")
    if g[0] != 1.0 or g[-1] != 0.0:
      fail("grid_times", grid, "a grid starting at 1 and ending at 0")
    inner = g[1:-1]
    if np.any((inner <= 0) | (inner >= 1)):
      fail("grid_times", grid, "internal boundaries inside the open interval (0, 1)")
    if np.any(np.diff(g) >= 0):
      fail("grid_times", grid, "strictly decreasing times (1 = t_0 > t_1 > ... > t_N = 0)")

  family = families.get(config.teacher.type)    # raises naming the allowed types
  positive(config, "teacher.guidance_scale", minimum=0.0)
  for f in ("train.batch_size", "train.num_steps", "train.log_every", "train.ckpt_every",
            "train.max_to_keep", "eval.num_samples", "eval.teacher_substeps"):
    positive(config, f, integer=True)
  if has(config, "train.device_memory_gib"):
    positive(config, "train.device_memory_gib", minimum=0.0)
  if "health" in config:
    positive(config, "health.every", integer=True, minimum=0)
    positive(config, "health.seeds", integer=True, minimum=2)
    if not 0.0 <= config.health.min_fraction < 1.0:
      fail("health.min_fraction", config.health.min_fraction, "a number in [0, 1); 0 = never stop")
  for f in ("generator.lr", "fake.lr", "generator.b2", "fake.b2"):
    positive(config, f)
  for f in ("generator.b1", "fake.b1", "generator.weight_decay", "fake.weight_decay",
            "generator.grad_clip", "fake.grad_clip"):
    positive(config, f, minimum=0.0)
  for f in ("generator.b1", "fake.b1", "generator.b2", "fake.b2"):
    if get(config, f) >= 1:
      fail(f, get(config, f), "a value in [0, 1)")
  choice(config, "generator.weighting", losses.GENERATOR_WEIGHTINGS)
  if has(config, "generator.loss_reduction"):
    choice(config, "generator.loss_reduction", losses.LOSS_REDUCTIONS)
  if has(config, "generator.ema_decay"):
    if not 0.0 <= config.generator.ema_decay < 1.0:
      fail("generator.ema_decay", config.generator.ema_decay, "0 (off) or a value in (0, 1)")
    positive(config, "generator.ema_start", integer=True, minimum=0)
  choice(config, "fake.target", losses.FAKE_TARGETS)
  if has(config, "fake.ida_lambda"):
    lam = config.fake.ida_lambda
    if not (isinstance(lam, (int, float)) and 0.0 < lam <= 1.0):
      fail("fake.ida_lambda", lam, "a number in (0, 1]; 1 = off (the recipes: 0.97)")
    if lam < 1.0 and config.fake.get("lora_rank", 0) > 0:
      fail("fake.ida_lambda", lam, "1.0 with LoRA fakes (fake.lora_rank > 0): lam A_f B_f + "
           "(1 - lam) A_g B_g has rank up to 2r and is no LoRA of rank r; use full fakes")
  if "anchor" in config:
    positive(config, "anchor.weight", minimum=0.0)
    positive(config, "anchor.teacher_steps", integer=True)
    choice(config, "anchor.distance", losses.ANCHOR_DISTANCES)
  if not isinstance(config.fake.ttur, int) or config.fake.ttur < 1:
    fail("fake.ttur", config.fake.ttur, "an integer >= 1 (fake updates per generator update)")

  ts = config.t_sampler
  if not 0.0 <= ts.t_min < ts.t_max <= 1.0:
    fail("t_sampler.t_min", (ts.t_min, ts.t_max), "0 <= t_min < t_max <= 1")
  choice(config, "t_sampler.floor_mode", S.CLAMP_MODES)
  if ts.shift is not None and not ts.shift > 0:
    fail("t_sampler.shift", ts.shift, "None (the grid's shift) or a number > 0")
  if ts.phase1_floor is not None and not 0.0 < ts.phase1_floor < ts.t_max:
    fail("t_sampler.phase1_floor", ts.phase1_floor, f"None or a value in (0, t_max={ts.t_max})")

  budget = tuple(config.train.get("phase_steps", ()))
  if budget:
    if config.phase_order != "progressive":
      fail("train.phase_steps", budget, "() with phase_order='interleaved' (phases alternate "
           "per update)")
    if (len(budget) != k or not all(isinstance(b, int) and b >= 1 for b in budget)
        or sum(budget) != config.train.num_steps):
      fail("train.phase_steps", budget, f"() (an even split) or {k} integers >= 1, one per "
           f"phase, summing to train.num_steps={config.train.num_steps}")
  elif config.train.num_steps % k:
    fail("train.num_steps", config.train.num_steps, f"a multiple of num_phases={k} (an even "
         "split; or set train.phase_steps)")
  unknown = sorted(set(config.mesh.keys()) - {"data", "fsdp", "tensor", "context"})
  if unknown:
    fail("mesh", dict(config.mesh), "axes among data, fsdp, tensor, context (unknown: "
          f"{unknown})")
  if sum(v == -1 for v in config.mesh.values()) > 1:
    fail("mesh", dict(config.mesh), "at most one axis size of -1")
  for f in config.mesh.keys():
    if get(config, f"mesh.{f}") != -1:
      positive(config, f"mesh.{f}", integer=True)

  plan = methods.make_plan(m, n, k, config.shift, order=config.phase_order, t_min=ts.t_min,
                           t_max=ts.t_max, phase1_floor=ts.phase1_floor, floor_mode=ts.floor_mode,
                           grid_times=grid or None, renoise_shift=ts.shift,
                           steps_per_phase=sizes or None)
  for p in plan.phases:
    if p.t_sampler.low >= p.t_sampler.high:
      fail("t_sampler.t_max", ts.t_max, f"above phase {p.index + 1}'s boundary {p.boundary:.4f}")
  if "anchor" in config and config.anchor.weight > 0:
    a = config.anchor
    choice(config, "anchor.phase", tuple(range(k)))
    phase = plan.phases[a.phase]
    choice(config, "anchor.step", tuple(range(phase.num_steps)))
    if phase.grad_mode == "full" and phase.num_steps > 1:
      fail("method", m, "a method with one step per phase or SGTS inside phases with "
           "anchor.weight > 0 (the anchor fixes the phase's gradient step; every step of "
           "'dmd_multistep' has one)")
    if a.distance == "features":
      # A family offering a feature map of clean samples says so with has_features(config).
      if not getattr(family, "has_features", lambda _: False)(config):
        fail("anchor.distance", a.distance, "'mse' (this teacher family has no feature map)")
      if phase.boundary != 0.0:
        fail("anchor.distance", a.distance, f"'mse' for phase {a.phase} (features are of clean "
             "samples: the anchored phase must end at t = 0)")
  if "gan" in config:
    g = config.gan
    if not isinstance(g.enabled, bool):
      fail("gan.enabled", g.enabled, [True, False])
    positive(config, "gan.gen_weight", minimum=0.0)
    positive(config, "gan.disc_weight")
    choice(config, "gan.source", losses.GAN_SOURCES)
    positive(config, "gan.layer", integer=True, minimum=-1)
    positive(config, "gan.width", integer=True, minimum=0)
    real = g.get("data_source", "")
    if real and not tfds_data.is_tfds(real):
      fail("gan.data_source", real, "'' (the teacher's training data) or 'tfds:NAME'")
    if g.enabled and real and files:
      tfds_data.check(real, g.tfds_dir, "train", fields=("config.gan.data_source",
                                                          "config.gan.tfds_dir", "split"))
    # A family with a token grid and real data says so with has_gan(config).
    if g.enabled and not getattr(family, "has_gan", lambda _: False)(config):
      fail("gan.enabled", True, "False for this teacher family (the GAN term needs its "
           "tokens on a grid and real data: the trained DiT teachers of digits and clips, "
           "unscanned)")
  family.validate(config, plan, files=files)   # last: the family's fields, then its files
  return plan


def mesh_sizes(config, num_devices: int) -> dict[str, int]:
  """{data, fsdp, tensor, context} of config.mesh (missing axes = 1, one -1 filled in)."""
  import jax  # pylint: disable=import-outside-toplevel
  from pdmd_jax import sharding as sh  # pylint: disable=import-outside-toplevel
  devices = f"{num_devices} devices"
  if jax.process_count() > 1 and num_devices == jax.device_count():
    devices += f" ({jax.process_count()} processes x {jax.local_device_count()})"
  try:
    sizes = sh.mesh_sizes(dict(config.mesh), num_devices)
  except ValueError as e:
    fail("mesh", dict(config.mesh), f"axis sizes whose product is {devices} ({e})")
  if any(v == -1 for v in sizes.values()) or np.prod(list(sizes.values())) != num_devices:
    fail("mesh", dict(config.mesh), f"axis sizes whose product is {devices}")
  b = sizes["data"] * sizes["fsdp"]
  if config.train.batch_size % b:
    fail("train.batch_size", config.train.batch_size, f"a multiple of data x fsdp = {b}")
  return sizes
