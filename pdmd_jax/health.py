"""In-loop health of a distillation run: cross-seed diversity, motion and saturation.

Every ``health.every`` generator updates the current few-step sampler draws a fixed small
set (every class x ``health.seeds`` noises) and reports, relative to the teacher's many-step
samples from the same noise (computed once):
- diversity: mean same-class pairwise L2 distance between seeds (the collapse DMD is known
  for shows up here first), as a fraction of the teacher's;
- feature cosine (digits): same-class pairwise cosine of the classifier's features, and its
  excess over the teacher's (> 0 = less diverse in content, not just in pixels);
- class coverage (digits, unconditional runs: every sample from the null class): the entropy of
  the classes the samples read as and their total variation from the teacher's;
- saturation: fraction of values beyond [-1.1, 1.1] (image/video data);
- motion (videos): mean optical-flow magnitude as a fraction of the teacher's.
With ``health.min_fraction`` > 0 the run stops early (after a checkpoint) once diversity or
motion falls below that fraction of the teacher's. Every report is also kept, with its update
and phase, in ``<workdir>/health.json`` (the curves of diversity and motion over training; a
resumed run keeps the entries up to its checkpoint).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from pdmd_jax import families
from pdmd_jax import paths
from pdmd_jax import sampling
from pdmd_jax.evaluation import image_eval
from pdmd_jax.evaluation import image_metrics

HISTORY = "health.json"


def load_history(workdir: str | None, step: int) -> list[dict]:
  """The run's earlier health reports up to update ``step`` (where a resumed run restarts)."""
  if not workdir or not paths.exists(paths.join(workdir, HISTORY)):
    return []
  return [r for r in json.loads(paths.read_bytes(paths.join(workdir, HISTORY)))
          if r["step"] <= step]


class HealthMonitor:
  """Call with the train state; returns a dict of host floats (and ``collapsed``: a reason or "")."""

  def __init__(self, run, *, seeds: int = 4, min_fraction: float = 0.0, seed: int = 4321):
    self.run = run
    self.min_fraction = min_fraction
    self.video = len(run.sample_shape) == 4
    self.image = len(run.sample_shape) >= 3
    self.labels = np.tile(np.arange(run.num_classes), seeds).astype(np.int32)
    family = getattr(run, "family", None)
    self.unconditional = image_eval.unconditional(run)
    if self.unconditional:       # one group: the spread over every sample of the null class
      self.labels = np.full_like(self.labels, run.num_classes)
    self.z = jax.random.normal(jax.random.PRNGKey(seed), (len(self.labels),) + run.sample_shape)
    # digits: the classifier's features
    self._features = (jax.jit(family.features) if family is not None
                      and family.features is not None else None)
    self._student = jax.jit(lambda e, tp, z, y: families.decode(family, sampling.few_step_sample(
        run.plan, run.step_cfg.experts_apply(tp), e, z, y)[-1]))
    c = run.config
    teacher = jax.jit(lambda tp, z, y: families.decode(family, sampling.teacher_sample(
        run.teacher, tp, run.plan, z, y, substeps=c.eval.teacher_substeps,
        shift_value=c.shift)[-1]))
    self.reference = self._stats(np.asarray(teacher(run.teacher_params, self.z,
                                                    jnp.asarray(self.labels))))

  def _stats(self, x) -> dict:
    out = {"diversity": image_metrics.pixel_l2(x, self.labels)}
    if self._features is not None:
      out["feature_cosine"] = image_metrics.feature_cosine(
          np.asarray(self._features(jnp.asarray(x))), self.labels)
    if self._features is not None and self.unconditional:
      logits = image_metrics.load_classifier().logits(np.clip(x, -1, 1))
      out["class_histogram"] = image_metrics.class_histogram(logits)
    if self.image:
      out["saturation"] = image_metrics.saturation(x)
    if self.video:
      from pdmd_jax.evaluation import motion_metrics  # pylint: disable=import-outside-toplevel
      out["motion"] = float(motion_metrics.motion_report(np.clip(x, -1, 1))["mean_flow"])
    return out

  def __call__(self, state) -> dict:
    x = np.asarray(self._student(self.run.experts(state), self.run.teacher_params, self.z,
                                 jnp.asarray(self.labels)))
    s = self._stats(x)
    out = {k: v for k, v in s.items() if k != "class_histogram"}
    if "class_histogram" in s:
      out.update(image_metrics.class_coverage(s["class_histogram"],
                                              self.reference["class_histogram"]))
    out["diversity_vs_teacher"] = s["diversity"] / max(self.reference["diversity"], 1e-12)
    if self.video:
      out["motion_vs_teacher"] = s["motion"] / max(self.reference["motion"], 1e-12)
    if "feature_cosine" in s:    # > 0: samples of a class more alike than the teacher's
      out["feature_cosine_excess"] = s["feature_cosine"] - self.reference["feature_cosine"]
    reasons = [f"{k}={out[k]:.3f} < {self.min_fraction}" for k in
               ("diversity_vs_teacher", "motion_vs_teacher")
               if self.min_fraction > 0 and k in out and out[k] < self.min_fraction]
    out["collapsed"] = "; ".join(reasons)
    return out
