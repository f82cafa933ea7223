"""Checkpoints are topology-independent: a run saved on one mesh resumes on another.

A random tiny DiT (LoRA experts, full fakes, CFG 3; configs/mnist.py:runlocal) trains to the
phase boundary on (fsdp 4 x tensor 2), then resumes on (data 2 x fsdp 4) and on 1 device and
trains phase 2 to the end. The restore itself is exact (every leaf, bit for bit, on every mesh);
the continued runs equal the run that never stopped (on fsdp 4 x tensor 2) within the tolerance
of sharded reductions, |a - b| <= 3e-5 + 1e-4 |b|: batch sums split across devices differ in the
last bits, and Adam with beta1 = 0 divides by sqrt(v), which turns that into up to ~1% of one
lr-sized (1e-3) step for near-zero gradient entries (seen: one LoRA entry in 64 off by 1.2e-5).
The multi-process case (2 processes x 4 devices -> 1 x 8): test_multiprocess.
"""

import shutil

import chex
import jax
import pytest

from pdmd_jax import trainer
from pdmd_jax.families import dit as dit_family
from pdmd_jax.models import dit

CFG = dit.config_for("tiny", image_size=8, patch=4, hidden=16, depth=1, heads=2, time_dim=32)
TOL = dict(rtol=1e-4, atol=3e-5)
MESHES = {"fsdp4_tensor2": ({"fsdp": 4, "tensor": 2, "data": 1}, 8),
          "data2_fsdp4": ({"data": 2, "fsdp": 4, "tensor": 1}, 8),
          "one_device": ({"data": 1, "fsdp": 1, "tensor": 1}, 1)}


def _config(mesh):
  c = dit_family.random_config(CFG, "runlocal", {"fake.ttur": 1, "train.batch_size": 8,
                                                 "generator.lora_rank": 4,
                                                 "generator.lora_alpha": 4.0,
                                                 "train.num_steps": 4, "train.ckpt_every": 2,
                                                 "health.every": 0})
  for axis, size in mesh.items():
    c.mesh[axis] = size
  return c


def _run(name, workdir, **kw):
  mesh, n = MESHES[name]
  return trainer.train_and_evaluate(_config(mesh), workdir, devices=jax.devices()[:n],
                                    final_eval=False, evaluate_phases=False, verbose=False, **kw)


def _final(name, workdir):
  mesh, n = MESHES[name]
  _, state = trainer.restore_latest(_config(mesh), workdir, jax.devices()[:n])
  return jax.device_get(state)


@pytest.mark.slow      # three meshes, four runs of the DiT step (~2 min)
def test_resume_on_another_mesh_continues_with_the_same_numbers(tmp_path):
  straight = str(tmp_path / "straight")
  _run("fsdp4_tensor2", straight)
  want = _final("fsdp4_tensor2", straight)
  saved = str(tmp_path / "saved")
  assert _run("fsdp4_tensor2", saved, stop_at_step=2) == {"stopped_at_step": 2}   # phase end
  at_boundary = _final("fsdp4_tensor2", saved)
  for name in ("data2_fsdp4", "one_device"):
    chex.assert_trees_all_equal(_final(name, saved), at_boundary, strict=True)
  for name in ("data2_fsdp4", "one_device"):
    w = str(tmp_path / name)
    shutil.copytree(saved, w)
    _run(name, w)
    got = _final(name, w)
    assert int(got.step) == 4
    chex.assert_trees_all_close(got, want, **TOL)
