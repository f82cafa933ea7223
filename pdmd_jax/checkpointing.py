"""Orbax checkpoints: one item per generator expert, fake score and optimizer state.

A step directory holds ``meta`` (JSON: step, rng, the live phases), ``config`` (JSON) and, for
every live phase k of the state's layout (``train_step.layout``), ``expert_<k>``,
``expert_opt_<k>``, ``fake_<k>``, ``fake_opt_<k>`` (and ``ema_<k>`` when the generator EMA is
on). A finished (frozen) expert (and its EMA) is written once, when its phase ends, to
``<workdir>/checkpoints_frozen/expert_<k>`` (``ema_<k>``) and read from there by every later
restore: a save writes only the trees that change. The teacher is never saved.

Orbax writes into a temporary directory and renames it on commit, so a save killed mid-write
leaves a ``*.orbax-checkpoint-tmp-*`` directory that ``latest_step`` ignores: a half-written
checkpoint is never restored. A frozen expert is committed before the first step checkpoint
that needs it. Restores take an abstract state carrying the target shardings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pdmd_jax import train_step as ts
from pdmd_jax import paths

_LIVE = ("expert", "expert_opt", "fake", "fake_opt")


def _live_phases(state: ts.TrainState) -> list[int]:
  return [k for k, o in enumerate(state.expert_opt) if o is not None]


def _frozen_phases(state: ts.TrainState) -> list[int]:
  return [k for k, (e, o) in enumerate(zip(state.experts, state.expert_opt))
          if e is not None and o is None]


def _trees(state: ts.TrainState, k: int) -> dict:
  out = dict(zip(_LIVE, (state.experts[k], state.expert_opt[k], state.fakes[k],
                         state.fake_opt[k])))
  if state.ema[k] is not None:
    out["ema"] = state.ema[k]
  return out


class Checkpointer:
  """Saves and restores a TrainState under ``<workdir>/checkpoints`` (+ ``checkpoints_frozen``)."""

  def __init__(self, workdir: str, num_phases: int, max_to_keep: int = 3, async_save: bool = True):
    self.num_phases = num_phases
    workdir = paths.absolute(workdir)        # local, or a URL orbax writes to (gs://...)
    self.directory = paths.join(workdir, "checkpoints")
    self.frozen_directory = paths.join(workdir, "checkpoints_frozen")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self):
    return self.manager.latest_step()

  def saved_config(self, step: int | None = None) -> dict:
    """The config (JSON) saved with ``step`` (default: the latest committed)."""
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def save(self, state: ts.TrainState, config_json: dict, extra: dict | None = None):
    """Saves the live phases' trees at ``state.step`` (frozen experts: ``save_frozen``)."""
    step = int(jax.device_get(state.step))
    live = _live_phases(state)
    meta = {"step": step, "rng": [int(v) for v in np.asarray(jax.device_get(state.rng))],
            "live": live, **(extra or {})}
    args = {"meta": ocp.args.JsonSave(meta), "config": ocp.args.JsonSave(config_json)}
    for k in live:
      for name, tree in _trees(state, k).items():
        args[f"{name}_{k}"] = ocp.args.StandardSave(tree)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def save_frozen(self, tree, name: str):
    """Writes a finished tree (``expert_<k>``; ``fake_<k>`` to keep a dropped fake for analysis)
    once, synchronously; a path left by an interrupted earlier run is overwritten."""
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(paths.join(self.frozen_directory, name), tree, force=True)
      ckptr.wait_until_finished()

  def restore(self, abstract_state: ts.TrainState, step: int | None = None):
    """Restores ``step`` (default: latest committed) onto the shardings of ``abstract_state``
    (whose layout must be the one the checkpoint was saved in). Returns (state, meta dict)."""
    step = self.latest_step() if step is None else step
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    live = _live_phases(abstract_state)
    if meta.get("live", live) != live:
      raise ValueError(f"checkpoint at step {step} holds phases {meta['live']} live, the run "
                       f"expects {live} (train.num_steps or method.order changed?)")
    args = {f"{name}_{k}": ocp.args.StandardRestore(tree)
            for k in live for name, tree in _trees(abstract_state, k).items()}
    r = self.manager.restore(step, args=ocp.args.Composite(**args))
    experts, expert_opt = list(abstract_state.experts), list(abstract_state.expert_opt)
    fakes, fake_opt = list(abstract_state.fakes), list(abstract_state.fake_opt)
    ema = list(abstract_state.ema)
    for k in live:
      experts[k], expert_opt[k] = r[f"expert_{k}"], r[f"expert_opt_{k}"]
      fakes[k], fake_opt[k] = r[f"fake_{k}"], r[f"fake_opt_{k}"]
      if ema[k] is not None:
        ema[k] = r[f"ema_{k}"]
    with ocp.StandardCheckpointer() as ckptr:
      for k in _frozen_phases(abstract_state):
        for name, trees in (("expert", experts), ("ema", ema)):
          if trees[k] is None:
            continue
          path = paths.join(self.frozen_directory, f"{name}_{k}")
          if not paths.path(path).is_dir():
            raise FileNotFoundError(f"frozen {name} of phase {k + 1} missing at {path} (the "
                                    f"checkpoint at step {step} needs it)")
          trees[k] = ckptr.restore(path, trees[k])
    state = ts.TrainState(step=_put(jnp.asarray(meta["step"], jnp.int32), abstract_state.step),
                          rng=_put(jnp.asarray(np.asarray(meta["rng"], np.uint32)),
                                   abstract_state.rng),
                          experts=tuple(experts), expert_opt=tuple(expert_opt),
                          fakes=tuple(fakes), fake_opt=tuple(fake_opt), ema=tuple(ema))
    return state, meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _put(value, like):
  sharding = getattr(like, "sharding", None)
  return value if sharding is None else jax.device_put(value, sharding)


# Fields that fix the state's layout and the phase plan: a checkpoint resumes only a run that
# agrees on all of them (optimiser settings, evaluation and logging may change on resume).
PLAN_FIELDS = ("method", "num_steps", "num_phases", "steps_per_phase", "shift", "grid_times",
               "phase_order", "schedule", "teacher.type", "train.num_steps", "train.phase_steps",
               "generator.lora_rank", "fake.lora_rank", "generator.ema_decay", "gan.enabled")
# Plan fields added after checkpoints were written: a config without one has this value.
_DEFAULTS = {"train.phase_steps": [], "steps_per_phase": []}


def check_resumable(saved: dict, config, where: str) -> None:
  """ValueError naming every plan field in which ``config`` differs from the checkpoint's."""
  def get(tree, dotted):
    for part in dotted.split("."):
      if not isinstance(tree, dict) or part not in tree:
        return _DEFAULTS.get(dotted)
      tree = tree[part]
    return list(tree) if isinstance(tree, (list, tuple)) else tree

  now = config.to_dict()
  diff = [f"{f}={get(now, f)!r} (checkpoint: {get(saved, f)!r})" for f in PLAN_FIELDS
          if get(now, f) != get(saved, f)]
  if diff:
    raise ValueError(f"the checkpoint in {where} was written by another run: "
                     + ", ".join(diff) + "; use a new --workdir or the checkpoint's values")
