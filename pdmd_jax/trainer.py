"""train_and_evaluate(config, workdir): build, restore, loop over phases, log, evaluate, save.

The loop dispatches one ahead-of-time compiled phase step per phase (compiled once, state
donated, explicit shardings) and reads each step's metrics one step late, so the host never
stalls the device; a non-finite metric stops the run naming the step and the metric, before
any later checkpoint can be written.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from absl import logging

logging.set_verbosity(logging.WARNING)   # orbax logs every file it writes at INFO

from pdmd_jax import checkpointing
from pdmd_jax import config_lib
from pdmd_jax import experts as experts_lib
from pdmd_jax import methods
from pdmd_jax import models
from pdmd_jax import sampling
from pdmd_jax import schedule as S
from pdmd_jax import sharding as sh
from pdmd_jax import teachers
from pdmd_jax import train_step as ts
from pdmd_jax.data import gmm as gmm_lib
from pdmd_jax.evaluation import gmm_metrics


# ============================================================================================
# Building the run
# ============================================================================================

@dataclasses.dataclass
class Run:
  """Everything static about a run: plan, teacher, networks, mesh, shardings, step config.

  kind: "gmm" (exact mixture teacher, MLP experts), "image" / "video" (a shipped DiT teacher:
  the MNIST DiT or the moving-digits video DiT, with LoRA or full-copy experts) or "latent"
  (Wan2.2).
  """
  config: Any
  kind: str
  plan: methods.PhasePlan
  sched: S.Schedule
  teacher: teachers.Teacher
  teacher_params: Any
  net: models.Functional
  init_params: Any                 # fake scores (and full-copy experts) start here
  expert_init: Any                 # None (full copies of init_params) or the LoRA tree
  sample_shape: tuple[int, ...]
  num_classes: int
  mesh: jax.sharding.Mesh
  step_cfg: ts.StepConfig
  state_sharding: Any
  teacher_sharding: Any
  batch_sharding: Any
  data_key: jax.Array
  rng: jax.Array
  gmm: gmm_lib.GaussianMixture | None = None
  cond_fn: Any = None              # (key, shape) -> conditioning pytree; None: class labels
  labels_fn: Any = None
  teacher_card: dict | None = None  # a shipped network teacher's card (data settings, metrics)

  @property
  def steps_per_phase(self) -> int:
    return self.config.train.num_steps // self.plan.num_phases

  def phase_of(self, step: int) -> int:
    if self.plan.order == "interleaved":
      return step % self.plan.num_phases
    return min(step // self.steps_per_phase, self.plan.num_phases - 1)

  def experts_apply(self):
    """Apply function(s) of the generator experts (LoRA experts read the teacher's backbone)."""
    return self.step_cfg.experts_apply(self.teacher_params)

  def sample_labels(self, key, shape):
    """Conditioning for ``shape`` samples: class labels, or the task's pytree (text embeddings)."""
    if self.cond_fn is not None:
      return self.cond_fn(key, shape)
    if self.kind == "gmm":
      return gmm_lib.sample_labels(key, self.gmm, self.num_classes, shape)
    return jax.random.randint(key, shape, 0, self.num_classes)


def build(config, workdir: str | None = None, devices=None) -> Run:
  """Validates ``config`` and builds the run (teacher, networks, mesh, shardings)."""
  plan = config_lib.validate(config)
  devices = list(devices if devices is not None else jax.devices())
  mesh = sh.make_mesh(**config_lib.mesh_sizes(config, len(devices)), devices=devices)
  sched = S.get_schedule(config.schedule)
  if config.teacher.type == "gmm":
    parts = _gmm_parts(config, workdir, sched)
  elif config.teacher.type == "wan":
    from pdmd_jax import wan_task  # pylint: disable=import-outside-toplevel
    parts = wan_task.parts(config, sched)
  else:
    parts = _network_parts(config)
  g, f = config.generator, config.fake
  gen_tx = ts.make_optimizer(g.lr, g.b1, g.b2, g.weight_decay, g.grad_clip)
  fake_tx = ts.make_optimizer(f.lr, f.b1, f.b2, f.weight_decay, f.grad_clip)
  step_cfg = ts.StepConfig(plan=plan, apply=parts["net"].apply, teacher=parts["teacher"],
                           sched=sched, sample_shape=parts["sample_shape"], gen_tx=gen_tx, fake_tx=fake_tx,
                           ttur=f.ttur, weighting=g.weighting, fake_target=f.target,
                           clamp_final_phase=f.clamp_final_phase, norm_floor=g.norm_floor,
                           expert_apply=parts.get("expert_apply"),
                           fake_apply=parts.get("fake_apply"))
  rng, data_key = jax.random.split(jax.random.PRNGKey(config.seed))
  abstract = jax.eval_shape(lambda: ts.create_state(rng, parts["init_params"], plan.num_phases,
                                                    gen_tx, fake_tx, parts.get("expert_init")))
  axes = parts.get("param_axes")
  if axes is not None:        # DiT teachers: the logical axis rules (data/fsdp/tensor/context)
    axes_of = lambda tree: axes if tree is parts["teacher_params"] else sh.lora_axes(tree, axes)
    state_sharding = sh.train_state_shardings(
        mesh, abstract, (gen_tx, fake_tx), axes_of(parts["init_params"]),
        axes_of(parts.get("expert_init", parts["init_params"])))
    teacher_sharding = sh.logical_shardings(mesh, parts["teacher_params"], axes)
  else:                       # unannotated trees: the FSDP tactic
    state_sharding = sh.tree_shardings(mesh, abstract)
    teacher_sharding = (sh.replicated(mesh, parts["teacher_params"]) if parts["kind"] == "gmm"
                        else sh.tree_shardings(mesh, parts["teacher_params"]))
  run = Run(config=config, kind=parts["kind"], plan=plan, sched=sched, teacher=parts["teacher"],
            teacher_params=parts["teacher_params"], net=parts["net"],
            init_params=parts["init_params"], expert_init=parts.get("expert_init"),
            sample_shape=parts["sample_shape"], num_classes=parts["num_classes"], mesh=mesh,
            step_cfg=step_cfg, state_sharding=state_sharding, teacher_sharding=teacher_sharding,
            batch_sharding=None, data_key=data_key, rng=rng, gmm=parts.get("gmm"),
            cond_fn=parts.get("cond_fn"), teacher_card=parts.get("card"))
  shape = (config.fake.ttur + 1, config.train.batch_size)
  abstract_y = jax.eval_shape(lambda: run.sample_labels(jax.random.PRNGKey(0), shape))
  run.batch_sharding = {"y": jax.tree.map(
      lambda a: sh.batch_sharding(mesh, batch_axis=1, ndim=a.ndim), abstract_y)}
  return run


def _gmm_parts(config, workdir, sched) -> dict:
  """Exact mixture teacher; experts and fakes start from an MLP fit to its velocity."""
  t = config.teacher
  gmm = gmm_lib.make(t.dataset, dim=t.dim, num_modes=t.num_modes, num_classes=t.num_classes,
                     radius=t.radius, std=t.std, seed=t.seed)
  teacher = teachers.gmm_teacher(sched, t.num_classes, t.guidance_scale)
  m = config.model
  net, params = models.build(m.name, dim=t.dim, num_classes=t.num_classes, width=m.width,
                             depth=m.depth, time_dim=m.time_dim, seed=config.seed)
  params = _teacher_fit(config, workdir, net, params, teacher, gmm, sched)
  return {"kind": "gmm", "teacher": teacher, "teacher_params": gmm, "gmm": gmm, "net": net,
          "init_params": params, "sample_shape": (t.dim,), "num_classes": t.num_classes}


def _network_parts(config) -> dict:
  """A trained DiT teacher; fakes are full copies of it, experts LoRA on it (or full copies)."""
  from pdmd_jax import teacher_training  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  t, g = config.teacher, config.generator
  dit_cfg, net, params, card = teacher_training.load_teacher(t.path or None)
  if config.model.remat or config.model.scan_layers:
    raise ValueError("model.remat/model.scan_layers: the shipped teacher is unscanned; set both "
                     "False for it")
  teacher = teachers.network_teacher(net.apply, dit_cfg.num_classes, t.guidance_scale)
  parts = {"kind": "video" if dit_cfg.video else "image", "teacher": teacher,
           "teacher_params": params, "net": net, "init_params": params,
           "sample_shape": dit_cfg.sample_shape, "num_classes": dit_cfg.num_classes, "card": card,
           "param_axes": models.logical_axes(dit_cfg)}
  if g.lora_rank > 0:
    spec = lora_lib.LoraSpec(((g.lora_targets, g.lora_rank, g.lora_alpha),))
    parts["expert_init"] = lora_lib.init(spec, params, jax.random.PRNGKey(config.seed + 7))
    parts["expert_apply"] = functools.partial(_lora_apply, net.apply, spec)
  f = config.fake
  if f.get("lora_rank", 0) > 0:   # shared backbone: LoRA fakes on the frozen teacher
    spec = lora_lib.LoraSpec(((f.lora_targets, f.lora_rank, f.lora_alpha),))
    parts["expert_init"] = parts.get("expert_init", params)   # full-copy experts stay full
    parts["init_params"] = lora_lib.init(spec, params, jax.random.PRNGKey(config.seed + 11))
    parts["fake_apply"] = functools.partial(_lora_apply, net.apply, spec)
  return parts


def _lora_apply(apply, spec, teacher_params):
  """Every expert: the frozen teacher backbone with its own LoRA merged in."""
  from pdmd_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  backbone = jax.lax.stop_gradient(teacher_params)
  return lambda lora, x, t, y: apply(lora_lib.merge(spec, backbone, lora), x, t, y)


def _teacher_fit(config, workdir, net, params, teacher, gmm, sched):
  """The MLP fit to the exact teacher velocity, cached in ``<workdir>/teacher_fit``."""
  path = os.path.join(os.path.abspath(workdir), "teacher_fit") if workdir else None
  if path and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
    return ocp.StandardCheckpointer().restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, params))
  f = config.init_fit
  t0 = time.time()
  params, mse = experts_lib.fit_to_gmm_teacher(
      net.apply, params, teacher, gmm, sched, num_classes=config.teacher.num_classes,
      steps=f.steps, batch_size=f.batch_size, lr=f.lr, seed=config.seed, p_uncond=f.p_uncond,
      shift=config.shift)
  logging.info("teacher fit: mse %.3g in %.1fs", mse, time.time() - t0)
  print(f"Fitted the MLP to the exact teacher velocity: mse {mse:.3g} ({time.time() - t0:.1f}s)")
  if path:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, params)
    ckptr.wait_until_finished()
  return params


