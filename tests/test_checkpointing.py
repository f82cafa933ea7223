"""Resume equals not stopping; half-written checkpoints are ignored; NaN stops the run."""

import os
import shutil

import jax
import jax.numpy as jnp
import pytest

from pdmd_jax import trainer


def _config(gmm_config):
  config = gmm_config("method=phased_dmd_sgts,steps=4,phases=2,runlocal")
  config.init_fit.steps = 20
  config.train.num_steps = 8
  config.train.ckpt_every = 2
  config.mesh.data = 1
  return config


def test_resume_is_bit_identical(gmm_config, tmp_path):
  config = _config(gmm_config)
  dev = jax.devices()[:1]
  a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
  trainer.train_and_evaluate(config, a, devices=dev, final_eval=False, evaluate_phases=False,
                             verbose=False)
  out = trainer.train_and_evaluate(config, b, devices=dev, stop_at_step=3, final_eval=False,
                                   evaluate_phases=False, verbose=False)
  assert out == {"stopped_at_step": 3}
  trainer.train_and_evaluate(config, b, devices=dev, final_eval=False, evaluate_phases=False,
                             verbose=False)
  (_, sa), (_, sb) = trainer.restore_latest(config, a, dev), trainer.restore_latest(config, b, dev)
  assert int(sa.step) == int(sb.step) == 8
  leaves_a, leaves_b = jax.tree.leaves(sa), jax.tree.leaves(sb)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):   # every expert, fake score, optimizer state and the rng
    assert x.dtype == y.dtype and bool(jnp.array_equal(x, y))

  # A save killed mid-write leaves orbax's temporary directory: it must be ignored.
  ckdir = os.path.join(b, "checkpoints")
  shutil.copytree(os.path.join(ckdir, "8"), os.path.join(ckdir, "10.orbax-checkpoint-tmp-1"))
  for item in ("expert_0", "fake_1"):
    shutil.rmtree(os.path.join(ckdir, "10.orbax-checkpoint-tmp-1", item))
  _, sc = trainer.restore_latest(config, b, dev)
  assert int(sc.step) == 8


def test_non_finite_stops_with_step_and_metric(gmm_config, tmp_path):
  config = _config(gmm_config)
  config.generator.lr = 1e37        # the first generator update overflows the expert
  w = str(tmp_path / "nan")
  with pytest.raises(trainer.NonFiniteError, match=r"non-finite \w+=.* at step \d+") as err:
    trainer.train_and_evaluate(config, w, devices=jax.devices()[:1], evaluate_phases=False,
                               verbose=False)
  bad_step = int(str(err.value).split(" at step ")[1].split()[0])
  ckdir = os.path.join(w, "checkpoints")
  saved = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
  assert all(s <= bad_step for s in saved)   # nothing saved after the bad update
  if saved:
    _, state = trainer.restore_latest(config, w, jax.devices()[:1])
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.experts))
