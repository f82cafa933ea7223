"""Distillation of a DiT teacher: LoRA experts, which leaves move, and a tiny end-to-end run."""

import dataclasses
import functools
import os

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdmd_jax import assets
from pdmd_jax import configs
from pdmd_jax import models
from pdmd_jax import train_step as ts
from pdmd_jax import trainer
from pdmd_jax.models import dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mnist_config(arg="runlocal"):
  return configs.load(f"configs/mnist.py:{arg}")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  """A tiny random (non-zero) DiT saved as a teacher asset."""
  cfg = dit.config_for("tiny")
  _, params = models.build_dit(cfg, seed=3)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  path = str(tmp_path_factory.mktemp("teacher"))
  assets.save(path, jax.device_get(params), {"model": dataclasses.asdict(cfg), "metrics": None})
  return path


def _config(tiny_teacher, arg="runlocal"):
  c = _mnist_config(arg)
  c.teacher.path = tiny_teacher
  return c


def test_generator_step_moves_only_the_active_experts_lora(tiny_teacher):
  run = trainer.build(_config(tiny_teacher), devices=jax.devices()[:1])
  state = trainer.initial_state(run)
  assert set(jax.tree.leaves(jax.tree.map(lambda _: 0, state.experts[0]))) == {0}
  n_lora = sum(x.size for x in jax.tree.leaves(state.experts[0]))
  n_teacher = sum(x.size for x in jax.tree.leaves(run.teacher_params))
  assert n_lora < 0.5 * n_teacher
  assert all(k.endswith("kernel") for k in state.experts[0])
  # the optimizer state covers the LoRA leaves only (no moments for the frozen backbone)
  n_opt = sum(x.size for x in jax.tree.leaves(state.expert_opt[0]) if x.ndim)
  assert n_opt == 2 * n_lora
  state = run.asm.initial_state(1)           # phase 2's layout: expert 0 frozen, no moments
  assert state.expert_opt[0] is None and state.fakes[0] is None
  before = jax.device_get(state)
  y = jnp.arange(8) % 10
  step = jax.jit(functools.partial(ts.generator_step, run.step_cfg, 1))
  new, _ = step(state, run.teacher_params, y, jax.random.PRNGKey(1))
  after = jax.device_get(new)
  changed = lambda a, b: [not np.array_equal(x, z) for x, z in zip(jax.tree.leaves(a),
                                                                  jax.tree.leaves(b))]
  assert not any(changed(before.experts[0], after.experts[0]))     # frozen earlier expert
  assert any(changed(before.experts[1], after.experts[1]))         # the active expert's LoRA
  b_moved = [not np.array_equal(before.experts[1][k]["b"], after.experts[1][k]["b"])
             for k in before.experts[1]]
  assert all(b_moved)
  assert not any(changed(before.fakes[1], after.fakes[1]))         # the fake untouched


def test_lora_expert_at_init_samples_like_the_teacher(tiny_teacher):
  """With B = 0 every expert is the teacher: the few-step sampler = teacher Euler on the grid."""
  from pdmd_jax import sampling  # pylint: disable=import-outside-toplevel
  run = trainer.build(_config(tiny_teacher), devices=jax.devices()[:1])
  state = trainer.initial_state(run)
  z = jax.random.normal(jax.random.PRNGKey(0), (4,) + run.sample_shape)
  y = jnp.array([0, 1, 2, 3])
  few = sampling.few_step_sample(run.plan, run.experts_apply(), state.experts, z, y)[-1]
  plain = sampling.few_step_sample(run.plan, run.family.apply, (run.teacher_params,) * 2, z, y)[-1]
  np.testing.assert_allclose(few, plain, atol=1e-5)


