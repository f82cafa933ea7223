"""What fake_step / generator_step / phase_step compute, checked against hand-computed values.

StepConfig is built directly (no trainer). Where a value must be computed by hand, the expert
and the fake are tiny closed-form "networks" and the fake records what it is called with
(jax.debug.callback), so that the test can recompute the loss or the DMD direction from the
exact Gaussian-mixture teacher (teachers.gmm_velocity) and the spec's formulas:

- the expert is a constant velocity b + x, so one Euler step from t = 1 to s = 0 gives
  x_s = z - (b + z) = -b for every z (deterministic), and dx_s/db = -1;
- the fake is v_F(x, t, y) = scale * x + shift[y] (shift has a row for the null label).
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pdmd_jax import methods
from pdmd_jax import models
from pdmd_jax import schedule as S
from pdmd_jax import teachers
from pdmd_jax import train_step as ts
from pdmd_jax.data import gmm as gmm_lib

FM = S.flow_matching()
D, NUM_CLASSES, B = 2, 2, 64
NULL = NUM_CLASSES


def _gmm():
  return gmm_lib.make("ring", dim=D, num_modes=4, num_classes=NUM_CLASSES, radius=2.0, std=0.3)


def _expert(p, x, t, y):
  """Constant-plus-identity velocity: one Euler step 1 -> 0 maps any z to x_s = -b."""
  del t, y
  return x + p["b"]


def _fake_params():
  return {"scale": jnp.float32(0.5),
          "shift": jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-2.0, -2.0]], jnp.float32)}


def _fake_value(p, x, y):
  return p["scale"] * x + p["shift"][y]


def _recording_fake(log):
  """A fake apply that appends its (x_t, t, y) to ``log`` on every call (also under jit/grad)."""
  def apply(p, x, t, y):
    jax.debug.callback(lambda *a: log.append(tuple(np.asarray(v) for v in a)), x, t, y)
    return _fake_value(p, x, y)
  return apply


def _cfg(plan, fake_apply, teacher, **kw):
  kw.setdefault("gen_tx", optax.sgd(1.0))
  kw.setdefault("fake_tx", optax.sgd(0.0))
  return ts.StepConfig(plan=plan, apply=fake_apply, teacher=teacher, sched=FM, sample_shape=(D,),
                       expert_apply=lambda teacher_params: _expert, **kw)


def _state(cfg, b=(0.3, -0.7)):
  return ts.create_state(0, _fake_params(), cfg.plan.num_phases, cfg.gen_tx, cfg.fake_tx,
                         expert_init={"b": jnp.asarray(b, jnp.float32)})


def _labels(seed=0, n=B):
  return jnp.asarray(np.random.default_rng(seed).integers(0, NUM_CLASSES, n), jnp.int32)


# ---------------------------------------------------------------------------------------------
# (a) Generator step: teacher guided (CFG), fake unguided
# ---------------------------------------------------------------------------------------------

def test_generator_direction_uses_guided_teacher_and_conditional_fake():
  """The expert's SGD(1) update is b_new - b = mean_i g_i with g = w_t (v_T^cfg - v_F(y)).

  v_T^cfg = v(null) + 4 (v(y) - v(null)) from the exact mixture velocity, v_F(y) the
  conditional fake, w_t = (1-t)^2/t (FM, s = 0). Catches: a guided fake
  (v_F(null) + 4 (v_F(y) - v_F(null)): the fake would also be called with null labels and the
  update would differ), an unguided teacher, the fake evaluated at other (x_t, t) than the
  teacher, the sign of the DMD direction, and a generator loss that is not the batch mean.
  """
  w = 4.0
  gmm = _gmm()
  log = []
  plan = methods.make_plan("dmd", 1, 1, 1.0, t_min=0.05)
  cfg = _cfg(plan, _recording_fake(log), teachers.gmm_teacher(FM, NUM_CLASSES, guidance_scale=w))
  state = _state(cfg)
  y = _labels(1)
  step = jax.jit(functools.partial(ts.generator_step, cfg, 0))
  new, metrics = step(state, gmm, y, jax.random.PRNGKey(7))
  jax.effects_barrier()

  assert len(log) == 1, "the fake must be evaluated exactly once (one unguided call)"
  x_t, t, y_seen = log[0]
  chex.assert_shape((x_t, t, y_seen), ((B, D), (B,), (B,)))
  np.testing.assert_array_equal(y_seen, np.asarray(y))   # conditional labels only, no null
  chex.assert_tree_all_finite(new)
  chex.assert_trees_all_equal_structs(new, state)

  x_t, t = jnp.asarray(x_t), jnp.asarray(t)
  v_c = teachers.gmm_velocity(FM, gmm, x_t, t, y)
  v_u = teachers.gmm_velocity(FM, gmm, x_t, t, jnp.full_like(y, NULL))
  f = _fake_params()
  v_f_cond = _fake_value(f, x_t, y)
  v_f_guided = _fake_value(f, x_t, jnp.full_like(y, NULL)) + w * (
      v_f_cond - _fake_value(f, x_t, jnp.full_like(y, NULL)))
  w_t = ((1 - t)**2 / t)[:, None]
  mean_g = lambda v_teacher, v_fake: np.asarray(jnp.mean(w_t * (v_teacher - v_fake), axis=0))

  delta = np.asarray(new.experts[0]["b"] - state.experts[0]["b"])
  expected = mean_g(v_u + w * (v_c - v_u), v_f_cond)
  np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-5)
  # The alternatives are far from the observed update (so the check above discriminates).
  for name, alt in (("guided fake", mean_g(v_u + w * (v_c - v_u), v_f_guided)),
                    ("unguided teacher", mean_g(v_c, v_f_cond))):
    assert np.max(np.abs(alt - expected)) > 0.1, name
    assert np.max(np.abs(delta - alt)) > 0.1, name
  np.testing.assert_allclose(float(metrics["t_mean"]), float(jnp.mean(t)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# (b) The fake target at s = 0: Eq. 11 (= Eq. 8), not the clamped Eq. 13
# ---------------------------------------------------------------------------------------------

def test_fake_target_kind_switch():
  """eq13 becomes eq11 only in a phase ending at s = 0 and only without clamp_final_phase.

  Catches the switch applied at s > 0 (which would drop the Eq. 13 clamp where it matters) or
  ignoring clamp_final_phase.
  """
  dmd = methods.make_plan("dmd", 1, 1, 1.0)
  phased = methods.make_plan("phased_dmd_sgts", 4, 2, 3.0)
  teacher = teachers.gmm_teacher(FM, NUM_CLASSES)
  kind = lambda plan, k, **kw: ts._fake_target_kind(  # pylint: disable=protected-access
      _cfg(plan, None, teacher, **kw), plan.phases[k])
  assert kind(dmd, 0, fake_target="eq13") == "eq11"
  assert kind(dmd, 0, fake_target="eq13", clamp_final_phase=True) == "eq13"
  assert phased.phases[0].boundary > 0 and phased.phases[1].boundary == 0.0
  assert kind(phased, 0, fake_target="eq13") == "eq13"
  assert kind(phased, 1, fake_target="eq13") == "eq11"
  for target in ("eq11", "naive"):
    assert kind(dmd, 0, fake_target=target) == target
    assert kind(phased, 0, fake_target=target) == target


@pytest.mark.parametrize("clamp_final_phase", [False, True])
def test_fake_loss_at_s_zero_is_flow_matching(clamp_final_phase):
  """fake_step's loss at s = 0 is E ||v_F(x_t, t, y) - (eps - x_0)||^2 (Eq. 8), recomputed from
  what the fake saw: x_0 = x_s = -b, eps = (x_t - (1-t) x_0)/t. With clamp_final_phase the
  per-sample weight min(1, 10 t^2) of Eq. 13 applies instead.

  Catches: the Eq. 13 weighting leaking into the last phase (or clamp_final_phase ignored), a
  target that is not eps - x_0 at s = 0, x_t not built as (1-t) x_s + t eps.
  """
  log = []
  plan = methods.make_plan("dmd", 1, 1, 1.0)                 # t in (0, 1]: many t < 0.316
  cfg = _cfg(plan, _recording_fake(log), teachers.gmm_teacher(FM, NUM_CLASSES),
             fake_target="eq13", clamp_final_phase=clamp_final_phase)
  b = jnp.asarray([0.3, -0.7])
  state = _state(cfg, b)
  y = _labels(2, 256)
  new, metrics = jax.jit(functools.partial(ts.fake_step, cfg, 0))(state, _gmm(), y,
                                                                    jax.random.PRNGKey(3))
  jax.effects_barrier()
  assert len(log) == 1
  x_t, t, y_seen = (jnp.asarray(v) for v in log[0])
  chex.assert_shape((x_t, t), ((256, D), (256,)))
  np.testing.assert_array_equal(y_seen, y)
  chex.assert_tree_all_finite((new, metrics))
  assert float(jnp.min(t)) < 0.2                              # the clamp weight is < 1 somewhere
  x0 = -b[None, :]
  eps = (x_t - (1 - t)[:, None] * x0) / t[:, None]
  per_sample = jnp.mean((_fake_value(_fake_params(), x_t, y) - (eps - x0))**2, axis=1)
  plain = float(jnp.mean(per_sample))
  clamped = float(jnp.mean(jnp.minimum(1.0, 10 * t**2) * per_sample))
  assert abs(plain - clamped) > 0.01 * plain                 # the two readings are distinguishable
  want = clamped if clamp_final_phase else plain
  np.testing.assert_allclose(float(metrics["fake_loss"]), want, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# (c) t_min reaches every t the fake and the teacher see
# ---------------------------------------------------------------------------------------------

T_MIN = 0.3


def _nan_below(apply, t_min=T_MIN):
  """apply, but NaN for every sample with t < t_min (a loss on such t turns non-finite)."""
  def wrapped(p, x, t, y):
    return jnp.where(S.bcast(t < t_min, x), jnp.nan, apply(p, x, t, y))
  return wrapped


@pytest.mark.parametrize("t_min,finite", [(T_MIN, True), (0.0, False)])
def test_t_min_bounds_every_t_of_fake_and_generator_steps(t_min, finite):
  """With make_plan(..., t_min=0.3), fake_step and generator_step only ever evaluate the fake
  and the teacher at t >= 0.3: a fake and a teacher that return NaN below 0.3 give finite
  losses and gradients. The control (t_min = 0) shows the NaN trap fires when t < 0.3 occurs.

  Catches: t_min dropped on the way from the plan to the re-noise sampler, a fake step that
  draws its own t, or a generator step whose teacher/fake see a different t than sampled.
  """
  plan = methods.make_plan("dmd", 1, 1, 1.0, t_min=t_min)
  sampler = plan.phases[0].t_sampler
  assert sampler.low == t_min
  draws = np.asarray(jax.jit(lambda k: sampler(k, (100_000,)))(jax.random.PRNGKey(0)))
  assert (draws.min() >= np.float32(T_MIN)) == finite
  log = []
  gmm_apply = teachers.gmm_teacher(FM, NUM_CLASSES).apply
  teacher = teachers.Teacher(apply=_nan_below(gmm_apply), null_class=NULL, guidance_scale=2.0)
  cfg = _cfg(plan, _nan_below(_recording_fake(log)), teacher, ttur=2,
             fake_tx=optax.sgd(1e-3))
  state = _state(cfg)
  y = {"y": jnp.stack([_labels(i, 256) for i in range(cfg.ttur + 1)])}
  new, metrics = jax.jit(functools.partial(ts.phase_step, cfg, 0))(state, _gmm(), y)
  jax.effects_barrier()
  assert len(log) == cfg.ttur + 1                            # ttur fake updates + the generator
  t_seen = np.concatenate([rec[1] for rec in log])
  assert (t_seen.min() >= T_MIN) == finite
  # (fake_grad_norm stays finite in the control: jnp.where passes no gradient to NaN entries.)
  for name in ("fake_loss", "gen_grad_norm", "dmd_grad_norm"):
    assert bool(jnp.isfinite(metrics[name])) == finite, (name, metrics[name])
  assert bool(metrics["finite"]) == finite
  if finite:
    chex.assert_tree_all_finite((new, metrics))


# ---------------------------------------------------------------------------------------------
# (d) A jitted phase step is traced once
# ---------------------------------------------------------------------------------------------

def test_jitted_phase_step_traces_once():
  """phase_step under jit with an MLP fake/expert and the exact teacher: three calls with new
  states and labels reuse one trace (chex.assert_max_traces(n=1)); a new batch shape would
  retrace and is reported. Catches Python-side state (e.g. a step number or a phase index
  taken from traced values, or non-hashable static config) that forces a retrace per call.
  """
  chex.clear_trace_counter()
  net, params = models.build("mlp", dim=D, num_classes=NUM_CLASSES, width=16, depth=1,
                             time_dim=16, seed=0)
  plan = methods.make_plan("phased_dmd", 2, 2, 3.0)
  gen_tx = ts.make_optimizer(1e-3, 0.0, 0.999)
  cfg = ts.StepConfig(plan=plan, apply=net.apply,
                      teacher=teachers.gmm_teacher(FM, NUM_CLASSES, guidance_scale=2.0), sched=FM,
                      sample_shape=(D,), gen_tx=gen_tx, fake_tx=gen_tx, ttur=2)

  @chex.assert_max_traces(n=1)
  def step(state, teacher_params, batch):
    return ts.phase_step(cfg, 1, state, teacher_params, batch)

  jitted = jax.jit(step)
  state0 = ts.create_state(0, params, plan.num_phases, gen_tx, gen_tx)
  state = state0
  gmm = _gmm()
  for i in range(3):
    batch = {"y": jnp.stack([_labels(10 * i + j, 32) for j in range(cfg.ttur + 1)])}
    state, metrics = jitted(state, gmm, batch)
    chex.assert_trees_all_equal_structs(state, state0)
    chex.assert_shape([metrics[k] for k in ("fake_loss", "gen_grad_norm", "dmd_grad_norm")], ())
    chex.assert_tree_all_finite((state, metrics))
  assert int(state.step) == 3
  chex.assert_trees_all_equal(state.experts[0], state0.experts[0])   # phase 0 untouched
  with pytest.raises(AssertionError, match="traced > 1 times"):
    jitted(state, gmm, {"y": jnp.zeros((cfg.ttur + 1, 16), jnp.int32)})
  chex.clear_trace_counter()


# ---------------------------------------------------------------------------------------------
# (e) The ODE anchor: its target is the teacher's ODE solution, its gradient one step's
# ---------------------------------------------------------------------------------------------

MU, TAU = jnp.asarray([1.0, -0.5]), 0.4


def _gaussian_flow(x, t, s):
  """The exact probability-flow map t -> s of one Gaussian N(MU, TAU^2 I) under flow matching:
  x_t = (1-t) MU + sigma_t u with sigma_t = sqrt((1-t)^2 TAU^2 + t^2) and u fixed along the ODE."""
  sig = lambda r: np.sqrt((1 - r)**2 * TAU**2 + r**2)
  return (1 - s) * MU + sig(s) * (x - (1 - t) * MU) / sig(t)


@pytest.mark.parametrize("step", [0, 1])
def test_anchor_target_and_gradient_reach_only_its_step(step):
  """Phase 1 of 4-step 2-phase SGTS (times 1, 0.9 -> boundary 0.75) with the anchor on step j:
  the expert (velocity x + b[i] at step i, recorded) runs step 0 without gradient when j = 1,
  then jumps from t_j to s: x_s = x_j + (s - t_j)(x_j + b[j]). The teacher is one Gaussian
  whose ODE map is affine (``_gaussian_flow``, closed form); the fake is the exact teacher
  velocity, so the DMD direction is 0 and the SGD(1) update is the anchor's alone:
  b[j] <- b[j] - 2 w (s - t_j) mean_i(x_s,i - flow(x_j,i)), b[other] unchanged.

  Catches: a target that is not the teacher's ODE from the anchored step's input (e.g. from z
  when j = 1, or to t = 0 instead of the boundary), a gradient into the no-gradient step, a
  stop step that is still random, the wrong reduction or weight.
  """
  gmm = gmm_lib.GaussianMixture(MU[None], jnp.asarray([TAU]), jnp.ones(1), jnp.zeros(1, jnp.int32))
  plan = methods.make_plan("phased_dmd_sgts", 4, 2, 3.0)
  phase = plan.phases[0]
  t_j, s = phase.times[step], phase.boundary
  assert phase.times == pytest.approx((1.0, 0.9)) and s == pytest.approx(0.75)
  log, w = [], 0.3

  def expert(p, x, t, y):
    del y
    jax.debug.callback(lambda *a: log.append(tuple(np.asarray(v) for v in a)), x, t)
    return x + jnp.where(t[:, None] > 0.95, p["b"][0], p["b"][1])

  exact = lambda p, x, t, y: teachers.gmm_velocity(FM, gmm, x, t, y)
  times = tuple(np.linspace(t_j, s, 201))
  cfg = ts.StepConfig(plan=plan, apply=exact, teacher=teachers.gmm_teacher(FM, 1), sched=FM,
                      sample_shape=(D,), gen_tx=optax.sgd(1.0), fake_tx=optax.sgd(0.0),
                      expert_apply=lambda _: expert,
                      anchor=ts.Anchor(weight=w, phase=0, step=step, times=times))
  b = jnp.asarray([[0.3, -0.7], [-0.2, 0.5]], jnp.float32)
  state = ts.create_state(0, {"unused": jnp.zeros(())}, 2, cfg.gen_tx, cfg.fake_tx,
                          expert_init={"b": b}, lay=ts.layout("progressive", 2, 0))
  new, metrics = jax.jit(functools.partial(ts.generator_step, cfg, 0))(
      state, gmm, jnp.zeros((B,), jnp.int32), jax.random.PRNGKey(step))
  jax.effects_barrier()

  assert len(log) == step + 1 and int(metrics["stop_index"]) == step
  z = jnp.asarray(log[0][0])
  np.testing.assert_allclose(log[0][1], 1.0)
  x_j = z + (0.9 - 1.0) * (z + b[0]) if step == 1 else z
  np.testing.assert_allclose(log[-1][0], x_j, rtol=1e-5, atol=1e-6)
  x_s = x_j + (s - t_j) * (x_j + b[step])
  target = _gaussian_flow(x_j, t_j, s)
  np.testing.assert_allclose(float(metrics["anchor_loss"]),
                             float(jnp.sum((x_s - target)**2) / B), rtol=2e-3)
  assert float(metrics["dmd_grad_norm"]) < 1e-5
  delta = np.asarray(new.experts[0]["b"] - b)
  expected = -2 * w * (s - t_j) * np.asarray(jnp.mean(x_s - target, axis=0))
  np.testing.assert_allclose(delta[step], expected, rtol=2e-3, atol=1e-6)
  np.testing.assert_array_equal(delta[1 - step], 0.0)
  # The target from z itself (a wrong reading when j = 1) would give another update.
  if step == 1:
    wrong = -2 * w * (s - t_j) * np.asarray(jnp.mean(x_s - _gaussian_flow(z, 1.0, s), axis=0))
    assert np.max(np.abs(wrong - expected)) > 10 * np.max(np.abs(expected)) * 2e-3


# ---------------------------------------------------------------------------------------------
# (f) The GAN term: what the discriminator sees, what each loss trains
# ---------------------------------------------------------------------------------------------

REAL_MEAN = 5.0                  # real data far from the generator's x_s = -b


def _gan_cfg(source, log, gen_weight=0.0, disc_weight=0.0):
  """A 1-step plan; fakes are {"score": _fake_params(), "head": {"w"}}; tokens = scale * x
  (the fake's; the teacher's: x), logits = tokens . w; every features call is recorded."""
  def features(p, x, t, y):
    jax.debug.callback(lambda *a: log.append(tuple(np.asarray(v) for v in a)), x, t, y)
    if isinstance(p, dict):
      return _fake_value(p, x, y), p["scale"] * x
    return None, x
  gan = ts.Gan(gen_weight=gen_weight, disc_weight=disc_weight, source=source,
               head=lambda p, f: f @ p["w"], features=features)
  plan = methods.make_plan("dmd", 1, 1, 1.0, t_min=0.05)
  return _cfg(plan, lambda p, x, t, y: _fake_value(p["score"], x, y),
              teachers.gmm_teacher(FM, NUM_CLASSES), gan=gan, fake_tx=optax.sgd(1.0))


def _gan_state(cfg):
  fake = {"score": _fake_params(), "head": {"w": jnp.asarray([0.5, -1.0], jnp.float32)}}
  return ts.create_state(0, fake, 1, cfg.gen_tx, cfg.fake_tx,
                         expert_init={"b": jnp.asarray([0.3, -0.7], jnp.float32)})


@pytest.mark.parametrize("source", ["fake", "teacher"])
def test_gan_discriminator_sees_real_data_only_in_its_real_branch(source):
  """fake_step with the GAN term: the source network is evaluated once on the generator's x_t
  (its labels) and once on real data re-noised at the same t (the real labels): (x - (1-t) x0)/t
  is N(0, 1) for x0 = REAL_MEAN there and for x0 = x_s = -b in the fake branch. The head's SGD(1)
  update is -disc_weight (mean sig(l_f) f_fake - mean sig(-l_r) f_real) from the recorded
  tokens; the score gets the discriminator's gradient only when source = "fake" (DMD2);
  with "teacher" its update equals the plain step's (FastGen: the head alone)."""
  log, wd = [], 0.1
  cfg = _gan_cfg(source, log, disc_weight=wd)
  state = _gan_state(cfg)
  y, key = jnp.zeros((B,), jnp.int32), jax.random.PRNGKey(4)
  real = {"x": jnp.full((B, D), REAL_MEAN), "y": jnp.ones((B,), jnp.int32)}
  new, metrics = jax.jit(functools.partial(ts.fake_step, cfg, 0))(state, _gmm(), y, key, real)
  jax.effects_barrier()
  assert len(log) == 2
  (x_f, t_f, y_f), (x_r, t_r, y_r) = log
  np.testing.assert_array_equal(y_f, 0)
  np.testing.assert_array_equal(y_r, 1)
  np.testing.assert_array_equal(t_f, t_r)
  t = t_f[:, None]
  for x, x0 in ((x_r, REAL_MEAN), (x_f, -np.asarray(state.experts[0]["b"]))):
    z = (x - (1 - t) * x0) / t
    assert abs(z.mean()) < 0.3 and abs(z.std() - 1) < 0.3
  scale = float(_fake_params()["scale"]) if source == "fake" else 1.0
  w = np.asarray(state.fakes[0]["head"]["w"])
  f_f, f_r = scale * x_f, scale * x_r
  sig = lambda v: 1 / (1 + np.exp(-v))
  grad_w = np.mean(sig(f_f @ w)[:, None] * f_f, 0) - np.mean(sig(-(f_r @ w))[:, None] * f_r, 0)
  np.testing.assert_allclose(np.asarray(new.fakes[0]["head"]["w"]) - w, -wd * grad_w,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(metrics["d_real"]), np.mean(sig(f_r @ w)), rtol=1e-5)
  plain = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, disc_weight=0.0))
  log.clear()
  ref, _ = jax.jit(functools.partial(ts.fake_step, plain, 0))(state, _gmm(), y, key, real)
  same = np.allclose(np.asarray(ref.fakes[0]["score"]["scale"]),
                     np.asarray(new.fakes[0]["score"]["scale"]), rtol=0, atol=0)
  assert same == (source == "teacher")


