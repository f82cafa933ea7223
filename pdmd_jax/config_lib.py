"""Config validation: every field checked, before anything is built or compiled.

``validate(config)`` raises ValueError naming the field and its allowed values; it returns
the PhasePlan so that callers never build a plan from an unchecked config.
"""

from __future__ import annotations

import numpy as np

from pdmd_jax import losses
from pdmd_jax import methods
from pdmd_jax import schedule as S
from pdmd_jax import teachers
from pdmd_jax.data import gmm as gmm_lib


def _fail(field, value, allowed):
  raise ValueError(f"config.{field}={value!r} is not allowed; allowed: {allowed}")


def _choice(config, field, allowed):
  value = _get(config, field)
  if value not in allowed:
    _fail(field, value, list(allowed))


def _positive(config, field, integer=False, minimum=None):
  """Integer >= minimum (default 1), or number > 0 (or >= minimum when given)."""
  value = _get(config, field)
  number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if integer:
    lo = 1 if minimum is None else minimum
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= lo):
      _fail(field, value, f"an integer >= {lo}")
  elif minimum is None:
    if not (number and value > 0):
      _fail(field, value, "a number > 0")
  elif not (number and value >= minimum):
    _fail(field, value, f"a number >= {minimum}")


def _has(config, field) -> bool:
  node = config
  for part in field.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def _get(config, field):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def validate(config) -> methods.PhasePlan:
  """Checks ``config`` (a ConfigDict from configs/*.py) and returns its PhasePlan."""
  _choice(config, "method", methods.METHODS)
  _choice(config, "phase_order", methods.PHASE_ORDERS)
  _choice(config, "schedule", tuple(S.SCHEDULES))
  _positive(config, "num_steps", integer=True)
  _positive(config, "num_phases", integer=True)
  n, k, m = config.num_steps, config.num_phases, config.method
  if m == "dmd" and (n, k) != (1, 1):
    _fail("num_steps", n, "1 with num_phases=1 for method 'dmd' (one-step DMD)")
  if m in ("dmd_multistep", "dmd2_sgts") and k != 1:
    _fail("num_phases", k, f"1 for method {m!r}")
  if m == "phased_dmd" and k != n:
    _fail("num_phases", k, f"num_steps={n} for 'phased_dmd' (N-step N-phase); use "
          "'phased_dmd_sgts' for K < N")
  if n % k:
    _fail("num_phases", k, f"a divisor of num_steps={n}: {[d for d in range(1, n + 1) if n % d == 0]}")
  _positive(config, "shift")
  grid = tuple(config.grid_times)
  if grid:
    g = np.asarray(grid, dtype=np.float64)
    if g.shape != (n + 1,):
      _fail("grid_times", grid, f"{n + 1} values (num_steps + 1) from 1 down to 0")
    if g[0] != 1.0 or g[-1] != 0.0:
      _fail("grid_times", grid, "a grid starting at 1 and ending at 0")
    inner = g[1:-1]
    if np.any((inner <= 0) | (inner >= 1)):
      _fail("grid_times", grid, "internal boundaries inside the open interval (0, 1)")
    if np.any(np.diff(g) >= 0):
      _fail("grid_times", grid, "strictly decreasing times (1 = t_0 > t_1 > ... > t_N = 0)")

  t = config.teacher
  _choice(config, "teacher.type", teachers.TEACHERS)
  _positive(config, "teacher.guidance_scale", minimum=0.0)
  for f in ("train.batch_size", "train.num_steps", "train.log_every", "train.ckpt_every",
            "train.max_to_keep", "eval.num_samples", "eval.teacher_substeps"):
    _positive(config, f, integer=True)
  if "health" in config:
    _positive(config, "health.every", integer=True, minimum=0)
    _positive(config, "health.seeds", integer=True, minimum=2)
    if not 0.0 <= config.health.min_fraction < 1.0:
      _fail("health.min_fraction", config.health.min_fraction, "a number in [0, 1); 0 = never stop")
  if t.type == "gmm":
    _validate_gmm(config)
  elif t.type == "wan":
    _validate_wan(config)
  else:
    _validate_network(config)
  for f in ("generator.lr", "fake.lr", "generator.b2", "fake.b2"):
    _positive(config, f)
  for f in ("generator.b1", "fake.b1", "generator.weight_decay", "fake.weight_decay",
            "generator.grad_clip", "fake.grad_clip"):
    _positive(config, f, minimum=0.0)
  for f in ("generator.b1", "fake.b1", "generator.b2", "fake.b2"):
    if _get(config, f) >= 1:
      _fail(f, _get(config, f), "a value in [0, 1)")
  _choice(config, "generator.weighting", losses.GENERATOR_WEIGHTINGS)
  _choice(config, "fake.target", losses.FAKE_TARGETS)
  if not isinstance(config.fake.ttur, int) or config.fake.ttur < 1:
    _fail("fake.ttur", config.fake.ttur, "an integer >= 1 (fake updates per generator update)")

  ts = config.t_sampler
  if not 0.0 <= ts.t_min < ts.t_max <= 1.0:
    _fail("t_sampler.t_min", (ts.t_min, ts.t_max), "0 <= t_min < t_max <= 1")
  _choice(config, "t_sampler.floor_mode", S.CLAMP_MODES)
  if ts.shift is not None and not ts.shift > 0:
    _fail("t_sampler.shift", ts.shift, "None (the grid's shift) or a number > 0")
  if ts.phase1_floor is not None and not 0.0 < ts.phase1_floor < ts.t_max:
    _fail("t_sampler.phase1_floor", ts.phase1_floor, f"None or a value in (0, t_max={ts.t_max})")

  if config.train.num_steps % k:
    _fail("train.num_steps", config.train.num_steps, f"a multiple of num_phases={k} (equal budget per phase)")
  unknown = sorted(set(config.mesh.keys()) - {"data", "fsdp", "tensor", "context"})
  if unknown:
    _fail("mesh", dict(config.mesh), "axes among data, fsdp, tensor, context (unknown: "
          f"{unknown})")
  if sum(v == -1 for v in config.mesh.values()) > 1:
    _fail("mesh", dict(config.mesh), "at most one axis size of -1")
  for f in config.mesh.keys():
    if _get(config, f"mesh.{f}") != -1:
      _positive(config, f"mesh.{f}", integer=True)
  if config.teacher.type != "dit" and any(config.mesh.get(a, 1) != 1 for a in ("tensor", "context")):
    _fail("mesh", dict(config.mesh), "tensor = context = 1 for this teacher (tensor and context "
          "parallelism follow the logical axis rules of the DiT teachers)")

  plan = methods.make_plan(m, n, k, config.shift, order=config.phase_order, t_min=ts.t_min,
                           t_max=ts.t_max, phase1_floor=ts.phase1_floor, floor_mode=ts.floor_mode,
                           grid_times=grid or None, renoise_shift=ts.shift)
  for p in plan.phases:
    if p.t_sampler.low >= p.t_sampler.high:
      _fail("t_sampler.t_max", ts.t_max, f"above phase {p.index + 1}'s boundary {p.boundary:.4f}")
  if t.type == "wan":
    from pdmd_jax import wan_task  # pylint: disable=import-outside-toplevel
    wan_task.expert_of_phases(plan, t.boundary)   # each phase's generator on one expert
    _check_wan_files(config)                      # last: every field is fine, files missing?
  return plan


