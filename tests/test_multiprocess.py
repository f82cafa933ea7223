"""Multi-process runs (jax.distributed over localhost, gloo collectives) equal single-process ones.

`python -m pdmd_jax.launch --num_processes=2 --cpu_devices=4 -- main.py ...` trains the
mixture's 2-phase Phased DMD on 2 processes x 4 CPU devices; this test process (1 process x 8
devices, conftest) trains the same config and restores the 2-process checkpoint onto its own
8 devices (a topology change). Metrics and every parameter agree to float32 reduction-order
tolerance; only process 0 writes logs, metrics and images.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from pdmd_jax import configs
from pdmd_jax import distributed
from pdmd_jax import launch
from pdmd_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/gmm.py:method=phased_dmd_sgts,steps=4,phases=2,runlocal"
TOL = dict(rtol=1e-4, atol=1e-5)   # gloo vs in-process all-reduces may order sums differently


def _env(tmp_path):
  env = {**os.environ, "PDMD_JAX_CACHE": str(tmp_path / "xla"),
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}   # as this process compiles (conftest)
  env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.long
def test_two_processes_equal_one(tmp_path):
  w2, w1 = str(tmp_path / "p2"), str(tmp_path / "p1")
  config = configs.load(SPEC)
  assert jax.device_count() == 8
  one = trainer.train_and_evaluate(config, w1, evaluate_phases=False, verbose=False)
  os.makedirs(w2)       # the mixture fit is deterministic: the 2 processes reuse this run's
  shutil.copy(os.path.join(w1, "teacher_fit.msgpack"), w2)
  r = subprocess.run([sys.executable, "-m", "pdmd_jax.launch", "--num_processes=2",
                      "--cpu_devices=4", f"--logdir={tmp_path / 'logs'}", "--",
                      os.path.join(ROOT, "main.py"), f"--config={os.path.join(ROOT, SPEC)}",
                      f"--workdir={w2}", "--config.eval.every_phase=False"],
                     env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "| distilled (few-step) |" in r.stdout                      # process 0's table
  log1 = open(tmp_path / "logs" / "process_1.log").read()
  assert "| distilled" not in log1 and "phase 1/2" not in log1       # process 1 stays quiet
  assert len(glob.glob(os.path.join(w2, "tensorboard", "*"))) == 1   # one writer
  assert not os.path.exists(os.path.join(w2, "metrics_phase1.md"))  # eval.every_phase=False
  two = json.load(open(os.path.join(w2, "metrics.json")))
  keys = [k for k, v in one.items() if k.startswith(("student/", "boundary_"))
          and isinstance(v, float)]
  assert "student/num_modes" in keys and "student/sliced_wasserstein" in keys
  for k in keys:
    np.testing.assert_allclose(two[k], one[k], **TOL, err_msg=k)
  # The 2 x 4 checkpoint restores onto this process's 8 devices and equals the 1 x 8 run.
  (_, s2), (_, s1) = (trainer.restore_latest(config, w) for w in (w2, w1))
  assert int(s2.step) == int(s1.step) == config.train.num_steps
  chex.assert_trees_all_close(jax.device_get(s2), jax.device_get(s1), **TOL)
  init = trainer.initial_state(trainer.build(config, w1)).experts[0]
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(s1.experts[0]),
                       jax.device_get(init))
  assert max(jax.tree.leaves(moved)) > 20 * TOL["atol"]   # trained: moved far beyond the tolerance


def test_launcher_env_and_errors(tmp_path):
  env = launch.process_env(1, 2, 1234, cpu_devices=4, base={"XLA_FLAGS": "--foo "
                           "--xla_force_host_platform_device_count=8"})
  assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:1234"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
  assert launch.process_env(1, 2, 1, gpus_per_process=2, base={})["CUDA_VISIBLE_DEVICES"] == "2,3"
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("localhost:1", None, 0)
  with pytest.raises(ValueError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
    distributed.initialize("localhost:1", 2, 2)
  # A process whose coordinator never comes: exit 2 and one line naming address and timeout.
  env = _env(tmp_path)
  env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{launch.free_port()}", JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID="1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--distributed",
                      "--distributed_timeout=3", f"--config={os.path.join(ROOT, SPEC)}",
                      f"--workdir={tmp_path / 'w'}"], env=env, cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "could not reach the coordinator at localhost:" in r.stderr and "within 3 s" in r.stderr
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow      # two Wan runs (~3 min)
def test_two_processes_equal_one_on_the_tiny_wan(tmp_path):
  """configs/wan22.py:tiny (MoE teacher, LoRA experts on each phase's expert, full fake pairs,
  blockwise attention, scanned + rematerialised blocks), batch 8, prompt embeddings streamed
  from a file (each process reads its 4 batch columns): 2 processes x 4 devices equal 1 x 8
  (this process)."""
  from pdmd_jax.families import prompts  # pylint: disable=import-outside-toplevel
  spec = "configs/wan22.py:tiny"
  config = configs.load(spec)
  config.train.batch_size = 8
  dim = trainer.build(config).asm.abstract_y["context"].shape[-1]
  emb = str(tmp_path / "prompts.safetensors")
  prompts.save_embeddings(emb, prompts.random_embeddings(24, 8, dim, seed=3))
  config.data.embeddings, config.data.stream, config.data.eval_prompts = emb, True, 8
  extra = ["--config.train.batch_size=8", f"--config.data.embeddings={emb}",
           "--config.data.stream=True", "--config.data.eval_prompts=8"]
  w2, w1 = str(tmp_path / "p2"), str(tmp_path / "p1")
  r = subprocess.run([sys.executable, "-m", "pdmd_jax.launch", "--num_processes=2",
                      "--cpu_devices=4", f"--logdir={tmp_path / 'logs'}", "--",
                      os.path.join(ROOT, "main.py"), f"--config={os.path.join(ROOT, spec)}",
                      f"--workdir={w2}", *extra], env=_env(tmp_path), cwd=ROOT,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  one = trainer.train_and_evaluate(config, w1, evaluate_phases=False, verbose=False)
  two = json.load(open(os.path.join(w2, "metrics.json")))
  for k in ("mse_to_teacher", "student/diversity", "boundary_1/mse_to_teacher"):
    np.testing.assert_allclose(two[k], one[k], **TOL, err_msg=k)
  (_, s2), (_, s1) = (trainer.restore_latest(config, w) for w in (w2, w1))
  assert int(s2.step) == int(s1.step) == config.train.num_steps
  chex.assert_trees_all_close(jax.device_get(s2), jax.device_get(s1), **TOL)


@pytest.mark.slow      # two processes start, validate and stop (~20 s)
def test_mesh_that_does_not_fit_the_processes_is_refused_before_anything_is_written(tmp_path):
  w = tmp_path / "w"
  r = subprocess.run([sys.executable, "-m", "pdmd_jax.launch", "--num_processes=2",
                      "--cpu_devices=4", f"--logdir={tmp_path / 'logs'}", "--",
                      os.path.join(ROOT, "main.py"), f"--config={os.path.join(ROOT, SPEC)}",
                      f"--workdir={w}", "--config.mesh.data=3"], env=_env(tmp_path), cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert ("Configuration error: config.mesh=" in r.stderr and
          "product is 8 devices (2 processes x 4)" in r.stderr), r.stderr[-3000:]
  assert not w.exists()