def test_gan_generator_gradient_flows_through_the_fake_features():
  """generator_step with the GAN term: features are read once, on the generator's x_t (no real
  data); the expert's update differs from the plain DMD update by
  -gen_weight mean_i[sig(-l_i) scale (1 - t_i)] w (x_t = (1-t) x_s + t eps, x_s = -b,
  l = scale x_t . w): the head's gradient reaches the generator through the frozen fake."""
  log, gw = [], 0.05
  cfg = _gan_cfg("fake", log, gen_weight=gw, disc_weight=0.1)
  state = _gan_state(cfg)
  y, key = _labels(3), jax.random.PRNGKey(2)
  new, metrics = jax.jit(functools.partial(ts.generator_step, cfg, 0))(state, _gmm(), y, key)
  jax.effects_barrier()
  assert len(log) == 1
  x_t, t, y_seen = log[0]
  np.testing.assert_array_equal(y_seen, np.asarray(y))
  plain = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, gen_weight=0.0))
  ref, _ = jax.jit(functools.partial(ts.generator_step, plain, 0))(state, _gmm(), y, key)
  jax.effects_barrier()
  scale, w = float(_fake_params()["scale"]), np.asarray(state.fakes[0]["head"]["w"])
  logits = scale * x_t @ w
  sig = lambda v: 1 / (1 + np.exp(-v))
  expected = -gw * np.mean(sig(-logits) * scale * (1 - t)) * w
  delta = np.asarray(new.experts[0]["b"]) - np.asarray(ref.experts[0]["b"])
  np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(metrics["gan_gen_loss"]), np.mean(np.log1p(np.exp(-logits))),
                             rtol=1e-5)
  chex.assert_trees_all_equal(new.fakes, state.fakes)        # the generator step trains no fake
