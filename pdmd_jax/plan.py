"""Ahead-of-time plan of one phase step: compile it without weights; report memory, FLOPs, shardings.

  python -m pdmd_jax.plan --config=configs/wan22.py --mesh=data=1,fsdp=64,tensor=1,context=1 \
      --frames=9 --height=240 --width=416

Parameters, optimizer states and batch are ShapeDtypeStructs (``jax.eval_shape``); the step is
``jit(...).lower(abstract args with shardings).compile()`` on simulated CPU devices
(``jax_num_cpu_devices``), so nothing of the model is allocated. The compiled program is
XLA:CPU's, with its SPMD partitioning for the mesh: per-device argument/output/temp bytes come
from ``compiled.memory_analysis()``. FLOPs are counted twice: XLA's ``cost_analysis`` (per
device, but a loop body -- lax.scan over layers, the TTUR fori_loop -- counted once) and the
matmul FLOPs of the jaxpr with every scan multiplied by its length (global; a while loop of
dynamic trip count, the SGTS no-grad steps, counted once).

Two assemblies: ``wan_task_setup`` is the trainer's Wan2.2 step (pdmd_jax/wan_task.py: MoE
teacher, MoE fake pairs, LoRA experts) on abstract A14B weights; ``dit_setup`` (a DiT network
teacher, LoRA experts on its frozen backbone, full-copy fakes, as trainer._network_parts) is
shared with tests/test_sharding_rules.py and the benchmarks. Shardings follow the logical
rules of pdmd_jax/sharding.py; every network call constrains its batch axis and, while
tracing, every transformer block its tokens (``block_constraints``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from pdmd_jax import methods
from pdmd_jax import schedule as S
from pdmd_jax import sharding as sh
from pdmd_jax import teachers
from pdmd_jax import train_step as ts

MODELS = ("wan22_a14b", "wan22_i2v_a14b", "dit_small", "dit_tiny")


# ============================================================================================
# Step assembly
# ============================================================================================

@dataclasses.dataclass
class Setup:
  """A phase step's static config and (concrete or abstract) parameter trees.

  make_y(key, shape): conditioning for ``shape`` = (rows, batch) samples.
  param_axes / expert_axes: logical axes of a fake score / of a generator expert.
  """
  step_cfg: ts.StepConfig
  teacher_params: Any
  init_params: Any
  expert_init: Any
  param_axes: Any
  expert_axes: Any
  teacher_axes: Any
  make_y: Callable
  name: str = ""


def _lora_apply(apply, spec, backbone):
  """An expert: the frozen ``backbone`` with its own LoRA merged in (trainer._lora_apply)."""
  from pdmd_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  backbone = jax.lax.stop_gradient(backbone)
  return lambda lora, x, t, y: apply(lora_lib.merge(spec, backbone, lora), x, t, y)


def _plan(method, num_steps, num_phases, shift):
  return methods.make_plan(method, num_steps, num_phases, shift, t_min=0.02, t_max=0.98)


def _txs(gen_lr, fake_lr):
  return (ts.make_optimizer(gen_lr, 0.0, 0.999, grad_clip=1.0),
          ts.make_optimizer(fake_lr, 0.0, 0.999, grad_clip=1.0))


def perturbed(params, seed: int = 0, scale: float = 0.05):
  """Random non-zero weights everywhere (a fresh DiT outputs exactly 0: adaLN-Zero)."""
  def fn(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])
  return jax.jit(fn)(params)   # one compile, not one per leaf


def dit_setup(dit_cfg, *, method: str = "phased_dmd_sgts", num_steps: int = 4,
              num_phases: int = 2, lora_rank: int = 4, ttur: int = 1, guidance: float = 3.0,
              shift: float = 3.0, weighting: str = "dmd_normalized", gen_lr: float = 1e-3,
              fake_lr: float = 1e-4, seed: int = 0, perturb: float = 0.05,
              abstract: bool = False, wrap: Callable | None = None,
              fake_lora_rank: int = 0) -> Setup:
  """A DiT teacher (random, perturbed), LoRA experts (rank 0: full copies), full fake copies
  (``fake_lora_rank`` > 0: shared backbone, LoRA fakes on the frozen teacher).

  wrap: optional ``apply -> apply`` around every network call (e.g. activation constraints).
  """
  from pdmd_jax import models  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  net, params = models.abstract_dit(dit_cfg)
  if not abstract:
    params = jax.jit(lambda: models.build_dit(dit_cfg, seed)[1])()
    params = perturbed(params, seed, perturb) if perturb else params
  apply = sh.batch_constrained(net.apply if wrap is None else wrap(net.apply))
  axes = models.logical_axes(dit_cfg)
  teacher = teachers.network_teacher(apply, dit_cfg.num_classes, guidance)
  expert_init, expert_apply, expert_axes = None, None, axes
  if lora_rank > 0:
    spec = lora_lib.LoraSpec(((lora_lib.DIT_TARGETS, lora_rank, float(lora_rank)),))
    init = lambda p: lora_lib.init(spec, p, jax.random.PRNGKey(seed + 7))
    expert_init = jax.eval_shape(init, params) if abstract else init(params)
    expert_apply = lambda tp: _lora_apply(apply, spec, tp)
    expert_axes = sh.lora_axes(expert_init, axes)
  fake_init, fake_apply, fake_axes = params, None, axes
  if fake_lora_rank > 0:
    spec_f = lora_lib.LoraSpec(((lora_lib.DIT_TARGETS, fake_lora_rank, float(fake_lora_rank)),))
    init = lambda p: lora_lib.init(spec_f, p, jax.random.PRNGKey(seed + 11))
    fake_init = jax.eval_shape(init, params) if abstract else init(params)
    fake_apply = lambda tp: _lora_apply(apply, spec_f, tp)
    fake_axes = sh.lora_axes(fake_init, axes)
    if expert_init is None:          # full-copy experts stay full copies of the teacher
      expert_init = params
  gen_tx, fake_tx = _txs(gen_lr, fake_lr)
  cfg = ts.StepConfig(plan=_plan(method, num_steps, num_phases, shift), apply=apply,
                      teacher=teacher, sched=S.flow_matching(), sample_shape=dit_cfg.sample_shape,
                      gen_tx=gen_tx, fake_tx=fake_tx, ttur=ttur, weighting=weighting,
                      expert_apply=expert_apply, fake_apply=fake_apply)
  make_y = lambda key, shape: jax.random.randint(key, shape, 0, dit_cfg.num_classes)
  return Setup(cfg, params, fake_init, expert_init, fake_axes, expert_axes, axes, make_y,
               name=f"DiT h{dit_cfg.hidden} d{dit_cfg.depth}")


def wan_task_setup(config, *, num_frames: int | None = None, height: int | None = None,
                   width: int | None = None, num_layers: int | None = None,
                   param_dtype: str | None = None, ttur: int | None = None) -> Setup:
  """The trainer's Wan2.2 A14B step (pdmd_jax/wan_task.py) with abstract full-size weights.

  Exactly what ``wan_task.parts`` assembles -- the MoE teacher (high, low) with CFG against
  the negative prompt, one MoE fake pair per phase, LoRA experts on the expert owning each
  phase -- but with ShapeDtypeStruct parameters of the diffusers A14B architecture instead of
  loaded weights. Keyword arguments override the config (video frames and pixels as in
  ``config.data``; layers to shrink the model; the dtype of every parameter copy).
  """
  import copy  # pylint: disable=import-outside-toplevel
  from pdmd_jax import config_lib  # pylint: disable=import-outside-toplevel
  from pdmd_jax import wan_task  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  t, g, f, d = config.teacher, config.generator, config.fake, config.data
  probe = copy.deepcopy(config)     # validate the plan without weights or embedding files
  probe.teacher.random, probe.data.embeddings = True, ""
  plan = config_lib.validate(probe)
  owners = wan_task.expert_of_phases(plan, t.boundary)
  arch = (wan.WAN22_I2V_A14B if t.task == "i2v" else wan.WAN22_A14B).to_diffusers()
  cfg = wan_task.wan_config(config, arch)
  cfg = dataclasses.replace(cfg, num_layers=num_layers or cfg.num_layers,
                            param_dtype=param_dtype or cfg.param_dtype)
  expert = wan.abstract_params(cfg)
  axes = jax.tree.map(tuple, wan.param_specs(cfg),
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  apply = sh.batch_constrained(wan_task.WanNet(wan_task._graphdef(cfg), d.text_len).apply)  # pylint: disable=protected-access
  teacher = teachers.moe_teacher(apply, apply, t.boundary, t.guidance_scale,
                                 wan_task.negative_cond, guidance_scale_low=t.guidance_scale_low,
                                 route=t.route)
  spec = lora_lib.LoraSpec(((g.lora_targets, g.lora_rank, g.lora_alpha),))
  expert_init = jax.eval_shape(lambda p: lora_lib.init(spec, p, jax.random.PRNGKey(0)), expert)
  frames, h, w = num_frames or d.num_frames, height or d.height, width or d.width
  step_cfg = ts.StepConfig(
      plan=plan, apply=teachers.moe_apply(apply, apply, t.boundary, t.route), teacher=teacher,
      sched=S.get_schedule(config.schedule),
      sample_shape=wan_task.latent_shape(cfg.out_channels, frames, h, w),
      gen_tx=ts.make_optimizer(g.lr, g.b1, g.b2, g.weight_decay, g.grad_clip),
      fake_tx=ts.make_optimizer(f.lr, f.b1, f.b2, f.weight_decay, f.grad_clip),
      ttur=ttur or f.ttur, weighting=g.weighting, fake_target=f.target,
      clamp_final_phase=f.clamp_final_phase, norm_floor=g.norm_floor,
      expert_apply=functools.partial(wan_task._experts_apply, apply, spec, owners))  # pylint: disable=protected-access
  fake_init, fake_axes = (expert, expert), (axes, axes)
  if f.get("lora_rank", 0) > 0:     # shared backbone: a LoRA pair on the frozen teacher experts
    spec_f = lora_lib.LoraSpec(((f.lora_targets, f.lora_rank, f.lora_alpha),))
    one = jax.eval_shape(lambda p: lora_lib.init(spec_f, p, jax.random.PRNGKey(1)), expert)
    fake_init, fake_axes = (one, one), (sh.lora_axes(one, axes),) * 2
    step_cfg = dataclasses.replace(step_cfg, fake_apply=functools.partial(
        wan_task._fakes_apply, apply, spec_f, t.boundary, t.route))  # pylint: disable=protected-access
  cond = cfg.in_channels - cfg.out_channels
  emb_dtype = jnp.dtype(config.model.dtype)

  def make_y(key, shape):
    k1, k2, k3 = jax.random.split(key, 3)
    txt = (*shape, d.text_len, cfg.text_dim)
    y = {"index": jax.random.randint(k1, shape, 0, 1000),
         "context": jax.random.normal(k2, txt, emb_dtype),
         "negative": jnp.zeros(txt, emb_dtype)}
    if cond:
      y["condition"] = jax.random.normal(k3, (*shape,) + wan_task.latent_shape(cond, frames, h, w))
    return y

  return Setup(step_cfg, (expert, expert), fake_init, expert_init, fake_axes,
               sh.lora_axes(expert_init, axes), (axes, axes), make_y,
               name=f"Wan2.2-{t.task.upper()}-A14B" + (f" ({cfg.num_layers} layers)"
                                                         if num_layers else ""))


@contextlib.contextmanager
def block_constraints():
  """Constrains every transformer block's token input and output to (batch, length, -).

  Without per-layer activation constraints GSPMD keeps the FSDP-sharded weights in place and
  splits the matmuls' contracting dimension instead: every device then holds the whole
  batch's activations and all-reduces them (seen in the Wan plan). models/dit.py and
  models/wan.py do not call ``sharding.shard_tokens`` yet, so the planner patches their Block
  while it traces (only inside this context).
  """
  from pdmd_jax.models import dit  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  saved = [(cls, cls.__call__) for cls in (dit.Block, wan.Block)]
  for cls, orig in saved:
    def call(self, h, *args, _orig=orig):
      return sh.shard_tokens(_orig(self, sh.shard_tokens(h), *args))
    cls.__call__ = call
  try:
    yield
  finally:
    for cls, orig in saved:
      cls.__call__ = orig


def initial_state(setup: Setup, seed: int = 0) -> ts.TrainState:
  c = setup.step_cfg
  return ts.create_state(seed, setup.init_params, c.plan.num_phases, c.gen_tx, c.fake_tx,
                         setup.expert_init)


def abstract_state(setup: Setup, seed: int = 0) -> ts.TrainState:
  c = setup.step_cfg
  return jax.eval_shape(
      lambda p, e: ts.create_state(jax.random.PRNGKey(seed), p, c.plan.num_phases, c.gen_tx,
                                   c.fake_tx, e), setup.init_params, setup.expert_init)


def abstract_y(setup: Setup, rows: int, batch_size: int):
  return jax.eval_shape(lambda key: setup.make_y(key, (rows, batch_size)), jax.random.PRNGKey(0))


def shardings(setup: Setup, mesh, batch_size: int, rules=sh.DEFAULT_RULES):
  """(state, teacher, batch) shardings on ``mesh`` from the logical rules."""
  c = setup.step_cfg
  state = sh.train_state_shardings(mesh, abstract_state(setup), (c.gen_tx, c.fake_tx),
                                   setup.param_axes, setup.expert_axes, rules)
  teacher = sh.logical_shardings(mesh, setup.teacher_params, setup.teacher_axes, rules)
  y = abstract_y(setup, c.ttur + 1, batch_size)
  batch = {"y": jax.tree.map(lambda a: sh.batch_sharding(mesh, 1, a.ndim), y)}
  return state, teacher, batch


# ============================================================================================
# FLOPs
# ============================================================================================

def _subjaxprs(value):
  vals = value if isinstance(value, (tuple, list)) else (value,)
  for v in vals:
    if isinstance(v, jax.extend.core.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jax.extend.core.Jaxpr):
      yield v


def jaxpr_matmul_flops(jaxpr) -> tuple[float, int]:
  """(2 * MACs of every dot_general, number of while loops counted once) of a jaxpr.

  lax.scan bodies are multiplied by their length; cond takes its most expensive branch.
  """
  total, whiles = 0.0, 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
      (_, rc), (_, rb) = eqn.params["dimension_numbers"]
      free = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
      total += 2.0 * math.prod(lhs.shape) * math.prod(rhs.shape[d] for d in free)
      continue
    subs = [(f, w) for v in eqn.params.values() for f, w in map(jaxpr_matmul_flops,
                                                                 _subjaxprs(v))]
    if not subs:
      continue
    if name == "cond":
      f, w = max(subs)
    else:
      f, w = sum(s[0] for s in subs), sum(s[1] for s in subs)
    if name == "scan":
      f *= eqn.params["length"]
    whiles += w + (name == "while")
    total += f
  return total, whiles


def matmul_flops(fn, *args) -> tuple[float, int]:
  """Global matmul FLOPs of fn(*args) (args may be abstract); see ``jaxpr_matmul_flops``."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def xla_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", float("nan")))