def _validate_gmm(config):
  t = config.teacher
  _choice(config, "teacher.dataset", gmm_lib.DATASETS)
  _positive(config, "teacher.dim", integer=True)
  if t.dataset == "ring" and t.dim != 2:
    _fail("teacher.dim", t.dim, "[2] for dataset 'ring' (use dataset 'random' for other dims)")
  _positive(config, "teacher.num_modes", integer=True)
  _positive(config, "teacher.num_classes", integer=True)
  if t.num_classes > t.num_modes:
    _fail("teacher.num_classes", t.num_classes, f"at most teacher.num_modes={t.num_modes}")
  _positive(config, "teacher.radius")
  _positive(config, "teacher.std")
  _choice(config, "model.name", ("mlp",))
  for f in ("model.width", "model.depth", "model.time_dim", "init_fit.steps", "init_fit.batch_size"):
    _positive(config, f, integer=True)
  if config.model.time_dim % 2:
    _fail("model.time_dim", config.model.time_dim, "an even integer")
  _positive(config, "init_fit.lr")


def _validate_network(config):
  """A trained network teacher (the DiT): LoRA or full-copy experts on it."""
  import os  # pylint: disable=import-outside-toplevel
  t = config.teacher
  if t.path and not os.path.exists(os.path.join(t.path, "card.json")):
    _fail("teacher.path", t.path, "'' (the shipped MNIST teacher) or a directory with card.json "
          "and params.safetensors (train one: python main.py --config=configs/mnist_teacher.py "
          "or --config=configs/video_teacher.py --workdir=DIR; it is written to config.out_dir)")
  _choice(config, "model.name", ("dit",))
  for f in ("model.remat", "model.scan_layers"):
    if not isinstance(_get(config, f), bool):
      _fail(f, _get(config, f), [True, False])
  _validate_lora(config)


def _validate_lora(config):
  """generator.lora_* and (shared-backbone option) fake.lora_*: rank >= 0, alpha > 0, a regex."""
  import re  # pylint: disable=import-outside-toplevel
  for who in ("generator", "fake"):
    if who == "fake" and "lora_rank" not in config.fake:
      continue                 # full fake copies (configs without the shared-backbone option)
    _positive(config, f"{who}.lora_rank", integer=True, minimum=0)
    if _get(config, f"{who}.lora_rank"):
      _positive(config, f"{who}.lora_alpha")
      try:
        re.compile(_get(config, f"{who}.lora_targets"))
      except (re.error, TypeError) as e:
        _fail(f"{who}.lora_targets", _get(config, f"{who}.lora_targets"),
              f"a regular expression ({e})")


