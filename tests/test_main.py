"""End to end through main.py (tiny config): train, resume, sample, eval."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, *extra):
  # The runs share a compilation cache beside the workdir, as a user's repeated runs do.
  env = {**os.environ, "PDMD_JAX_CACHE": os.path.join(os.path.dirname(workdir), "xla")}
  env.pop("XLA_FLAGS", None)        # a user's single-device run
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                         "--config=" + os.path.join(ROOT, "configs", "gmm.py") + ":runlocal",
                         f"--workdir={workdir}", *extra],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=True)


@pytest.mark.slow
def test_train_resume_sample_eval(tmp_path):
  w = str(tmp_path / "run")
  first = _main(w)
  assert "phase 4/4" in first.stderr                  # tqdm progress bar per phase
  assert "| distilled (few-step) |" in first.stdout    # the metrics table
  metrics = json.load(open(os.path.join(w, "metrics.json")))
  assert metrics["student/num_modes"] == 8 and metrics["step"] == 8
  assert glob.glob(os.path.join(w, "tensorboard", "events.out.tfevents.*"))
  assert os.path.getsize(os.path.join(w, "samples_final.png")) > 10_000
  assert os.path.exists(os.path.join(w, "metrics_final.md"))

  second = _main(w)
  assert "Resumed from" in second.stdout and "at step 8" in second.stdout
  again = json.load(open(os.path.join(w, "metrics.json")))
  for key, value in metrics.items():
    if key.startswith(("student/", "teacher/", "boundary_")):
      assert again[key] == value, key

  _main(w, "--mode=sample")
  data = np.load(os.path.join(w, "samples_step8.npz"))
  assert data["samples"].shape == (500, 2) and data["labels"].shape == (500,)
  assert data["trajectory"].shape == (5, 500, 2) and np.all(np.isfinite(data["samples"]))
  assert set(np.unique(data["labels"])) <= {0, 1}

  _main(w, "--mode=eval")
  assert os.path.exists(os.path.join(w, "metrics_step8.md"))