# ============================================================================================
# Compile and report
# ============================================================================================

def memory(compiled) -> dict[str, int]:
  """Per-device bytes of the compiled program (XLA's memory_analysis)."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def compile_phase_step(setup: Setup, k: int, mesh, batch_size: int, rules=sh.DEFAULT_RULES,
                       count_flops: bool = True) -> dict:
  """Lowers and compiles phase k's step for abstract args on ``mesh``; returns a report."""
  cfg = setup.step_cfg
  state_sh, teacher_sh, batch_sh = shardings(setup, mesh, batch_size, rules)
  state = sh.abstract_with(abstract_state(setup), state_sh)
  teacher = sh.abstract_with(setup.teacher_params, teacher_sh)
  y = abstract_y(setup, cfg.ttur + 1, batch_size)
  batch = sh.abstract_with({"y": y}, batch_sh)
  fn = ts.jit_phase_step(cfg, k, state_sh, teacher_sh, batch_sh)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), block_constraints():   # constraints read the mesh from here
    lowered = fn.lower(state, teacher, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  report = {"lower_s": t1 - t0, "compile_s": t2 - t1, "memory": memory(compiled),
            "xla_flops_per_device": xla_flops(compiled), "compiled": compiled,
            "args": (state, teacher, batch)}
  if count_flops:
    with jax.set_mesh(mesh):
      report["matmul_flops"], report["while_loops"] = matmul_flops(
          functools.partial(ts.phase_step, cfg, k), state, teacher, batch)
  return report


def largest_arrays(tree, n: int = 8) -> list[dict]:
  """The n largest leaves of an abstract tree with shardings: path, shape, dtype, spec, bytes."""
  rows = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    nbytes = math.prod(x.shape) * x.dtype.itemsize
    shard = x.sharding.shard_shape(x.shape)
    rows.append({"path": _short(jax.tree_util.keystr(path)), "shape": tuple(x.shape),
                 "dtype": str(x.dtype), "spec": str(x.sharding.spec), "bytes": nbytes,
                 "shard_bytes": math.prod(shard) * x.dtype.itemsize})
  rows.sort(key=lambda r: -r["bytes"])
  # Stacked experts/fakes repeat the same leaves: keep one row per (path pattern, spec).
  seen, out = set(), []
  for r in rows:
    key = (re.sub(r"\[\d+\]", "[i]", r["path"]), r["spec"])
    if key not in seen:
      seen.add(key)
      out.append(r)
  return out[:n]


def _short(path: str) -> str:
  return path.replace("['", ".").replace("']", "").lstrip(".")


def size(b) -> str:
  return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def format_report(r: dict, mesh, title: str) -> str:
  m = r["memory"]
  lines = [f"## {title}", "",
           f"mesh {dict(mesh.shape)}; lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s", "",
           "| per device | bytes |", "|---|---|"]
  for k in ("argument", "output", "alias", "temp", "peak"):
    lines.append(f"| {k} | {size(m[k])} |")
  lines += ["", f"XLA cost_analysis FLOPs per device (loop bodies once): "
            f"{r['xla_flops_per_device']:.3e}"]
  if "matmul_flops" in r:
    lines.append(f"jaxpr matmul FLOPs, global (scans x length; {r['while_loops']} while loop(s) "
                 f"once): {r['matmul_flops']:.3e} = {r['matmul_flops'] / mesh.size:.3e} per device")
  lines += ["", "| largest arguments | shape | dtype | spec | size | per device |",
            "|---|---|---|---|---|---|"]
  state, teacher, batch = r["args"]
  for a in largest_arrays({"state": state, "teacher": teacher, "batch": batch}):
    lines.append(f"| {a['path']} | {a['shape']} | {a['dtype']} | {a['spec']} | {size(a['bytes'])}"
                 f" | {size(a['shard_bytes'])} |")
  return "\n".join(lines)


# ============================================================================================
# CLI
# ============================================================================================

def _setup_from_flags(f) -> Setup:
  if f.config is None and f.model.startswith("dit_"):
    from pdmd_jax.models import dit  # pylint: disable=import-outside-toplevel
    cfg = dit.config_for(f.model[4:], patch=4, scan_layers=True, remat=True)
    return dit_setup(cfg, abstract=True, method=f.method, num_steps=f.steps,
                     num_phases=f.phases, ttur=f.ttur or 5, lora_rank=f.lora_rank)
  config = load_config(f.config or _WAN_CONFIGS[f.model])
  return wan_task_setup(config, num_frames=f.frames or None, height=f.height or None,
                        width=f.width or None, num_layers=f.layers or None,
                        param_dtype=f.param_dtype or None, ttur=f.ttur or None)


_WAN_CONFIGS = {"wan22_a14b": "configs/wan22.py", "wan22_i2v_a14b": "configs/wan22.py:task=i2v"}


def load_config(spec: str):
  """get_config(arg) of 'path/to/config.py[:arg]' (relative paths from the repository root)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
  mod_spec = importlib.util.spec_from_file_location("plan_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("config", None, "A Wan config (configs/wan22.py[:task=i2v,res=720p]); "
                      "overrides --model.")
  flags.DEFINE_enum("model", "wan22_a14b", MODELS, "Model to plan (without --config).")
  flags.DEFINE_string("mesh", "data=1,fsdp=8", "Mesh sizes, e.g. data=1,fsdp=64,tensor=1,context=1.")
  flags.DEFINE_integer("batch", 0, "Global batch; 0 = one sample per (data x fsdp) shard.")
  flags.DEFINE_integer("frames", 0, "Video frames (0 = the config's; 81 -> 21 latent frames).")
  flags.DEFINE_integer("height", 0, "Video height in pixels (0 = the config's).")
  flags.DEFINE_integer("width", 0, "Video width in pixels (0 = the config's).")
  flags.DEFINE_integer("layers", 0, "Number of transformer layers (0 = the model's).")
  flags.DEFINE_string("param_dtype", "", "dtype of every parameter copy ('' = the config's).")
  flags.DEFINE_integer("ttur", 0, "Fake updates per generator update (0 = the config's).")
  flags.DEFINE_integer("phase", -1, "Phase to compile (-1 = the last: longest frozen prefix).")
  flags.DEFINE_string("method", "phased_dmd_sgts", "DiT only: method (methods.METHODS).")
  flags.DEFINE_integer("steps", 4, "DiT only: sampling steps.")
  flags.DEFINE_integer("phases", 2, "DiT only: phases.")
  flags.DEFINE_integer("lora_rank", 16, "DiT only: LoRA rank of the generator experts.")
  flags.DEFINE_bool("flops", True, "Also count the jaxpr's matmul FLOPs (one more trace).")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  sizes = sh.parse_mesh(f.mesh)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", math.prod(v for v in sizes.values() if v > 0))
  mesh = sh.mesh_from_sizes(sizes)
  setup = _setup_from_flags(f)
  c = setup.step_cfg
  k = f.phase % c.plan.num_phases
  batch = f.batch or mesh.shape["data"] * mesh.shape["fsdp"]
  r = compile_phase_step(setup, k, mesh, batch, count_flops=f.flops)
  title = (f"{setup.name}: {c.plan.method} {c.plan.num_steps} steps {c.plan.num_phases} phases, "
           f"phase {k + 1}; batch {batch}, TTUR {c.ttur}, sample {c.sample_shape}")
  print(format_report(r, mesh, title))
  sys.stdout.flush()


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