def test_shared_backbone_fakes_are_lora_on_the_frozen_teacher(tiny_teacher):
  """fake.lora_rank > 0: each fake is a LoRA tree (B = 0: the teacher at init), its update moves
  only its own LoRA, and the state holds no second full copy of the network."""
  c = _config(tiny_teacher)
  c.fake.lora_rank = 4
  run = trainer.build(c, devices=jax.devices()[:1])
  state = run.asm.initial_state(1)
  n_teacher = sum(x.size for x in jax.tree.leaves(run.teacher_params))
  assert sum(x.size for x in jax.tree.leaves(state.fakes[1])) < 0.5 * n_teacher
  x = jax.random.normal(jax.random.PRNGKey(0), (4,) + run.sample_shape)
  t, y = jnp.full((4,), 0.6), jnp.array([0, 1, 2, 3])
  fake = run.step_cfg.fakes_apply(run.teacher_params)
  np.testing.assert_allclose(fake(state.fakes[1], x, t, y), run.family.apply(run.teacher_params, x, t, y),
                             atol=1e-6)
  before = jax.device_get(state)
  new, m = jax.jit(functools.partial(ts.fake_step, run.step_cfg, 1))(
      state, run.teacher_params, y, jax.random.PRNGKey(2))
  after = jax.device_get(new)
  assert np.isfinite(float(m["fake_loss"]))
  moved = [not np.array_equal(before.fakes[1][k]["b"], after.fakes[1][k]["b"]) for k in before.fakes[1]]
  assert all(moved)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.experts),
                                                  jax.tree.leaves(after.experts)))
  # the generator update reads the LoRA fake: a full step runs and stays finite
  new, m = jax.jit(functools.partial(ts.generator_step, run.step_cfg, 1))(
      new, run.teacher_params, y, jax.random.PRNGKey(3))
  assert np.isfinite(float(m["gen_grad_norm"]))
  c.fake.lora_rank = -1
  with pytest.raises(ValueError, match="fake.lora_rank"):
    trainer.build(c)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=4, tensor=2)])   # data x fsdp: test_train_step
def test_trainer_shards_by_the_logical_rules_and_matches_one_device(tiny_teacher, mesh):
  """On 8 simulated devices the trainer's state follows sharding.DEFAULT_RULES (LoRA factors
  by their kernel's axes) and one phase step gives the single-device numbers."""
  from pdmd_jax import sharding as sh  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import dit as dit_lib  # pylint: disable=import-outside-toplevel
  c = _config(tiny_teacher)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh["data"], mesh["fsdp"], mesh.get("tensor", 1)
  run = trainer.build(c)
  axes = models.logical_axes(dit_lib.DiTConfig(**assets.load_card(tiny_teacher)["model"]))
  state = trainer.initial_state(run)
  specs = lambda tree: [x.sharding.spec for x in jax.tree.leaves(tree)]
  want = jax.tree.map(lambda n, x: sh.logical_spec(n, shape=x.shape, mesh=run.mesh), axes,
                      state.fakes[0], is_leaf=lambda n: isinstance(n, tuple))
  assert specs(state.fakes[0]) == jax.tree.leaves(want, is_leaf=lambda p: isinstance(p, sh.P))
  lora = sh.lora_axes(state.experts[0], axes)
  want = jax.tree.map(lambda n, x: sh.logical_spec(n, shape=x.shape, mesh=run.mesh), lora,
                      state.experts[0], is_leaf=lambda n: isinstance(n, tuple))
  assert specs(state.experts[0]) == jax.tree.leaves(want, is_leaf=lambda p: isinstance(p, sh.P))
  if mesh.get("tensor"):
    assert any("tensor" in str(s) for s in specs(state.fakes[0]))
  batch = trainer.batch_for_step(run, 0)
  compiled, _ = trainer.compile_phase_steps(run)
  new, m = compiled[0](state, run.teacher_params, batch)
  one = trainer.build(_config(tiny_teacher), devices=jax.devices()[:1])
  ref, m1 = jax.jit(functools.partial(ts.phase_step, one.step_cfg, 0))(
      trainer.initial_state(one), one.teacher_params, jax.device_get(batch))
  # AdamW with beta1 = 0 moves each entry by about lr (1e-3) whatever its gradient's size, so an
  # entry whose gradient is ~eps can move by a different fraction of lr: tolerance 5% of lr.
  for a, b in zip(jax.tree.leaves(jax.device_get(new)), jax.tree.leaves(jax.device_get(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
  for k in ("fake_loss", "gen_surrogate", "gen_grad_norm", "dmd_grad_norm"):
    np.testing.assert_allclose(float(m[k]), float(m1[k]), rtol=1e-4, err_msg=k)


def test_bad_teacher_path_names_the_field(tiny_teacher):
  c = _config(tiny_teacher)
  c.teacher.path = "/nonexistent"
  with pytest.raises(ValueError, match="teacher.path"):
    trainer.build(c)


def test_unconditional_run_draws_the_null_class(tiny_teacher):
  """teacher.unconditional: training and evaluation both draw the null class; CFG has nothing
  to guide towards, so a guidance scale other than 1 is refused, naming the field."""
  from pdmd_jax.evaluation import image_eval  # pylint: disable=import-outside-toplevel
  c = _config(tiny_teacher)
  c.teacher.unconditional = True
  with pytest.raises(ValueError, match="teacher.guidance_scale"):
    trainer.build(c)
  c.teacher.guidance_scale = 1.0
  run = trainer.build(c, devices=jax.devices()[:1])
  assert run.family.unconditional and run.num_classes == 10
  np.testing.assert_array_equal(run.family.sample_cond(jax.random.PRNGKey(0), (3, 5)), 10)
  np.testing.assert_array_equal(image_eval.inputs(run)[1], 10)


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "assets", "classifier", "card.json")),
                    reason="the evaluation classifier asset is missing")