def initial_state(run: Run) -> ts.TrainState:
  make = lambda p, e: ts.create_state(run.rng, p, run.plan.num_phases, run.step_cfg.gen_tx,
                                      run.step_cfg.fake_tx, e)
  return jax.jit(make, out_shardings=run.state_sharding)(run.init_params, run.expert_init)


def batch_for_step(run: Run, step: int):
  """Conditioning labels for generator update ``step``: [ttur + 1, B], a function of (seed, step)."""
  return _labels(run)(jnp.int32(step))


def _labels(run: Run):
  if run.labels_fn is None:
    shape = (run.config.fake.ttur + 1, run.config.train.batch_size)
    fn = lambda step: {"y": run.sample_labels(jax.random.fold_in(run.data_key, step), shape)}
    run.labels_fn = jax.jit(fn, out_shardings=run.batch_sharding)
  return run.labels_fn


def compile_phase_steps(run: Run, state) -> tuple[dict, dict]:
  """AOT-compiles one phase step per phase; returns ({k: compiled}, {k: memory stats})."""
  compiled, memory = {}, {}
  batch = batch_for_step(run, 0)
  for k in range(run.plan.num_phases):
    fn = ts.jit_phase_step(run.step_cfg, k, run.state_sharding, run.teacher_sharding,
                           run.batch_sharding)
    compiled[k] = fn.lower(state, run.teacher_params, batch).compile()
    memory[k] = _memory(compiled[k])
  return compiled, memory


