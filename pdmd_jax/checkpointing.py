"""Orbax checkpoints: one item per generator expert, fake score and optimizer state.

A step directory holds ``expert_<k>``, ``expert_opt_<k>``, ``fake_<k>``, ``fake_opt_<k>`` for
every phase k, ``meta`` (JSON: step, rng) and ``config`` (JSON). The teacher is never saved.
Orbax writes into a temporary directory and renames it on commit, so a save killed mid-write
leaves a ``*.orbax-checkpoint-tmp-*`` directory that ``latest_step`` ignores: a half-written
checkpoint is never restored. Restores take an abstract state carrying the target shardings.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pdmd_jax import train_step as ts


def _items(num_phases: int):
  names = ["meta", "config"]
  for k in range(num_phases):
    names += [f"expert_{k}", f"expert_opt_{k}", f"fake_{k}", f"fake_opt_{k}"]
  return tuple(names)


class Checkpointer:
  """Saves and restores a TrainState under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, num_phases: int, max_to_keep: int = 3, async_save: bool = True):
    self.num_phases = num_phases
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=_items(num_phases),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, state: ts.TrainState, config_json: dict, extra: dict | None = None):
    step = int(jax.device_get(state.step))
    meta = {"step": step, "rng": [int(v) for v in np.asarray(jax.device_get(state.rng))],
            **(extra or {})}
    args = {"meta": ocp.args.JsonSave(meta), "config": ocp.args.JsonSave(config_json)}
    for k in range(self.num_phases):
      args[f"expert_{k}"] = ocp.args.StandardSave(state.experts[k])
      args[f"expert_opt_{k}"] = ocp.args.StandardSave(state.expert_opt[k])
      args[f"fake_{k}"] = ocp.args.StandardSave(state.fakes[k])
      args[f"fake_opt_{k}"] = ocp.args.StandardSave(state.fake_opt[k])
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, abstract_state: ts.TrainState, step: int | None = None):
    """Restores ``step`` (default: latest committed) onto the shardings of ``abstract_state``.

    Returns (state, meta dict).
    """
    step = self.latest_step() if step is None else step
    args = {"meta": ocp.args.JsonRestore()}
    for k in range(self.num_phases):
      for name, tree in ((f"expert_{k}", abstract_state.experts[k]),
                         (f"expert_opt_{k}", abstract_state.expert_opt[k]),
                         (f"fake_{k}", abstract_state.fakes[k]),
                         (f"fake_opt_{k}", abstract_state.fake_opt[k])):
        args[name] = ocp.args.StandardRestore(tree)
    r = self.manager.restore(step, args=ocp.args.Composite(**args))
    meta = r["meta"]
    rng = jnp.asarray(np.asarray(meta["rng"], dtype=np.uint32))
    if getattr(abstract_state.rng, "sharding", None) is not None:
      rng = jax.device_put(rng, abstract_state.rng.sharding)
    step_arr = jnp.asarray(meta["step"], jnp.int32)
    if getattr(abstract_state.step, "sharding", None) is not None:
      step_arr = jax.device_put(step_arr, abstract_state.step.sharding)
    state = ts.TrainState(
        step=step_arr, rng=rng,
        experts=tuple(r[f"expert_{k}"] for k in range(self.num_phases)),
        expert_opt=tuple(r[f"expert_opt_{k}"] for k in range(self.num_phases)),
        fakes=tuple(r[f"fake_{k}"] for k in range(self.num_phases)),
        fake_opt=tuple(r[f"fake_opt_{k}"] for k in range(self.num_phases)))
    return state, meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
