"""One assembly of a run: (plan, family, config, mesh) -> step config, shardings, phase steps.

The trainer and the AOT planner (``pdmd_jax.aot``) both call ``build``/``assemble`` and lower
through ``Assembly.lower``: the planner compiles the trainer's own program (same function,
same in/out shardings, same donation), from ShapeDtypeStructs instead of arrays.

Shardings: trees with logical axes (the DiT and Wan families) follow the rules of
``sharding.py`` on the (data, fsdp, tensor, context) mesh; unannotated trees (the mixture's
MLPs) the rule-free FSDP tactic. Optimizer moments follow their parameters. Activations are
constrained inside the models (batch over (data, fsdp), tokens over context), which read the
mesh that ``lower`` sets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import jax
import numpy as np
import optax

from pdmd_jax import families
from pdmd_jax import methods
from pdmd_jax import sampling
from pdmd_jax import schedule as S
from pdmd_jax import sharding as sh
from pdmd_jax import train_step as ts
from pdmd_jax import validation


def optimizer(block) -> optax.GradientTransformation:
  """AdamW of a config block (config.generator or config.fake), after global-norm clipping."""
  return ts.make_optimizer(block.lr, block.b1, block.b2, block.weight_decay, block.grad_clip)


@dataclasses.dataclass(frozen=True, eq=False)
class Assembly:
  """Everything static about a run's steps; ``family`` holds the teacher and initial trees."""
  config: Any
  plan: methods.PhasePlan
  family: families.Family
  mesh: jax.sharding.Mesh
  step_cfg: ts.StepConfig
  layouts: tuple[ts.Layout, ...]    # the state's layout while phase k trains
  state_shardings: tuple[Any, ...]  # the state's shardings while phase k trains
  teacher_sharding: Any
  batch_sharding: Any
  rng: jax.Array                   # the run's base key (train_step: fold_in(rng, step))
  data_key: jax.Array              # conditioning of update ``step``: fold_in(data_key, step)
  abstract_state_trees: tuple[Any, ...]  # ShapeDtypeStructs of the state (per phase) and of
  abstract_y: Any                        #   the conditioning, computed once by ``assemble``
  # Data read on the host: a grain MapDataset whose element i is update i's {"real": the GAN
  # term's real rows {"x": [ttur, B, ...], "y": [ttur, B]}, "y": the streamed conditioning
  # (data.stream; this process's columns of [ttur + 1, B, ...])}, the parts the run has; a
  # function of (seed, i), so the update index is the data position and resuming reads the
  # same data. None: the batch is computed on the devices (data-free).
  host_data: Any = None

  @property
  def batch_shape(self) -> tuple[int, int]:
    """(rows, batch): row i conditions fake update i, the last row the generator update."""
    return (self.config.fake.ttur + 1, self.config.train.batch_size)

  @functools.cached_property
  def phase_starts(self) -> tuple[int, ...]:
    """Progressive order: the first update of each phase, then train.num_steps (K + 1 values);
    train.phase_steps sets each phase's budget, () an equal split."""
    total, n = self.config.train.num_steps, self.plan.num_phases
    budget = tuple(self.config.train.get("phase_steps", ())) or (total // n,) * n
    return tuple(int(s) for s in np.cumsum((0,) + budget))

  def phase_of(self, step: int) -> int:
    """The phase that generator update ``step`` trains (steps past the end: the last phase)."""
    n = self.plan.num_phases
    if self.plan.order == "interleaved":
      return step % n
    return min(int(np.searchsorted(self.phase_starts, step, side="right")) - 1, n - 1)

  def layout_phase(self, step: int) -> int:
    """The phase whose layout the state has after ``step`` updates (the one update ``step`` trains)."""
    return self.phase_of(min(step, self.config.train.num_steps - 1))

  def abstract_state(self, k: int = 0) -> ts.TrainState:
    return sh.abstract_with(self.abstract_state_trees[k], self.state_shardings[k])

  def initial_state(self, k: int = 0) -> ts.TrainState:
    """The state in phase k's layout with every tree at its start (k = 0: a run's start)."""
    make = lambda p, e: ts.create_state(self.rng, p, self.plan.num_phases, self.step_cfg.gen_tx,
                                        self.step_cfg.fake_tx, e, self.layouts[k],
                                        self.step_cfg.ema_decay > 0)
    return jax.jit(make, out_shardings=self.state_shardings[k])(self.family.fake_init,
                                                                self.family.expert_init)

  def start_phase(self):
    """Jitted (state in phase k-1's layout) -> state in phase k's layout, per k (progressive
    order; the old state is donated, so the dropped fake and moments are freed)."""
    cfg, ema = self.step_cfg, self.step_cfg.ema_decay > 0
    return {k: jax.jit(lambda st, p, e, k=k: ts.start_phase(st, k, p, cfg.gen_tx, cfg.fake_tx, e,
                                                            ema),
                       in_shardings=(self.state_shardings[k - 1], None, None),
                       out_shardings=self.state_shardings[k], donate_argnums=(0,))
            for k in range(1, self.plan.num_phases) if self.plan.order == "progressive"}

  def teacher_params(self):
    """The teacher's parameters placed on their shardings (abstract ones stay abstract)."""
    p = self.family.teacher_params
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(p)):
      return sh.abstract_with(p, self.teacher_sharding)
    return jax.device_put(p, self.teacher_sharding)

  def batch_fn(self):
    """step -> {"y": conditioning [rows, B, ...]}, jitted, a function of (seed, step) only;
    step -> {} when the conditioning is streamed (``host_batch`` has it)."""
    if self.family.cond_data is not None:
      return lambda step: {}
    fn = lambda step: {"y": self.family.sample_cond(jax.random.fold_in(self.data_key, step),
                                                    self.batch_shape)}
    return jax.jit(fn, out_shardings={"y": self.batch_sharding["y"]})

  def abstract_batch(self):
    tree = {"y": self.abstract_y}
    if "real" in self.batch_sharding:
      rows = self.batch_shape[0] - 1
      shape = (rows, self.config.train.batch_size)
      tree["real"] = {"x": jax.ShapeDtypeStruct(shape + tuple(self.family.sample_shape),
                                                jax.numpy.float32),
                      "y": jax.ShapeDtypeStruct(shape, jax.numpy.int32)}
    return sh.abstract_with(tree, self.batch_sharding)

  def _place(self, part):
    """Host rows -> global arrays: real rows (whole batch) put on their shardings; streamed
    conditioning (this process's columns) assembled across processes."""
    out = {}
    if "real" in part:
      out["real"] = jax.device_put(part["real"], self.batch_sharding["real"])
    if "y" in part:
      out["y"] = jax.tree.map(
          lambda a, s, g: jax.make_array_from_process_local_data(s, a, g.shape),
          part["y"], self.batch_sharding["y"], self.abstract_y)
    return out

  def host_batches(self, start: int):
    """The host data of updates start, start + 1, ... placed on their shardings (grain threads
    prefetch them); None when the run reads none."""
    if self.host_data is None:
      return None
    it = iter(self.host_data[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
    return (self._place(b) for b in it)

  def host_batch(self, step: int):
    """Update ``step``'s host data (random access; the same as ``host_batches(step)``'s first)."""
    return self._place(self.host_data[step])

  def jit_step(self, k: int):
    return ts.jit_phase_step(self.step_cfg, k, self.state_shardings[k], self.teacher_sharding,
                             self.batch_sharding)

  def lower(self, k: int, state=None, teacher_params=None, batch=None):
    """Phase k's step lowered for these arguments (default: the abstract ones)."""
    state = self.abstract_state(k) if state is None else state
    teacher_params = self.teacher_params() if teacher_params is None else teacher_params
    batch = self.abstract_batch() if batch is None else batch
    with jax.set_mesh(self.mesh):     # the models' activation constraints read it
      return self.jit_step(k).lower(state, teacher_params, batch)


def anchor(config, plan: methods.PhasePlan, family: families.Family) -> ts.Anchor | None:
  """config.anchor as the step's ODE-anchor term (None when absent or weight 0). The teacher's
  ODE runs ``teacher_steps`` Euler steps from the anchored step's time to the phase boundary,
  uniform in unshifted u (as the teacher's reference sampler)."""
  a = config.get("anchor")
  if a is None or a.weight == 0:
    return None
  phase = plan.phases[a.phase]
  features = family.features if a.distance == "features" else None   # validated: present
  times, _ = sampling.fine_grid((phase.times[a.step], phase.boundary), a.teacher_steps,
                                config.shift)
  return ts.Anchor(weight=float(a.weight), phase=a.phase, step=a.step,
                   times=tuple(float(t) for t in times), features=features)


def gan_term(config, family: families.Family) -> tuple[ts.Gan | None, families.Family]:
  """config.gan as the step's GAN term, and the family with its fakes as {"score", "head"}
  trees (the head is part of the fake's checkpoint item and of its optimizer); (None, family)
  when off."""
  g = config.get("gan")
  if g is None or not g.enabled:
    return None, family
  from pdmd_jax.models import gan_head  # pylint: disable=import-outside-toplevel
  y = jax.eval_shape(lambda: family.sample_cond(jax.random.PRNGKey(0), (1,)))
  x = jax.ShapeDtypeStruct((1,) + tuple(family.sample_shape), jax.numpy.float32)
  tokens = jax.eval_shape(family.score_features, family.teacher_params, x,
                          jax.ShapeDtypeStruct((1,), jax.numpy.float32), y)[1]
  grid, dim = tuple(tokens.shape[1:-1]), tokens.shape[-1]
  head = gan_head.Head(grid, dim, g.width or dim, config.seed + 13)
  base = family.fake_apply or (lambda tp: family.apply)
  wrapped = dataclasses.replace(
      family, fake_init={"score": family.fake_init, "head": head.params},
      fake_axes=None if family.fake_axes is None else {
          "score": family.fake_axes, "head": jax.tree.map(lambda a: (None,) * a.ndim, head.params)},
      fake_apply=lambda tp: (lambda p, x, t, y: base(tp)(p["score"], x, t, y)))
  reduction = config.generator.get("loss_reduction", "sample_sum")
  term = ts.Gan(gen_weight=float(g.gen_weight), disc_weight=float(g.disc_weight),
                source=g.source, head=head.apply, features=family.score_features,
                fake_merge=family.fake_merge,
                elements=int(np.prod(family.sample_shape)) if reduction == "sample_sum" else 1)
  return term, wrapped


def _check_ida(family: families.Family):
  """IDA mixes an expert's full parameters into a full fake of the same structure."""
  merged = family.expert_init
  if family.expert_merge is not None:
    merged = jax.eval_shape(family.expert_merge(family.teacher_params), family.expert_init)
  if family.fake_apply is not None or (jax.tree.structure(merged) !=
                                       jax.tree.structure(family.fake_init)):
    validation.fail("fake.ida_lambda", 1.0, f"1.0 for family {family.name!r} (IDA needs full "
                    "fakes with the structure of an expert's merged parameters)")


def assemble(plan: methods.PhasePlan, family: families.Family, config, mesh) -> Assembly:
  """The step config and every sharding of the run (nothing is allocated here)."""
  g, f = config.generator, config.fake
  if f.get("ida_lambda", 1.0) < 1.0:
    _check_ida(family)
  gan, family = gan_term(config, family)
  step_cfg = ts.StepConfig(
      plan=plan, apply=family.apply, teacher=family.teacher,
      sched=S.get_schedule(config.schedule), sample_shape=tuple(family.sample_shape),
      gen_tx=optimizer(g), fake_tx=optimizer(f), ttur=f.ttur, weighting=g.weighting,
      fake_target=f.target, clamp_final_phase=f.clamp_final_phase, norm_floor=g.norm_floor,
      loss_reduction=g.get("loss_reduction", "sample_sum"), gen_clip=g.grad_clip,
      ema_decay=g.get("ema_decay", 0.0), ema_start=g.get("ema_start", 0),
      anchor=anchor(config, plan, family), ida_lambda=f.get("ida_lambda", 1.0), gan=gan,
      expert_apply=family.expert_apply, fake_apply=family.fake_apply,
      expert_merge=family.expert_merge)
  rng, data_key = jax.random.split(jax.random.PRNGKey(config.seed))
  layouts = tuple(ts.layout(plan.order, plan.num_phases, k) for k in range(plan.num_phases))
  abstract, state_shardings = [], []
  for lay in layouts:
    tree = jax.eval_shape(
        lambda r, p, e, lay=lay: ts.create_state(r, p, plan.num_phases, step_cfg.gen_tx,
                                                 step_cfg.fake_tx, e, lay,
                                                 step_cfg.ema_decay > 0),
        rng, family.fake_init, family.expert_init)
    abstract.append(tree)
    if family.fake_axes is None:      # unannotated trees: the FSDP tactic
      state_shardings.append(sh.tree_shardings(mesh, tree))
    else:
      state_shardings.append(sh.train_state_shardings(
          mesh, tree, (step_cfg.gen_tx, step_cfg.fake_tx), family.fake_axes, family.expert_axes))
  if family.teacher_axes is None:
    teacher_sharding = sh.tree_shardings(mesh, family.teacher_params)
  else:
    teacher_sharding = sh.logical_shardings(mesh, family.teacher_params, family.teacher_axes)
  shape = (f.ttur + 1, config.train.batch_size)
  y = jax.eval_shape(lambda: family.sample_cond(jax.random.PRNGKey(0), shape))
  batch_sharding = {"y": jax.tree.map(lambda a: sh.batch_sharding(mesh, 1, a.ndim), y)}
  host = {}
  if gan is not None:   # real rows [ttur, B, ...] per update, through the family's data pipeline
    host["real"] = family.real_data(f.ttur * config.train.batch_size, config.seed).map(
        lambda b: jax.tree.map(lambda a: a.reshape((f.ttur, -1) + a.shape[1:]), b))
    batch_sharding["real"] = {"x": sh.batch_sharding(mesh, 1, 2 + len(family.sample_shape)),
                              "y": sh.batch_sharding(mesh, 1, 2)}
  if family.cond_data is not None:   # streamed conditioning: this process's batch columns
    columns = process_columns(batch_sharding["y"]["index"], y["index"].shape)
    host["y"] = family.cond_data(shape, config.seed, columns)
  return Assembly(config=config, plan=plan, family=family, mesh=mesh, step_cfg=step_cfg,
                  layouts=layouts, state_shardings=tuple(state_shardings),
                  teacher_sharding=teacher_sharding, batch_sharding=batch_sharding, rng=rng,
                  data_key=data_key, abstract_state_trees=tuple(abstract), abstract_y=y,
                  host_data=grain.MapDataset.source(_Updates(host)) if host else None)


class _Updates:
  """grain source zipping datasets: element i is {name: dataset[i]}."""

  def __init__(self, parts):
    self.parts = parts

  def __len__(self):
    return min(len(p) for p in self.parts.values())

  def __getitem__(self, i):
    return {k: p[i] for k, p in self.parts.items()}


def process_columns(sharding, shape) -> slice:
  """The batch columns (axis 1) this process's devices hold under ``sharding``: one contiguous
  range (the data and fsdp mesh axes split the batch, processes own consecutive devices)."""
  spans = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    s = index[1]
    spans.add((s.start or 0, shape[1] if s.stop is None else s.stop))
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds batch columns {sorted(spans)}, not "
                     "one contiguous range; order config.mesh so that each process's devices "
                     "are consecutive along the data and fsdp axes")
  return slice(lo, hi)


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  return sh.make_mesh(**validation.mesh_sizes(config, len(devices)), devices=devices)


def build(config, *, devices=None, abstract: bool = False, workdir: str | None = None) -> Assembly:
  """Validates ``config`` once, makes the mesh once, builds the family and assembles the run.

  abstract: ShapeDtypeStruct trees, no weight or data file read (AOT planning).
  """
  plan = validation.validate(config, files=not abstract)
  mesh = make_mesh(config, devices)
  family = families.get(config.teacher.type).build(config, plan, mesh, abstract=abstract,
                                                   workdir=workdir)
  asm = assemble(plan, family, config, mesh)
  check_fits(asm)
  return asm


def device_memory_bytes(config, device) -> int | None:
  """train.device_memory_gib, else the device's own limit (GPU/TPU); None: unknown (CPU)."""
  gib = config.train.get("device_memory_gib", 0.0)
  if gib:
    return int(gib * 2**30)
  try:
    return (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except  (memory_stats is backend-dependent)
    return None


def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of ``tree`` (abstract or concrete) under ``shardings``."""
  return int(sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                 for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)))


def check_fits(asm: Assembly):
  """Refuses, before anything is compiled, a mesh whose devices cannot hold the state and the
  teacher, and dense attention whose logits cannot fit a device, naming the numbers and the
  levers. Nothing is checked when the device memory is unknown (CPU without
  train.device_memory_gib)."""
  config = asm.config
  budget = device_memory_bytes(config, asm.mesh.devices.flat[0])
  if not budget:
    return
  gib = lambda b: f"{b / 2**30:.1f} GiB"
  sizes = dict(asm.mesh.shape)
  teacher = per_device_bytes(asm.family.teacher_params, asm.teacher_sharding)
  for k in range(asm.plan.num_phases):
    state = per_device_bytes(asm.abstract_state_trees[k], asm.state_shardings[k])
    if state + teacher > budget:
      raise ValueError(
          f"mesh {sizes}: phase {k + 1}'s state ({gib(state)}) and the teacher ({gib(teacher)}) "
          f"need {gib(state + teacher)} per device, more than the device's {gib(budget)} "
          f"(train.device_memory_gib). Levers: a larger mesh.fsdp (or fsdp x context: "
          f"parameters split over both), fake.lora_rank > 0 (shared-backbone fakes: no full "
          f"fake copy nor its AdamW moments), model.teacher_dtype=bfloat16 (the frozen teacher "
          f"in the compute dtype), phase_order=progressive (one phase live at a time).")
  tokens, heads = asm.family.attention_shape
  if tokens and config.get("model", {}).get("attention", "dense") == "dense":
    logits = heads // sizes["tensor"] * tokens**2 * 4 if heads % sizes["tensor"] == 0 else \
        heads * tokens**2 * 4
    if logits > budget:
      raise ValueError(
          f"model.attention='dense' materialises [heads, L, L] float32 logits: L = {tokens} "
          f"tokens, {heads} heads -> {gib(logits)} per sample and layer on one device, more "
          f"than the device's {gib(budget)} (train.device_memory_gib). Levers: "
          f"model.attention='blockwise' (never builds [L, L]), fewer tokens (data.num_frames, "
          f"data.height, data.width), mesh.tensor (splits the heads).")


def memory(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program (XLA's memory_analysis; -1 where unavailable)."""
  try:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias",
                                                              "temp")}
  except Exception:  # pylint: disable=broad-except  (memory_analysis is backend-dependent)
    return {k: -1 for k in ("argument", "output", "alias", "temp", "peak")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def num_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
