"""Phase step: compiles once, updates only phase k's expert and fake, shards like one device."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdmd_jax import sharding as sh
from pdmd_jax import trainer
from pdmd_jax import train_step as ts


def _run(gmm_config, variant, devices=None, mesh=(-1, 1)):
  config = gmm_config(variant)
  config.init_fit.steps = 20
  config.mesh.data, config.mesh.fsdp = mesh
  return trainer.build(config, None, devices=devices)


def _equal(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_phase_step_updates_only_its_phase_and_never_retraces(gmm_config):
  """Progressive order: phase 1's state holds expert 0 frozen (no moments, no fake), phase 1's
  expert and fake started from their initial trees; the step trains only phase 1."""
  run = _run(gmm_config, "method=phased_dmd_sgts,steps=4,phases=2,runlocal", jax.devices()[:1])
  fam = run.family
  state0 = trainer.initial_state(run)
  assert state0.experts[1] is None and state0.fakes[1] is None and state0.fake_opt[1] is None
  state0 = state0.replace(experts=(jax.tree.map(lambda a: a + 1.0, state0.experts[0]), None))
  trained0 = jax.device_get(state0.experts[0])     # stands for phase 1's trained expert
  state1 = run.asm.start_phase()[1](state0, fam.fake_init, fam.expert_init)
  assert state1.expert_opt[0] is None and state1.fakes[0] is None and state1.fake_opt[0] is None
  assert _equal(state1.experts[0], trained0)                     # the finished expert, frozen
  assert _equal(state1.experts[1], fam.expert_init) and _equal(state1.fakes[1], fam.fake_init)
  assert int(state1.expert_opt[1][0].count) == 0                 # fresh AdamW moments
  keep = jax.device_get(state1)
  fn = ts.jit_phase_step(run.step_cfg, 1)
  state = state1
  for step in range(3):
    state, metrics = fn(state, run.teacher_params, trainer.batch_for_step(run, step))
  assert fn._cache_size() == 1            # one trace and compile for all steps
  assert int(state.step) == 3 and bool(metrics["finite"])
  assert _equal(state.experts[0], keep.experts[0])
  assert not _equal(state.experts[1], keep.experts[1])
  assert not _equal(state.fakes[1], keep.fakes[1])
  assert 0 <= int(metrics["stop_index"]) < 2


def test_randomness_depends_on_step_not_on_history(gmm_config):
  """fold_in(rng, step): the same state and step give the same update."""
  run = _run(gmm_config, "runlocal", jax.devices()[:1])
  fn = ts.jit_phase_step(run.step_cfg, 0)
  a, _ = fn(trainer.initial_state(run), run.teacher_params, trainer.batch_for_step(run, 0))
  b, _ = fn(trainer.initial_state(run), run.teacher_params, trainer.batch_for_step(run, 0))
  assert _equal(a, b)


def test_fsdp_rule_on_8_devices(gmm_config):
  assert jax.device_count() == 8
  run = _run(gmm_config, "dim=16,runlocal", mesh=(2, 4))
  state = trainer.initial_state(run)
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    spec = leaf.sharding.spec
    expected = sh.fsdp_spec(leaf.shape, 4)
    assert spec == expected, (jax.tree_util.keystr(path), spec, expected)
  kernel = state.experts[0]["block_0"]["fc1"]["kernel"]      # [32, 64]: split along the 64 axis
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (32, 16)


@pytest.mark.slow   # ~15 s; the default suite compares meshes in test_sharding_rules (DiT, logical
                    # rules) and test_multiprocess (2 x 4 vs 1 x 8, mixture)
@pytest.mark.parametrize("variant", ["method=phased_dmd_sgts,steps=4,phases=2,dim=16,runlocal"])
def test_data2_fsdp4_matches_single_device(gmm_config, variant):
  """Same numbers on a (data 2 x fsdp 4) mesh as on one device: |a - b| <= 1e-5 + 1e-4 |b|.

  Batch reductions are split across devices, so float sums differ in the last bits; Adam with
  beta1 = 0 divides by sqrt(v), which magnifies that for the rare near-zero gradient entries
  (seen: one entry in 2048 at 6e-6 absolute).
  """
  one = _run(gmm_config, variant, jax.devices()[:1])
  many = _run(gmm_config, variant, mesh=(2, 4))
  results = []
  for run in (one, many):
    state = run.asm.start_phase()[1](trainer.initial_state(run), run.family.fake_init,
                                     run.family.expert_init)
    fn = run.asm.jit_step(1)    # the trainer's jitted step with its shardings
    for step in range(2):
      state, metrics = fn(state, run.teacher_params, trainer.batch_for_step(run, step))
    results.append(jax.device_get((state, metrics)))
  (s1, m1), (s8, m8) = results
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for name in ("fake_loss", "gen_grad_norm", "dmd_grad_norm"):
    np.testing.assert_allclose(m1[name], m8[name], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("order,expected", [("progressive", [0, 0, 1, 1, 2, 2, 3, 3]),
                                            ("interleaved", [0, 1, 2, 3, 0, 1, 2, 3]),
                                            ((1, 3, 2, 2), [0, 1, 1, 1, 2, 2, 3, 3])])
def test_phase_order(gmm_config, order, expected):
  """progressive: phase k after phase k-1 (the paper), an even split or train.phase_steps;
  interleaved: alternate per update."""
  config = gmm_config("runlocal")
  config.init_fit.steps = 1
  if isinstance(order, tuple):
    config.train.phase_steps = order
  else:
    config.phase_order = order
  run = trainer.build(config, None, devices=jax.devices()[:1])
  assert [run.phase_of(s) for s in range(8)] == expected


def test_ema_closed_form_and_what_samplers_use(gmm_config):
  """ema_update over n updates with start s and decay d: the average equals the weights after
  update s, then avg_n = d^(n-s) p_s + (1 - d) sum_{j=s+1..n} d^(n-j) p_j. Samplers run the EMA
  when generator.ema_decay > 0 and eval.ema, the raw weights otherwise."""
  d, s = 0.9, 2
  ps = [jnp.full((3,), float(j * j)) for j in range(1, 7)]       # weights after updates 1..6
  ema = {"params": jnp.zeros((3,)), "count": jnp.zeros((), jnp.int32)}
  for p in ps:
    ema = ts.ema_update(ema, p, d, s)
  n = len(ps)
  want = d ** (n - s) * ps[s - 1] + (1 - d) * sum(d ** (n - j) * ps[j - 1]
                                                   for j in range(s + 1, n + 1))
  np.testing.assert_allclose(ema["params"], want, rtol=1e-6)
  assert int(ema["count"]) == n

  config = gmm_config("runlocal")
  config.init_fit.steps = 1
  config.generator.ema_decay = 0.5
  run = trainer.build(config, None, devices=jax.devices()[:1])
  state = trainer.initial_state(run)
  new, _ = run.asm.jit_step(0)(state, run.teacher_params, trainer.batch_for_step(run, 0))
  raw, avg = new.experts[0], new.ema[0]["params"]
  # one update from the initial tree e0: avg = 0.5 e0 + 0.5 raw (start 0)
  e0 = run.family.expert_init
  chex.assert_trees_all_close(avg, jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, e0, raw),
                              rtol=1e-6, atol=1e-7)
  assert not _equal(avg, raw)
  chex.assert_trees_all_equal(run.experts(new)[0], avg)
  run.config.eval.ema = False                     # read when sampling
  chex.assert_trees_all_equal(run.experts(new)[0], raw)


def test_ida_update_is_exact_for_full_copy_experts(gmm_config):
  """IDA (fake.ida_lambda = lam < 1): after the generator update, fake_k <- lam fake_k +
  (1 - lam) expert_k, nothing else changes; with lam = 1 the step is the plain one."""
  run = _run(gmm_config, "method=phased_dmd_sgts,steps=4,phases=2,runlocal", jax.devices()[:1])
  state = trainer.initial_state(run)
  batch = trainer.batch_for_step(run, 0)
  out = {}
  for lam in (1.0, 0.97):
    cfg = dataclasses.replace(run.step_cfg, ida_lambda=lam)
    out[lam], _ = jax.jit(functools.partial(ts.phase_step, cfg, 0))(state, run.teacher_params,
                                                                    batch)
  plain, mixed = jax.device_get(out[1.0]), jax.device_get(out[0.97])
  chex.assert_trees_all_equal(plain.experts, mixed.experts)
  chex.assert_trees_all_equal(plain.fake_opt, mixed.fake_opt)
  expected = jax.tree.map(lambda f, g: np.float32(0.97) * f + np.float32(0.03) * g,
                          plain.fakes[0], plain.experts[0])
  chex.assert_trees_all_close(mixed.fakes[0], expected, rtol=1e-6, atol=1e-7)
  assert not _equal(mixed.fakes[0], plain.fakes[0])