def _memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
    peak = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes)
    return {"peak_bytes": int(peak), "temp_bytes": int(m.temp_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes)}
  except Exception:  # pylint: disable=broad-except  (memory_analysis is backend-dependent)
    return {"peak_bytes": -1, "temp_bytes": -1, "argument_bytes": -1}


# ============================================================================================
# The loop
# ============================================================================================

def train_and_evaluate(config, workdir: str, *, devices=None, stop_at_step: int | None = None,
                       evaluate_phases: bool = True, final_eval: bool = True,
                       verbose: bool = True) -> dict:
  """Distils the teacher into the plan's experts; resumes from ``workdir`` if it holds a checkpoint.

  stop_at_step: stop (after checkpointing) once this many generator updates are done; used to
    test that resuming gives the same numbers as not stopping.
  Returns the final evaluation (a dict of floats) plus timing and memory figures.
  """
  os.makedirs(workdir, exist_ok=True)
  run = build(config, workdir, devices)
  say = print if verbose else (lambda *a, **k: None)
  say(run.plan.describe())
  ckpt = checkpointing.Checkpointer(workdir, run.plan.num_phases, config.train.max_to_keep)
  state = initial_state(run)
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(checkpointing.abstract_like(state, run.state_sharding))
    say(f"Resumed from {ckpt.directory} at step {meta['step']} (phase "
        f"{run.phase_of(min(meta['step'], config.train.num_steps - 1)) + 1}).")
  compiled, memory = compile_phase_steps(run, state)
  total = config.train.num_steps
  end = total if stop_at_step is None else min(stop_at_step, total)
  writer = _writer(workdir)
  step = int(jax.device_get(state.step))
  pending: collections.deque = collections.deque()
  times: list[float] = []
  bar = None
  results = {}
  h = config.get("health", {})
  monitor = None
  if h and h.get("every", 0):
    from pdmd_jax import health  # pylint: disable=import-outside-toplevel
    monitor = health.HealthMonitor(run, seeds=h.seeds, min_fraction=h.min_fraction)
  stopped_early = ""
  try:
    while step < end:
      k = run.phase_of(step)
      if bar is None or (run.plan.order == "progressive" and step % run.steps_per_phase == 0):
        if bar is not None:
          bar.close()
        lo = (step // run.steps_per_phase) * run.steps_per_phase if run.plan.order == "progressive" else 0
        hi = lo + run.steps_per_phase if run.plan.order == "progressive" else total
        bar = tqdm.tqdm(total=hi - lo, initial=step - lo, disable=not verbose, leave=True,
                        desc=f"phase {k + 1}/{run.plan.num_phases}" if run.plan.order == "progressive"
                        else "interleaved phases", dynamic_ncols=True)
      t0 = time.perf_counter()
      state, metrics = compiled[k](state, run.teacher_params, batch_for_step(run, step))
      pending.append((step, metrics))
      _drain(pending, writer, config.train.log_every, leave=1)   # read one step late
      times.append(time.perf_counter() - t0)
      step += 1
      bar.update(1)
      phase_end = run.plan.order == "progressive" and step % run.steps_per_phase == 0
      if step % config.train.ckpt_every == 0 or phase_end or step == end:
        _drain(pending, writer, config.train.log_every)   # never save after a non-finite step
        ckpt.save(state, config.to_dict(), {"phase": k})
      if monitor is not None and (step % h.every == 0 or step == end):
        report = monitor(state)
        for name, value in report.items():
          if name != "collapsed":
            writer.add_scalar(f"health/{name}", value, step)
        bar.set_postfix(diversity=f"{report['diversity_vs_teacher']:.2f}")
        if report["collapsed"]:
          _drain(pending, writer, config.train.log_every)
          ckpt.save(state, config.to_dict(), {"phase": k})
          stopped_early = report["collapsed"]
          say(f"Stopped early at step {step}: collapse against the teacher ({stopped_early}).")
          break
      if phase_end and evaluate_phases and step < total:
        results[f"phase_{k + 1}"] = evaluate(run, state, workdir, tag=f"phase{k + 1}", verbose=False)
    _drain(pending, writer, config.train.log_every)
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()
  if stopped_early:
    return {"stopped_at_step": step, "stopped_early": stopped_early}
  if step < total or not final_eval:
    return {"stopped_at_step": step}
  final = evaluate(run, state, workdir, tag="final", verbose=verbose)
  final["time_per_step_ms"] = 1000 * float(np.median(times[1:])) if len(times) > 1 else float("nan")
  final["peak_memory_bytes"] = max(m["peak_bytes"] for m in memory.values())
  final["memory_by_phase"] = memory
  final["phases"] = results
  _write_json(os.path.join(workdir, "metrics.json"), final)
  return final


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm became NaN/Inf."""


def _drain(pending: collections.deque, writer, log_every: int, leave: int = 0):
  """Checks and logs queued metrics (a host transfer) until ``leave`` entries remain."""
  while len(pending) > leave:
    step, metrics = pending.popleft()
    host = jax.device_get(metrics)
    for name, value in host.items():
      if name != "finite" and not np.all(np.isfinite(value)):
        raise NonFiniteError(f"non-finite {name}={value} at step {step} (generator update "
                             f"{step + 1}); the run stopped, the last good checkpoint is kept")
    if (step + 1) % log_every == 0:
      for name, value in host.items():
        writer.add_scalar(f"train/{name}", float(value), step + 1)


def _writer(workdir):
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


# ============================================================================================
# Evaluation
# ============================================================================================

def evaluate(run: Run, state, workdir: str | None, *, tag: str, verbose: bool = True) -> dict:
  """Metrics, plots and tables of the distilled sampler at ``state`` (written to ``workdir``)."""
  if run.kind == "gmm":
    return _evaluate_gmm(run, state, workdir, tag=tag, verbose=verbose)
  if run.kind == "latent":   # Wan2.2: latent statistics vs the teacher (+ optional decoding)
    from pdmd_jax.evaluation import latent_eval  # pylint: disable=import-outside-toplevel
    out = latent_eval.evaluate(run, state, workdir, tag=tag, verbose=verbose)
  else:
    from pdmd_jax.evaluation import image_eval  # pylint: disable=import-outside-toplevel
    out = image_eval.evaluate(run, state, workdir, tag=tag, verbose=verbose)
  if workdir:
    _write_json(os.path.join(workdir, f"eval_{tag}.json"), out)
  return out


def _evaluate_gmm(run: Run, state, workdir: str | None, *, tag: str, verbose: bool = True) -> dict:
  """Few-step samples vs exact data and vs the many-step teacher; boundary marginals; plots."""
  c = run.config
  n = c.eval.num_samples
  key = jax.random.PRNGKey(c.eval.seed)
  k_y, k_z, k_x = jax.random.split(key, 3)
  y = gmm_lib.sample_labels(k_y, run.gmm, c.teacher.num_classes, (n,))
  z = jax.random.normal(k_z, (n, c.teacher.dim))
  student = jax.jit(lambda e, z, y: sampling.few_step_sample(run.plan, run.experts_apply(), e, z,
                                                             y))(state.experts, z, y)
  teacher = jax.jit(lambda p, z, y: sampling.teacher_sample(
      run.teacher, p, run.plan, z, y, substeps=c.eval.teacher_substeps, shift_value=c.shift))(
          run.gmm, z, y)
  exact, _ = gmm_lib.sample(k_x, run.gmm, y)
  student, teacher, exact = jax.device_get((student, teacher, exact))
  out = {f"student/{k}": v for k, v in gmm_metrics.gmm_report(student[-1], run.gmm, exact).items()}
  out.update({f"teacher/{k}": v for k, v in gmm_metrics.gmm_report(teacher[-1], run.gmm, exact).items()})
  # Phase-boundary marginals: the distilled x_{t_k} against the teacher's own x_{t_k}.
  per = run.plan.num_steps // run.plan.num_phases
  for p in run.plan.phases[:-1]:
    i = (p.index + 1) * per
    a = float(run.sched.alpha(jnp.float32(p.boundary)))
    d_s = gmm_metrics.boundary_distance(student[i], run.gmm, a)
    d_t = gmm_metrics.boundary_distance(teacher[i], run.gmm, a)
    out[f"boundary_{p.index + 1}/t"] = p.boundary
    out[f"boundary_{p.index + 1}/student_dist"] = d_s
    out[f"boundary_{p.index + 1}/teacher_dist"] = d_t
    out[f"boundary_{p.index + 1}/ratio"] = d_s / d_t
  out["step"] = int(jax.device_get(state.step))
  if workdir:
    _plot(run, student, teacher, exact, os.path.join(workdir, f"samples_{tag}.png"))
    _write_json(os.path.join(workdir, f"eval_{tag}.json"), out)
    with open(os.path.join(workdir, f"metrics_{tag}.md"), "w") as f:
      f.write(metrics_markdown(out))
  if verbose:
    print(metrics_markdown(out))
  return out


def metrics_markdown(out: dict) -> str:
  cols = ["modes_covered", "weight_error_max", "std_ratio", "sliced_wasserstein", "mmd"]
  lines = ["| sampler | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
  for who, label in (("teacher", "teacher (many-step Euler)"), ("student", "distilled (few-step)")):
    vals = []
    for col in cols:
      v = out.get(f"{who}/{col}")
      vals.append("-" if v is None else (f"{v:.0f}/{out[f'{who}/num_modes']:.0f}"
                                          if col == "modes_covered" else f"{v:.4f}"))
    lines.append(f"| {label} | " + " | ".join(vals) + " |")
  bnds = sorted({k.split("/")[0] for k in out if k.startswith("boundary_")})
  if bnds:
    lines += ["", "| boundary | t_k | mean dist. to nearest (1-t_k)mu, distilled | teacher | ratio |",
              "|---|---|---|---|---|"]
    for b in bnds:
      lines.append(f"| {b} | {out[b + '/t']:.4f} | {out[b + '/student_dist']:.4f} | "
                   f"{out[b + '/teacher_dist']:.4f} | {out[b + '/ratio']:.3f} |")
  return "\n".join(lines) + "\n"


def _plot(run, student, teacher, exact, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  means = np.asarray(run.gmm.means)
  if means.shape[1] > 2:   # project onto the top-2 principal directions of the mode means
    _, _, vt = np.linalg.svd(means - means.mean(0), full_matrices=False)
    proj = lambda x: (np.asarray(x) - means.mean(0)) @ vt[:2].T
  else:
    proj = np.asarray
  panels = [("exact data", exact), ("teacher, many-step", teacher[-1])]
  per = run.plan.num_steps // run.plan.num_phases
  for p in run.plan.phases[:-1]:
    panels.append((f"distilled x at t={p.boundary:.3f}", student[(p.index + 1) * per]))
  panels.append((f"distilled ({run.plan.method}, {run.plan.num_steps} steps)", student[-1]))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
  for ax, (title, x) in zip(axes[0], panels):
    xy = proj(x)[:3000]
    ax.scatter(xy[:, 0], xy[:, 1], s=1, alpha=0.4)
    ax.set_title(title, fontsize=8)
    ax.set_aspect("equal")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=float)
  os.replace(tmp, path)


# ============================================================================================
# Sampling from a workdir
# ============================================================================================

def restore_latest(config, workdir: str, devices=None):
  """(run, state) at the latest checkpoint of ``workdir``; raises if there is none."""
  run = build(config, workdir, devices)
  ckpt = checkpointing.Checkpointer(workdir, run.plan.num_phases, config.train.max_to_keep)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint under {ckpt.directory}; train first (--mode=train)")
  state, _ = ckpt.restore(checkpointing.abstract_like(initial_state(run), run.state_sharding))
  ckpt.close()
  return run, state


def sample_to_npz(config, workdir: str, out_path: str | None = None) -> str:
  """Writes few-step samples of the latest checkpoint (and their labels) to an .npz."""
  run, state = restore_latest(config, workdir)
  n = config.eval.num_samples
  k_y, k_z = jax.random.split(jax.random.PRNGKey(config.eval.seed))
  y = run.sample_labels(k_y, (n,))
  z = jax.random.normal(k_z, (n,) + run.sample_shape)
  traj = jax.jit(lambda e, tp, z, y: sampling.few_step_sample(
      run.plan, run.step_cfg.experts_apply(tp), e, z, y))(state.experts, run.teacher_params, z, y)
  out_path = out_path or os.path.join(workdir, f"samples_step{int(state.step)}.npz")
  labels = y["index"] if isinstance(y, dict) else y   # text conditioning: prompt indices
  np.savez(out_path, samples=np.asarray(traj[-1]), labels=np.asarray(labels),
           trajectory=np.stack([np.asarray(x) for x in traj]), grid=np.asarray(run.plan.grid),
           step=int(state.step))
  return out_path