@pytest.mark.long
def test_tiny_end_to_end_distillation(tiny_teacher, tmp_path):
  out = trainer.train_and_evaluate(_config(tiny_teacher), str(tmp_path), verbose=False)
  for who in ("student", "teacher"):
    for k in ("accuracy", "fd_real", "feature_cosine", "pixel_l2", "saturation"):
      assert np.isfinite(out[f"{who}/{k}"]), (who, k)
  assert np.isfinite(out["student/fd_reference"])
  for f in ("samples_final.png", "teacher_samples.png", "metrics_final.md", "metrics.json",
            "samples_phase1.png"):
    assert os.path.exists(tmp_path / f), f
  assert out["step"] == 4
  assert 0.0 <= out["gen_clipped_fraction"] <= 1.0   # reported with the final metrics


def test_loss_reduction_sets_the_units_of_the_clip(tiny_teacher):
  """One generator update, same state and key: element_mean's gradient is sample_sum's / D
  (D = 32 x 32 x 1 elements per sample), and gen_clipped flags exactly the updates whose
  gradient norm exceeds generator.grad_clip (here set between the two norms)."""
  out = {}
  c = _config(tiny_teacher)
  c.generator.grad_clip = 1e-2        # norms here: 0.35 (sample_sum), 3.4e-4 (element_mean)
  run = trainer.build(c, devices=jax.devices()[:1])
  state = run.asm.initial_state(1)
  for red in ("sample_sum", "element_mean"):
    cfg = dataclasses.replace(run.step_cfg, loss_reduction=red)
    step = jax.jit(functools.partial(ts.generator_step, cfg, 1))
    _, out[red] = step(state, run.teacher_params, jnp.arange(8) % 10, jax.random.PRNGKey(1))
  d = 32 * 32
  np.testing.assert_allclose(out["element_mean"]["gen_grad_norm"],
                             out["sample_sum"]["gen_grad_norm"] / d, rtol=1e-4)
  assert float(out["sample_sum"]["gen_clipped"]) == 1.0
  assert float(out["element_mean"]["gen_clipped"]) == 0.0


@pytest.mark.slow   # ~28 s; the default suite checks IDA on full copies (test_train_step)
def test_ida_mixes_the_merged_lora_expert_into_the_fake(tiny_teacher):
  """IDA after the generator update: fake <- lam fake + (1 - lam) (W + (alpha / r) A B) for the
  LoRA-adapted kernels, lam fake + (1 - lam) W elsewhere, W the teacher's. The same step without
  IDA gives the fake before mixing and the same expert (IDA runs after the update)."""
  lam = 0.75                           # far from 1 so the mix is visible in float32
  c = _config(tiny_teacher)
  c.generator.lora_rank, c.generator.lora_alpha = 4, 8.0
  run = trainer.build(c, devices=jax.devices()[:1])
  state = run.asm.initial_state(1)
  state = state.replace(experts=state.experts[:1] + (jax.tree.map(   # a non-zero LoRA product
      lambda a: a + 0.1, state.experts[1]),))
  batch = trainer.batch_for_step(run, 0)
  out = {}
  for name, value in (("plain", 1.0), ("ida", lam)):
    cfg = dataclasses.replace(run.step_cfg, ida_lambda=value)
    out[name], _ = jax.jit(functools.partial(ts.phase_step, cfg, 1))(state, run.teacher_params,
                                                                     batch)
  plain, mixed = jax.device_get(out["plain"]), jax.device_get(out["ida"])
  chex.assert_trees_all_equal(plain.experts, mixed.experts)
  lora = plain.experts[1]
  flat = lambda tree: {".".join(map(str, k)): v for k, v in
                       flax.traverse_util.flatten_dict(tree).items()}
  teacher, fake_plain, fake_mixed = (flat(jax.device_get(t)) for t in
                                     (run.teacher_params, plain.fakes[1], mixed.fakes[1]))
  assert len(lora) and set(lora) < set(teacher)
  for path, w in teacher.items():
    g = w + (8.0 / 4) * np.einsum("...ir,...ro->...io", lora[path]["a"], lora[path]["b"]) \
        if path in lora else w
    np.testing.assert_allclose(fake_mixed[path], lam * fake_plain[path] + (1 - lam) * g,
                               rtol=1e-5, atol=1e-6, err_msg=path)
  assert any(not np.allclose(fake_mixed[p], lam * fake_plain[p] + (1 - lam) * teacher[p])
             for p in lora)                                      # the merge matters


