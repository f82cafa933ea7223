"""Exact Gaussian-mixture teachers (configs/gmm.py): the engine's proof ground.

The teacher is the closed-form velocity of a class-conditional mixture (teachers.gmm_teacher),
so every equation can be checked against the exact answer. Experts and fake scores are MLPs
that start from a regression onto that velocity (``fit``), cached in ``<workdir>/teacher_fit``.
The trees carry no logical axes: the rule-free FSDP tactic shards them (replicated at these
sizes), so the mesh may only use the batch axes.
"""

from __future__ import annotations

import time
from types import MappingProxyType

import flax
import jax

from pdmd_jax import families
from pdmd_jax import models
from pdmd_jax import paths
from pdmd_jax import schedule as S
from pdmd_jax import teachers
from pdmd_jax import validation as V
from pdmd_jax.data import gmm as gmm_lib
from pdmd_jax.families.gmm import fit


def validate(config, plan, *, files: bool = True):  # pylint: disable=unused-argument
  t = config.teacher
  V.choice(config, "teacher.dataset", gmm_lib.DATASETS)
  V.positive(config, "teacher.dim", integer=True)
  if t.dataset == "ring" and t.dim != 2:
    V.fail("teacher.dim", t.dim, "[2] for dataset 'ring' (use dataset 'random' for other dims)")
  V.positive(config, "teacher.num_modes", integer=True)
  V.positive(config, "teacher.num_classes", integer=True)
  if t.num_classes > t.num_modes:
    V.fail("teacher.num_classes", t.num_classes, f"at most teacher.num_modes={t.num_modes}")
  V.positive(config, "teacher.radius")
  V.positive(config, "teacher.std")
  V.choice(config, "model.name", ("mlp",))
  for f in ("model.width", "model.depth", "model.time_dim", "init_fit.steps", "init_fit.batch_size"):
    V.positive(config, f, integer=True)
  if config.model.time_dim % 2:
    V.fail("model.time_dim", config.model.time_dim, "an even integer")
  V.positive(config, "init_fit.lr")
  if any(config.mesh.get(a, 1) != 1 for a in ("tensor", "context")):
    V.fail("mesh", dict(config.mesh), "tensor = context = 1 for the mixture teacher (its MLPs "
           "carry no logical axes; tensor and context parallelism follow them)")


def build(config, plan, mesh, *, abstract: bool = False, workdir: str | None = None):  # pylint: disable=unused-argument
  """The exact mixture teacher; experts and fakes start from the MLP fit to its velocity."""
  t, m = config.teacher, config.model
  sched = S.get_schedule(config.schedule)
  gmm = gmm_lib.make(t.dataset, dim=t.dim, num_modes=t.num_modes, num_classes=t.num_classes,
                     radius=t.radius, std=t.std, seed=t.seed)
  teacher = teachers.gmm_teacher(sched, t.num_classes, t.guidance_scale)
  net, params = models.build(m.name, dim=t.dim, num_classes=t.num_classes, width=m.width,
                             depth=m.depth, time_dim=m.time_dim, seed=config.seed)
  if abstract:
    params = jax.eval_shape(lambda: params)
  else:
    params = _fit(config, workdir, net, params, teacher, gmm, sched)
  return families.Family(
      name="gmm", teacher=teacher, teacher_params=jax.eval_shape(lambda: gmm) if abstract else gmm,
      teacher_axes=None, apply=net.apply,
      fake_init=params, fake_axes=None, expert_init=params, expert_axes=None,
      sample_shape=(t.dim,), num_classes=t.num_classes, evaluator="gmm_eval",
      sample_cond=lambda key, shape: gmm_lib.sample_labels(key, gmm, t.num_classes, shape),
      extras=MappingProxyType({"gmm": gmm}))


def _fit(config, workdir, net, params, teacher, gmm, sched):
  """The MLP fit to the exact teacher velocity, cached in ``<workdir>/teacher_fit.msgpack``
  (every process fits the same numbers; process 0 writes the cache, atomically)."""
  path = paths.join(paths.absolute(workdir), "teacher_fit.msgpack") if workdir else None
  if path and paths.exists(path):
    return flax.serialization.from_bytes(params, paths.read_bytes(path))
  f = config.init_fit
  t0 = time.time()
  params, mse = fit.fit_to_gmm_teacher(
      net.apply, params, teacher, gmm, sched, num_classes=config.teacher.num_classes,
      steps=f.steps, batch_size=f.batch_size, lr=f.lr, seed=config.seed, p_uncond=f.p_uncond,
      shift=config.shift)
  print(f"Fitted the MLP to the exact teacher velocity: mse {mse:.3g} ({time.time() - t0:.1f}s)")
  if path and jax.process_index() == 0:
    paths.write_bytes(path, flax.serialization.to_bytes(jax.device_get(params)))
  return params