def _validate_wan(config):
  """Wan2.2 A14B (or the random tiny Wan): MoE teacher, LoRA experts, latent video shapes."""
  from pdmd_jax import wan_task  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  needed = ("teacher.task", "teacher.path", "teacher.random", "teacher.seed", "teacher.boundary",
            "teacher.guidance_scale_low", "teacher.route", "model.dtype", "model.param_dtype",
            "model.scan_layers", "model.remat", "generator.lora_rank", "generator.lora_alpha",
            "generator.lora_targets", "data.embeddings", "data.num_frames", "data.height",
            "data.width", "data.text_len", "data.random_prompts", "data.random_length",
            "data.max_table_gb", "eval.batch_size")
  missing = [f for f in needed if not _has(config, f)]
  if missing:
    _fail("teacher.type", "wan", f"a config with every field of configs/wan22.py; missing {missing}")
  t, d = config.teacher, config.data
  _choice(config, "teacher.task", wan_task.TASKS)
  _choice(config, "teacher.route", teachers.ROUTES)
  for f in ("teacher.random", "model.scan_layers"):
    if not isinstance(_get(config, f), bool):
      _fail(f, _get(config, f), [True, False])
  if not 0.0 < t.boundary < 1.0:
    _fail("teacher.boundary", t.boundary, "a number in (0, 1) (0.875 T2V-A14B, 0.9 I2V-A14B)")
  if t.guidance_scale_low is not None:
    _positive(config, "teacher.guidance_scale_low", minimum=0.0)
  _positive(config, "teacher.seed", integer=True, minimum=0)
  _choice(config, "model.remat", tuple(wan.REMAT_POLICIES))
  for f in ("model.dtype", "model.param_dtype"):
    _choice(config, f, ("float32", "bfloat16"))
  _validate_lora(config)
  for f in ("data.num_frames", "data.height", "data.width", "data.text_len",
            "data.random_prompts", "data.random_length", "eval.batch_size"):
    _positive(config, f, integer=True)
  _positive(config, "data.max_table_gb")
  st, sh, sw = wan_task.VAE_STRIDE
  if (d.num_frames - 1) % st:
    _fail("data.num_frames", d.num_frames, f"1 + a multiple of {st} (e.g. 81 -> {81 // st + 1} "
          "latent frames)")
  for f in ("data.height", "data.width"):
    if _get(config, f) % (2 * sh):
      _fail(f, _get(config, f), f"a multiple of {2 * sh} (VAE stride {sh} x patch 2)")
  if d.random_length > d.text_len:
    _fail("data.random_length", d.random_length, f"at most data.text_len={d.text_len}")
  if not t.random and not d.embeddings:
    _fail("data.embeddings", d.embeddings, "a prompt-embedding file (scripts/"
          "write_wan_embeddings.py); '' (random stand-in) only with teacher.random=True (:tiny)")


def _check_wan_files(config):
  """Weights under teacher.path and the embeddings file exist (FileNotFoundError otherwise)."""
  import os  # pylint: disable=import-outside-toplevel
  from pdmd_jax import wan_task  # pylint: disable=import-outside-toplevel
  from pdmd_jax.convert import wan as convert  # pylint: disable=import-outside-toplevel
  t, d = config.teacher, config.data
  problems = []
  if not t.random:
    missing = wan_task.missing_weights(t.path)
    if missing:
      problems.append(wan_task.weights_message(t.path, t.task, missing))
    else:
      ratio = convert.boundary_ratio(t.path)
      if ratio is not None and abs(ratio - t.boundary) > 1e-9:
        _fail("teacher.boundary", t.boundary, f"{ratio} (boundary_ratio in {t.path}/"
              "model_index.json)")
  if d.embeddings and not os.path.isfile(d.embeddings):
    problems.append(wan_task.embeddings_message(d.embeddings, t.task))
  if problems:
    raise FileNotFoundError("\n\n".join(problems))
  wan_task.check_inputs(config)   # embeddings vs config.json: shapes only, nothing loaded


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) with a -1 filled in; the batch must divide over data x fsdp."""
  sizes = mesh_sizes(config, num_devices)
  return sizes["data"], sizes["fsdp"]


def mesh_sizes(config, num_devices: int) -> dict[str, int]:
  """{data, fsdp, tensor, context} of config.mesh (missing axes = 1, one -1 filled in)."""
  from pdmd_jax import sharding as sh  # pylint: disable=import-outside-toplevel
  try:
    sizes = sh.mesh_sizes(dict(config.mesh), num_devices)
  except ValueError as e:
    _fail("mesh", dict(config.mesh), f"axis sizes whose product is {num_devices} devices ({e})")
  if any(v == -1 for v in sizes.values()) or np.prod(list(sizes.values())) != num_devices:
    _fail("mesh", dict(config.mesh), f"axis sizes whose product is {num_devices} devices")
  b = sizes["data"] * sizes["fsdp"]
  if config.train.batch_size % b:
    _fail("train.batch_size", config.train.batch_size, f"a multiple of data x fsdp = {b}")
  return sizes