@pytest.mark.slow
def test_resume_with_every_recipe_term_on_is_bit_identical(tiny_teacher, tmp_path):
  """element_mean + ODE anchor + IDA + the GAN head with real digits + EMA: stop at the phase
  boundary (2 of 2 x 2 updates) and after it, resume to the end; every leaf (the heads and their
  moments inside the fake items) equals the uninterrupted run's, bit for bit. The real batch
  of update i is a function of (seed, i), so a resumed run reads the same digits. (~1 min; the
  default suite resumes the mixture run with every term but the GAN on: test_checkpointing.)"""
  c = _config(tiny_teacher)
  c.generator.loss_reduction = "element_mean"
  c.generator.ema_decay, c.generator.ema_start = 0.5, 1
  c.anchor.weight, c.anchor.teacher_steps = 0.05, 2
  c.fake.ida_lambda = 0.97
  c.gan.enabled = True
  dev = jax.devices()[:1]
  a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
  kw = dict(devices=dev, final_eval=False, evaluate_phases=False, verbose=False)
  trainer.train_and_evaluate(c, a, **kw)
  for stop in (2, 3):
    trainer.train_and_evaluate(c, b, stop_at_step=stop, **kw)
  trainer.train_and_evaluate(c, b, **kw)
  (run, sa), (_, sb) = trainer.restore_latest(c, a, dev), trainer.restore_latest(c, b, dev)
  sa, sb = jax.device_get(sa), jax.device_get(sb)
  assert int(sa.step) == int(sb.step) == 4
  assert set(sa.fakes[1]) == {"score", "head"}             # the head is in the fake's item
  chex.assert_trees_all_equal(sa, sb, strict=True)
  init = jax.device_get(run.asm.initial_state(1))
  assert not np.array_equal(sa.fakes[1]["head"]["out"]["kernel"],
                            init.fakes[1]["head"]["out"]["kernel"])      # the head trained
  assert int(sa.fake_opt[1][-1][0].count) == 2 * c.fake.ttur    # its AdamW moments, restored


def test_cached_teacher_reference_is_keyed_by_the_teacher(tiny_teacher, tmp_path):
  """The evaluation's teacher samples are cached in the workdir; retraining the teacher in place
  (same teacher.path, new weights and card) must not reuse the old teacher's reference."""
  from pdmd_jax.evaluation import image_eval  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "teacher")
  cfg = dit.config_for("tiny")
  z = jax.random.normal(jax.random.PRNGKey(0), (4,) + cfg.sample_shape)
  labels = np.arange(4) % cfg.num_classes
  got = []
  for seed in (3, 4, 4):
    _, params = models.build_dit(cfg, seed=seed)
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(p.size + jnp.arange(p.size).reshape(
        p.shape) * seed), params)
    assets.save(path, jax.device_get(params), {"model": dataclasses.asdict(cfg),
                                               "metrics": {"seed": seed}})
    c = _mnist_config()
    c.teacher.path = path
    run = trainer.build(c, devices=jax.devices()[:1])
    got.append(image_eval.teacher_samples(run, z, labels, str(tmp_path)))
  cached = [f for f in os.listdir(tmp_path) if f.startswith("teacher_samples_n")]
  assert len(cached) == 2                              # one reference per teacher
  assert np.abs(got[0] - got[1]).max() > 1e-3          # not the first teacher's reference
  np.testing.assert_array_equal(got[1], got[2])        # the same teacher reuses its reference
