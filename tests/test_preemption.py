"""Preemption of `python main.py` (a subprocess, as a scheduler sees it).

SIGTERM (schedulers, TPU maintenance) ends the run with exit 0 after the step in flight is
checkpointed, naming the step (in a multi-process run: the same step in every process, even if
only one got the signal); kill -9 at random moments while it saves every step never
leaves a checkpoint that restores wrong, and the resumed run ends where an uninterrupted one
does, bit for bit. (In-process, with every recipe term on: test_checkpointing.)
"""

import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from pdmd_jax import configs
from pdmd_jax import launch
from pdmd_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/gmm.py:method=phased_dmd_sgts,steps=4,phases=2,runlocal"
pytestmark = pytest.mark.slow     # each test starts several main.py processes (~2-4 min)


def _args(workdir, steps, ckpt_every):
  return [sys.executable, os.path.join(ROOT, "main.py"), f"--config={os.path.join(ROOT, SPEC)}",
          f"--workdir={workdir}", f"--config.train.num_steps={steps}",
          f"--config.train.ckpt_every={ckpt_every}"]


def _env(tmp_path):
  env = {**os.environ, "PDMD_JAX_CACHE": str(tmp_path / "xla"), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)      # one device, as a user's run
  return env


def _config(steps, ckpt_every):
  c = configs.load(SPEC)
  c.train.num_steps, c.train.ckpt_every = steps, ckpt_every
  return c


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _wait_for_step(proc, workdir, step, timeout=300):
  t0 = time.time()
  while not _steps(workdir) or _steps(workdir)[-1] < step:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() - t0 < timeout, "no checkpoint appeared"
    time.sleep(0.05)


def test_sigterm_saves_the_step_in_flight_and_exits_0(tmp_path):
  w = str(tmp_path / "run")
  proc = subprocess.Popen(_args(w, 2000, 4), env=_env(tmp_path), cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  _wait_for_step(proc, w, 4)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  m = re.search(r"Preempted \(SIGTERM\) at step (\d+)", err)
  assert m, err[-3000:]
  step = int(m.group(1))
  assert 4 <= step < 2000 and _steps(w)[-1] == step
  assert f"stopped at step {step} after saving" in out
  _, state = trainer.restore_latest(_config(2000, 4), w, jax.devices()[:1])
  assert int(state.step) == step
  chex.assert_tree_all_finite(jax.device_get(state))


def test_kill_9_while_saving_never_leaves_a_bad_checkpoint(tmp_path):
  """ckpt_every = 1 (a save per step), SIGKILL at >= 10 random moments, resume each time (every
  latest checkpoint restores, finite, at its step); the final state equals an uninterrupted
  run's bit for bit."""
  steps, dev = 48, jax.devices()[:1]
  config = _config(steps, 1)
  straight = str(tmp_path / "straight")
  subprocess.run(_args(straight, steps, 1), env=_env(tmp_path), cwd=ROOT, check=True,
                 capture_output=True)
  w = str(tmp_path / "killed")
  rng = np.random.default_rng(0)
  kills = 0
  for _ in range(16):
    proc = subprocess.Popen(_args(w, steps, 1), env=_env(tmp_path), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = _steps(w)[-1] if _steps(w) else 0
    if start >= steps - 2:
      proc.wait(timeout=300)
      break
    _wait_for_step(proc, w, start + 1)
    time.sleep(rng.uniform(0.0, 1.0))        # somewhere inside the following saves
    proc.kill()
    proc.wait()
    kills += 1
    latest = _steps(w)[-1]
    _, state = trainer.restore_latest(config, w, dev)      # never a half-written checkpoint
    assert int(state.step) == latest
    chex.assert_tree_all_finite(jax.device_get(state))
  assert kills >= 10
  subprocess.run(_args(w, steps, 1), env=_env(tmp_path), cwd=ROOT, check=True,
                 capture_output=True)
  (_, a), (_, b) = (trainer.restore_latest(config, d, dev) for d in (straight, w))
  assert int(a.step) == int(b.step) == steps
  chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b), strict=True)


def test_sigterm_to_one_process_stops_every_process_at_one_step(tmp_path):
  """2 processes x 2 devices: SIGTERM reaches process 1 only (as a scheduler may deliver it);
  JAX's coordination service agrees on the step, both save it collectively and exit 0."""
  w, port = str(tmp_path / "run"), launch.free_port()
  base = _env(tmp_path)
  procs = [subprocess.Popen(_args(w, 2000, 4) + ["--distributed"], cwd=ROOT, text=True,
                            env=launch.process_env(i, 2, port, cpu_devices=2, base=base),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  _wait_for_step(procs[0], w, 4)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300) for p in procs]
  steps = []
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    steps.append(int(re.search(r"Preempted \(SIGTERM\) at step (\d+)", err).group(1)))
  assert steps[0] == steps[1] == _steps(w)[-1]
  _, state = trainer.restore_latest(_config(2000, 4), w, jax.devices()[:1])
  assert int(state.step) == steps[0]
