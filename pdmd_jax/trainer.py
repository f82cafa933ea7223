"""train_and_evaluate(config, workdir): build, restore, loop over phases, log, evaluate, save.

The run is assembled once (``assembly.build``: validate, mesh, the family's ``build``, step
config and shardings; the AOT planner compiles the same program). The loop dispatches one
ahead-of-time compiled phase step per phase (compiled once, state donated, explicit
shardings) and reads each step's metrics one step late, so the host never stalls the device;
a non-finite metric stops the run naming the step and the metric, before any later
checkpoint can be written. SIGTERM (what schedulers and TPU maintenance send) and SIGINT end
the run cleanly: the step in flight finishes, is checkpointed, and the loop returns naming it
(rerunning the same command resumes). Nothing here knows a teacher family: evaluation is the
module the family names.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

logging.set_verbosity(logging.WARNING)   # orbax logs every file it writes at INFO

from pdmd_jax import assembly
from pdmd_jax import checkpointing
from pdmd_jax import families
from pdmd_jax import paths
from pdmd_jax import sampling
from pdmd_jax import train_step as ts


# ============================================================================================
# Building the run
# ============================================================================================

@dataclasses.dataclass
class Run:
  """An assembled run plus the concrete teacher parameters placed on their shardings."""
  asm: assembly.Assembly
  teacher_params: Any
  batch_fn: Any                    # step -> {"y": ...} (jitted, sharded)

  config = property(lambda self: self.asm.config)
  plan = property(lambda self: self.asm.plan)
  family = property(lambda self: self.asm.family)
  mesh = property(lambda self: self.asm.mesh)
  step_cfg = property(lambda self: self.asm.step_cfg)
  sched = property(lambda self: self.asm.step_cfg.sched)
  teacher = property(lambda self: self.asm.family.teacher)
  sample_shape = property(lambda self: tuple(self.asm.family.sample_shape))
  num_classes = property(lambda self: self.asm.family.num_classes)

  def phase_of(self, step: int) -> int:
    return self.asm.phase_of(step)

  def experts(self, state):
    """Every phase's expert of ``state`` as samplers run it (the EMA weights when
    generator.ema_decay > 0 and eval.ema); phases not yet trained at their initial tree."""
    use_ema = self.config.eval.get("ema", True)
    return ts.fill_experts(ts.eval_experts(state, use_ema), self.family.expert_init)

  def experts_apply(self):
    """Apply function(s) of the generator experts (LoRA experts read the teacher's backbone)."""
    return self.step_cfg.experts_apply(self.teacher_params)

  def sample_labels(self, key, shape):
    """Conditioning for ``shape`` samples (class labels or the family's pytree)."""
    return self.family.sample_cond(key, shape)


def build(config, workdir: str | None = None, devices=None) -> Run:
  """Validates ``config`` and builds the run (teacher, networks, mesh, shardings)."""
  asm = assembly.build(config, devices=devices, workdir=workdir)
  return Run(asm=asm, teacher_params=asm.teacher_params(), batch_fn=asm.batch_fn())


def initial_state(run: Run) -> ts.TrainState:
  return run.asm.initial_state()


def batch_for_step(run: Run, step: int, host=None):
  """Update ``step``'s batch, a function of (seed, step): conditioning [ttur + 1, B, ...] and,
  with the GAN term, real data [ttur, B, ...]; what is read on the host (real data, streamed
  conditioning) is ``host`` if already fetched, else read here."""
  batch = run.batch_fn(np.int32(step))
  if run.asm.host_data is not None:
    batch.update(run.asm.host_batch(step) if host is None else host)
  return batch


def compile_phase_steps(run: Run) -> tuple[dict, dict]:
  """AOT-compiles one phase step per phase (each for its state layout); returns
  ({k: compiled}, {k: memory stats})."""
  compiled, memory = {}, {}
  batch = batch_for_step(run, 0)
  for k in range(run.plan.num_phases):
    compiled[k] = run.asm.lower(k, None, run.teacher_params, batch).compile()
    m = assembly.memory(compiled[k])
    memory[k] = {"peak_bytes": m["peak"], "temp_bytes": m["temp"], "argument_bytes": m["argument"]}
  return compiled, memory


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
  paths.makedirs(workdir)     # local or a URL (gs://...); unwritable: WorkdirError naming it
  run = build(config, workdir, devices)
  verbose = verbose and jax.process_index() == 0     # one progress bar and log: process 0
  say = print if verbose else (lambda *a, **k: None)
  say(run.plan.describe())
  ckpt = checkpointing.Checkpointer(workdir, run.plan.num_phases, config.train.max_to_keep)
  if ckpt.latest_step() is None:
    state = initial_state(run)
  else:   # restore onto the abstract state: no second copy of the state is allocated
    checkpointing.check_resumable(ckpt.saved_config(), config, ckpt.directory)
    k = run.asm.layout_phase(ckpt.latest_step())
    state, meta = ckpt.restore(run.asm.abstract_state(k))
    say(f"Resumed from {ckpt.directory} at step {meta['step']} (phase {k + 1}).")
  compiled, memory = compile_phase_steps(run)
  start_phase = run.asm.start_phase()
  total = config.train.num_steps
  progressive, starts = run.plan.order == "progressive", run.asm.phase_starts
  end = total if stop_at_step is None else min(stop_at_step, total)
  writer = _writer(workdir)
  step = int(jax.device_get(state.step))
  pending: collections.deque = collections.deque()
  tally = collections.Counter()     # generator updates whose gradient the clip rescaled
  times: list[float] = []
  bar = None
  results = {}
  h = config.get("health", {})
  monitor = None
  if h and h.get("every", 0):
    from pdmd_jax import health  # pylint: disable=import-outside-toplevel
    monitor = health.HealthMonitor(run, seeds=h.seeds, min_fraction=h.min_fraction)
    history = health.load_history(workdir, step)   # a resumed run keeps its curve up to step
  stopped_early = ""
  stop_signal = _StopSignals()
  hosted = run.asm.host_batches(step)   # host-read data of updates step, step + 1, ...
  try:
    stop_signal.install()
    while step < end:
      k = run.phase_of(step)
      if bar is None or (progressive and step == starts[k]):
        if bar is not None:
          bar.close()
        lo, hi = (starts[k], starts[k + 1]) if progressive else (0, total)
        bar = tqdm.tqdm(total=hi - lo, initial=step - lo, disable=not verbose, leave=True,
                        desc=f"phase {k + 1}/{run.plan.num_phases}" if progressive
                        else "interleaved phases", dynamic_ncols=True)
      t0 = time.perf_counter()
      host = None if hosted is None else next(hosted)
      state, metrics = compiled[k](state, run.teacher_params, batch_for_step(run, step, host))
      pending.append((step, metrics))
      _drain(pending, writer, tally, config.train.log_every, leave=1)   # read one step late
      times.append(time.perf_counter() - t0)
      step += 1
      bar.update(1)
      phase_end = progressive and step == starts[k + 1]
      if phase_end and step < total:   # the next phase's layout; expert k is written once
        _drain(pending, writer, tally, config.train.log_every)
        if config.train.keep_finished_fakes:
          ckpt.save_frozen(state.fakes[k], f"fake_{k}")
        state = start_phase[k + 1](state, run.family.fake_init, run.family.expert_init)
        ckpt.save_frozen(state.experts[k], f"expert_{k}")
        if state.ema[k] is not None:
          ckpt.save_frozen(state.ema[k], f"ema_{k}")
      saved = step % config.train.ckpt_every == 0 or phase_end or step == end
      if saved:
        _drain(pending, writer, tally, config.train.log_every)   # never save after a non-finite step
        ckpt.save(state, config.to_dict(), {"phase": k})
      if monitor is not None and (step % h.every == 0 or step == end):
        report = monitor(state)
        for name, value in report.items():
          if name != "collapsed":
            writer.add_scalar(f"health/{name}", value, step)
        history.append({"step": step, "phase": k, **report})
        if jax.process_index() == 0:
          paths.write_json(paths.join(workdir, health.HISTORY), history)
        bar.set_postfix(diversity=f"{report['diversity_vs_teacher']:.2f}")
        if report["collapsed"]:
          if not saved:
            _drain(pending, writer, tally, config.train.log_every)
            ckpt.save(state, config.to_dict(), {"phase": k})
          stopped_early = report["collapsed"]
          say(f"Stopped early at step {step}: collapse against the teacher ({stopped_early}).")
          break
      if stop_signal.poll(step):
        if not saved:
          _drain(pending, writer, tally, config.train.log_every)
          ckpt.save(state, config.to_dict(), {"phase": k})
        say(f"{stop_signal.received} received: stopped at step {step} after saving its "
            f"checkpoint; rerun the same command to resume.")
        break
      if phase_end and evaluate_phases and step < total:
        results[f"phase_{k + 1}"] = evaluate(run, state, workdir, tag=f"phase{k + 1}", verbose=False)
    _drain(pending, writer, tally, config.train.log_every)
  finally:
    stop_signal.restore()
    if bar is not None:
      bar.close()
    ckpt.close()      # waits for the last (async) save to commit
    writer.close()
  if stop_signal.received:
    return {"stopped_at_step": step, "preempted": stop_signal.received}
  if stopped_early:
    return {"stopped_at_step": step, "stopped_early": stopped_early}
  if step < total or not final_eval:
    return {"stopped_at_step": step}
  final = evaluate(run, state, workdir, tag="final", verbose=verbose)
  final["time_per_step_ms"] = 1000 * float(np.median(times[1:])) if len(times) > 1 else float("nan")
  final["peak_memory_bytes"] = max(m["peak_bytes"] for m in memory.values())
  if tally["steps"]:
    final["gen_clipped_fraction"] = tally["clipped"] / tally["steps"]
  final["memory_by_phase"] = memory
  final["phases"] = results
  _write_json(os.path.join(workdir, "metrics.json"), final)
  return final


class _StopSignals:
  """SIGTERM and SIGINT set ``received`` (the signal's name) for the loop to act on after the step
  in flight; a second one acts as it would without this handler (SIGINT: KeyboardInterrupt).
  Handlers can only be installed from the main thread; elsewhere this does nothing.

  Multi-process runs must stop at the same step everywhere (the save is collective), and a
  signal may reach only some processes: there JAX's coordination service catches SIGTERM and
  agrees on the step (``multihost_utils.reached_preemption_sync_point``); no handler is set.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = ""
    self._old = {}
    self._multi = jax.process_count() > 1

  def install(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def poll(self, step: int) -> str:
    """The signal to stop on after ``step`` updates ("" = go on); collective when multi-process."""
    if self._multi and not self.received:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = "SIGTERM"
    return self.received

  def restore(self):
    for s, handler in self._old.items():
      signal.signal(s, handler)
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    if self.received:
      self.restore()
      signal.raise_signal(signum)
      return
    self.received = signal.Signals(signum).name


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm became NaN/Inf."""


def _drain(pending: collections.deque, writer, tally, log_every: int, leave: int = 0):
  """Checks and logs queued metrics (a host transfer) until ``leave`` entries remain; ``tally``
  counts steps and clipped generator updates (train/gen_clipped_fraction: since the start of
  this process)."""
  while len(pending) > leave:
    step, metrics = pending.popleft()
    host = jax.device_get(metrics)
    for name, value in host.items():
      if name != "finite" and not np.all(np.isfinite(value)):
        raise NonFiniteError(f"non-finite {name}={value} at step {step} (generator update "
                             f"{step + 1}); the run stopped, the last good checkpoint is kept")
    tally["steps"] += 1
    tally["clipped"] += int(host.get("gen_clipped", 0))
    if (step + 1) % log_every == 0:
      for name, value in host.items():
        writer.add_scalar(f"train/{name}", float(value), step + 1)
      if "gen_clipped" in host:
        writer.add_scalar("train/gen_clipped_fraction", tally["clipped"] / tally["steps"], step + 1)


def _writer(workdir):
  """TensorBoard scalars (process 0; the others write nothing); URL workdirs through epath."""
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    return _NoWriter()
  if paths.is_url(workdir):
    paths.register_tensorboard_scheme(str(workdir).split("://")[0])
  return SummaryWriter(paths.join(workdir, "tensorboard"))


class _NoWriter:
  def add_scalar(self, *args, **kwargs):
    pass

  def close(self):
    pass


# ============================================================================================
# Evaluation
# ============================================================================================

def evaluate(run: Run, state, workdir: str | None, *, tag: str, verbose: bool = True) -> dict:
  """Metrics, plots and tables of the distilled sampler at ``state`` (written to ``workdir``)."""
  evaluator = importlib.import_module(f"pdmd_jax.evaluation.{run.family.evaluator}")
  out = evaluator.evaluate(run, state, workdir, tag=tag, verbose=verbose)
  if workdir:
    _write_json(os.path.join(workdir, f"eval_{tag}.json"), out)
  return out


def _write_json(path, obj):
  if jax.process_index() == 0:     # multi-process: process 0 writes
    paths.write_json(path, obj)


# ============================================================================================
# Sampling from a workdir
# ============================================================================================

def restore_latest(config, workdir: str, devices=None):
  """(run, state) at the latest checkpoint of ``workdir``; raises if there is none."""
  run = build(config, workdir, devices)
  ckpt = checkpointing.Checkpointer(workdir, run.plan.num_phases, config.train.max_to_keep)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint under {ckpt.directory}; train first (--mode=train)")
  checkpointing.check_resumable(ckpt.saved_config(), config, ckpt.directory)
  state, _ = ckpt.restore(run.asm.abstract_state(run.asm.layout_phase(ckpt.latest_step())))
  ckpt.close()
  return run, state


def sample_to_npz(config, workdir: str, out_path: str | None = None) -> str:
  """Writes few-step samples of the latest checkpoint (and their labels) to an .npz."""
  run, state = restore_latest(config, workdir)
  n = config.eval.num_samples
  k_y, k_z = jax.random.split(jax.random.PRNGKey(config.eval.seed))
  y = run.sample_labels(k_y, (n,))
  z = jax.random.normal(k_z, (n,) + run.sample_shape)
  sample = jax.jit(lambda e, tp, z, y: [families.decode(run.family, x) for x in
                                        sampling.few_step_sample(
                                            run.plan, run.step_cfg.experts_apply(tp), e, z, y)])
  traj = sample(run.experts(state), run.teacher_params, z, y)
  out_path = out_path or os.path.join(workdir, f"samples_step{int(state.step)}.npz")
  labels = y["index"] if isinstance(y, dict) else y   # text conditioning: prompt indices
  if jax.process_index() != 0:
    return out_path
  paths.save_npz(out_path, samples=np.asarray(traj[-1]), labels=np.asarray(labels),
           trajectory=np.stack([np.asarray(x) for x in traj]), grid=np.asarray(run.plan.grid),
           step=int(state.step))
  return out_path
