"""In-loop health: diversity against the teacher's, and the collapse early stop."""

import json
import os
import types

import jax
import numpy as np
import pytest

from pdmd_jax import configs
from pdmd_jax import health
from pdmd_jax import methods
from pdmd_jax import schedule as S
from pdmd_jax import teachers
from pdmd_jax import trainer
from pdmd_jax.data import gmm as gmm_lib


def _run(expert_apply):
  """The fields HealthMonitor reads: the exact ring teacher and experts given by ``expert_apply``."""
  sched = S.flow_matching()
  gmm = gmm_lib.make("ring", dim=2, num_modes=8, num_classes=2, radius=2.0, std=0.15, seed=0)
  plan = methods.make_plan("phased_dmd", 4, 4, 3.0)
  step_cfg = types.SimpleNamespace(experts_apply=lambda tp: expert_apply)
  config = configs.load("configs/gmm.py:runlocal")
  return types.SimpleNamespace(sample_shape=(2,), num_classes=2, plan=plan, step_cfg=step_cfg,
                               experts=lambda state: state.experts,
                               teacher=teachers.gmm_teacher(sched, 2), teacher_params=gmm,
                               config=config)


def test_diversity_is_relative_to_the_teachers_and_collapse_is_named():
  # v = s x / t: an Euler step t -> t' multiplies x by 1 + s (t' - t) / t. s = 1 lands every
  # sample exactly on 0 (t' = 0 on the last step): zero diversity. s = 0 keeps the noise z.
  apply = lambda p, x, t, y: p * x / t[:, None]
  experts = lambda s: tuple(np.float32(s) for _ in range(4))
  monitor = health.HealthMonitor(_run(apply), seeds=6, min_fraction=0.2)
  # The teacher's same-class spread: 4 modes per class on a circle of radius 2, mean pairwise
  # distance between seeds of the same class well above the modes' own std.
  assert 1.5 < monitor.reference["diversity"] < 4.0
  collapsed = monitor(types.SimpleNamespace(experts=experts(1.0)))
  assert collapsed["diversity"] == pytest.approx(0.0, abs=1e-6)
  assert collapsed["collapsed"].startswith("diversity_vs_teacher=0.000 < 0.2")
  noise = monitor(types.SimpleNamespace(experts=experts(0.0)))   # x = z ~ N(0, I) in 2-D
  # E|z - z'| for independent 2-D standard normals is sqrt(pi) ~ 1.77 (12 pairs per class).
  assert noise["diversity"] == pytest.approx(np.sqrt(np.pi), rel=0.35)
  assert noise["collapsed"] == ""
  assert noise["diversity_vs_teacher"] == pytest.approx(
      noise["diversity"] / monitor.reference["diversity"])
  assert "feature_cosine" not in noise        # no feature map: no feature diversity


def test_feature_diversity_is_reported_when_the_family_has_features():
  """With features (here x -> x + (5, 5)), a collapse to one point per class has same-class
  cosine 1 and the excess over the teacher's is reported; spread samples are below 1."""
  apply = lambda p, x, t, y: p * x / t[:, None]
  run = _run(apply)
  run.family = types.SimpleNamespace(features=lambda x: x + 5.0)
  monitor = health.HealthMonitor(run, seeds=6)
  collapsed = monitor(types.SimpleNamespace(experts=tuple(np.float32(1.0) for _ in range(4))))
  assert collapsed["feature_cosine"] == pytest.approx(1.0, abs=1e-6)
  teacher = monitor.reference["feature_cosine"]
  assert teacher < 0.999
  assert collapsed["feature_cosine_excess"] == pytest.approx(1.0 - teacher, abs=1e-6)


def test_unconditional_run_samples_the_null_class_and_reports_class_coverage(monkeypatch):
  """With Family.unconditional every health sample comes from the null class (here the only
  label with a non-zero velocity, so a collapse shows only if the null label reached the
  experts) and the report adds class coverage against the teacher's (classes read as the sign
  of the first coordinate: the ring's teacher fills both half-planes)."""
  from pdmd_jax.evaluation import image_metrics  # pylint: disable=import-outside-toplevel
  sign = lambda x: np.eye(2)[(np.asarray(x)[:, 0] > 0).astype(int)]
  monkeypatch.setattr(image_metrics, "load_classifier",
                      lambda *a: image_metrics.Classifier(None, sign, {}))
  apply = lambda p, x, t, y: p * x / t[:, None] * (y[:, None] == 2)
  run = _run(apply)
  run.family = types.SimpleNamespace(features=lambda x: x + 5.0, unconditional=True)
  monitor = health.HealthMonitor(run, seeds=20)
  np.testing.assert_array_equal(monitor.labels, 2)
  assert 0.3 < monitor.reference["class_histogram"][0] < 0.7
  collapsed = monitor(types.SimpleNamespace(experts=tuple(np.float32(1.0) for _ in range(4))))
  assert collapsed["diversity"] == pytest.approx(0.0, abs=1e-6)
  assert collapsed["class_entropy"] == pytest.approx(0.0)        # x = 0 everywhere: one class
  assert collapsed["class_tv_reference"] == pytest.approx(
      monitor.reference["class_histogram"][1])
  spread = monitor(types.SimpleNamespace(experts=tuple(np.float32(0.0) for _ in range(4))))
  assert spread["class_entropy"] > 0.9                  # x = z: both half-planes
  assert "class_histogram" not in spread


@pytest.mark.parametrize("collapse_at", [2, 4])   # 2: no regular save there; 4: a phase end
def test_trainer_stops_early_on_collapse_after_a_checkpoint(gmm_config, tmp_path, monkeypatch,
                                                            collapse_at):
  """A collapse report stops the loop at that step, after saving it (once), and says why."""
  config = gmm_config("method=phased_dmd_sgts,steps=4,phases=2,runlocal")
  config.init_fit.steps = 10
  config.train.ckpt_every = 8
  config.health = configs.health(every=2, seeds=2, min_fraction=0.5)
  calls = []

  class Collapsing:
    def __init__(self, run, **kw):
      del run, kw

    def __call__(self, state):
      calls.append(int(state.step))
      reason = "diversity_vs_teacher=0.100 < 0.5" if int(state.step) >= collapse_at else ""
      return {"diversity_vs_teacher": 0.1 if reason else 1.0, "collapsed": reason}

  monkeypatch.setattr(health, "HealthMonitor", Collapsing)
  w = str(tmp_path / "run")
  out = trainer.train_and_evaluate(config, w, devices=jax.devices()[:1], verbose=False)
  assert out == {"stopped_at_step": collapse_at,
                 "stopped_early": "diversity_vs_teacher=0.100 < 0.5"}
  assert calls == list(range(2, collapse_at + 1, 2))
  saved = sorted(int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit())
  assert saved[-1] == collapse_at  # the stop is saved; nothing after it
  history = json.load(open(os.path.join(w, health.HISTORY)))   # the curve, one entry per check
  assert [r["step"] for r in history] == calls
  assert [r["phase"] for r in history] == [(s - 1) // 4 for s in calls]
  assert [bool(r["collapsed"]) for r in history] == [s >= collapse_at for s in calls]
  # a run resumed from update 2 keeps the reports up to it and drops the later ones
  assert [r["step"] for r in health.load_history(w, 2)] == [2]
