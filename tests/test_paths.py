"""Workdirs given as URLs (gs://...) go through etils.epath, never a local folder named "gs:".

fsspec's in-memory filesystem stands in for Google Cloud Storage (epath's gs:// backend is
fsspec's "gcs" protocol): the mixture fit cache, an evaluation's tables, JSON and sample plot,
the TensorBoard events and the sampler's .npz all land in it. (Orbax checkpoints speak gs://
through tensorstore's own GCS driver, which has no in-memory stand-in here.)
"""

import concurrent.futures
import importlib
import os
import subprocess
import sys

import fsspec
import jax
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pdmd_jax import configs
from pdmd_jax import paths
from pdmd_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def memory_gcs(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)             # a stray local "gs:" folder would appear here
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, MemoryFileSystem, clobber=True)
  MemoryFileSystem.store.clear()
  yield MemoryFileSystem.store
  MemoryFileSystem.store.clear()
  for protocol in ("gs", "gcs"):
    importlib.import_module("fsspec.registry")._registry.pop(protocol, None)   # pylint: disable=protected-access
  assert not os.path.exists(tmp_path / "gs:")


def test_a_run_writes_its_files_through_the_url(memory_gcs):
  w = "gs://bucket/run"
  paths.makedirs(w)
  config = configs.load("configs/gmm.py:runlocal")
  config.init_fit.steps = 2
  run = trainer.build(config, w, devices=jax.devices()[:1])        # writes the fit cache
  state = trainer.initial_state(run)
  out = trainer.evaluate(run, state, w, tag="init", verbose=False)
  writer = trainer._writer(w)                                       # pylint: disable=protected-access
  writer.add_scalar("train/fake_loss", 1.5, 1)
  writer.close()
  files = set(memory_gcs)
  for name in ("teacher_fit.msgpack", "eval_init.json", "metrics_init.md", "samples_init.png"):
    assert f"{w}/{name}" in files, (name, files)
  assert any(f.startswith(f"{w}/tensorboard/events.out.tfevents") for f in files)
  assert paths.read_bytes(f"{w}/samples_init.png")[:4] == b"\x89PNG"
  assert f"{out['student/num_modes']:g}" in paths.read_bytes(f"{w}/metrics_init.md").decode()
  again = trainer.build(config, w, devices=jax.devices()[:1])       # the cached fit is read back
  for a, b in zip(jax.tree.leaves(again.family.fake_init), jax.tree.leaves(run.family.fake_init)):
    np.testing.assert_array_equal(a, b)


def test_unwritable_workdir_is_one_line_naming_it(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  w = str(blocker / "run")                       # a directory under a file cannot exist
  with pytest.raises(paths.WorkdirError, match="a_file/run"):
    paths.makedirs(w)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PDMD_JAX_CACHE": ""}
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                      f"--config={os.path.join(ROOT, 'configs', 'gmm.py')}:runlocal",
                      f"--workdir={w}"], env=env, cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert f"Workdir error: workdir {w!r} cannot be written" in r.stderr


def test_processes_creating_one_workdir_at_once_do_not_trip_each_other(tmp_path):
  """The processes of a multi-process run create their shared workdir together; with one probe
  file name, one process deleted another's probe and the run stopped with 'cannot be written'."""
  w = str(tmp_path / "shared")

  def create_many(_):
    for _ in range(300):
      paths.makedirs(w)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(create_many, range(4)))
  assert os.listdir(w) == []                       # no probe left behind
