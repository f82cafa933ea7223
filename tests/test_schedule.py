"""Schedule identities (spec §7 items 1, 2, 3, 8, 9, 11), t-samplers and phase plans.

Expected values come from outside the implementation: closed forms at specific numbers worked
out by hand (in the docstrings), limits, consistency identities between different functions,
Monte-Carlo estimates and round trips; never the function body written out again.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

from pdmd_jax import losses
from pdmd_jax import methods
from pdmd_jax import schedule as S

SCHEDULE_NAMES = (("flow_matching", "flow_matching"), ("vp_cosine", "vp_cosine"))

# (t, s) pairs with s < t, including s = 0 and t = 1.
T_S_PAIRS = np.array([[0.3, 0.0], [0.5, 0.1], [0.8, 0.6], [0.95, 0.8333], [0.99, 0.9375],
                      [1.0, 0.5], [0.7, 0.69]], np.float32)

# Schedules written out independently of pdmd_jax.schedule (numpy, float64): (alpha_t, sigma_t).
HAND = {"flow_matching": lambda t: (1.0 - t, t),
        "vp_cosine": lambda t: (np.cos(np.pi * t / 2), np.sin(np.pi * t / 2))}

# Hand-worked transitions. FM, s = 1/4, t = 3/4: alpha_s = 3/4, alpha_t = 1/4, so
# alpha_{t|s} = 1/3 and sigma_{t|s}^2 = 9/16 - (1/9)(1/16) = 80/144 = 5/9.
# VP cosine, s = 1/3, t = 2/3: alpha_s = sqrt3/2, sigma_s = 1/2, alpha_t = 1/2, sigma_t = sqrt3/2,
# so alpha_{t|s} = 1/sqrt3 and sigma_{t|s}^2 = 3/4 - (1/3)(1/4) = 2/3.
EXACT_TRANSITIONS = (
    ("flow_matching", 0.25, 0.75, 1.0 / 3.0, np.sqrt(5.0) / 3.0),
    ("vp_cosine", 1.0 / 3.0, 2.0 / 3.0, 1.0 / np.sqrt(3.0), np.sqrt(2.0 / 3.0)))


def _rand(seed, shape):
  """Standard normal test inputs (numpy RNG: cheaper than eager jax.random on CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _draw(sampler, seed, n):
  """n samples of a TimeSampler, jitted (one compilation instead of eager dispatch)."""
  return np.asarray(jax.jit(lambda k: sampler(k, (n,)))(jax.random.PRNGKey(seed)))


class ExactValuesTest(parameterized.TestCase):
  """Closed forms at specific numbers, and the limits s = 0 and t = s."""

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_endpoints(self, name):
    """alpha_0 = 1, sigma_0 = 0 (clean data) and alpha_1 = 0, sigma_1 = 1 (pure noise).

    Catches a schedule with alpha and sigma swapped or a time axis reversed.
    """
    a, s = S.alpha_sigma(S.get_schedule(name), jnp.asarray([0.0, 1.0]))
    np.testing.assert_allclose(a, [1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(s, [0.0, 1.0], atol=1e-7)
    t = np.linspace(0.0, 1.0, 11)
    a, s = S.alpha_sigma(S.get_schedule(name), jnp.asarray(t, jnp.float32))
    want_a, want_s = HAND[name](t)
    np.testing.assert_allclose(a, want_a, atol=1e-6)
    np.testing.assert_allclose(s, want_s, atol=1e-6)

  @parameterized.named_parameters(*[(e[0], *e) for e in EXACT_TRANSITIONS])
  def test_transition_at_hand_worked_point(self, name, s, t, a_ts, s_ts):
    """FM (1/4 -> 3/4): (1/3, sqrt5/3); VP cosine (1/3 -> 2/3): (1/sqrt3, sqrt(2/3)).

    Catches alpha_{t|s} = alpha_s/alpha_t, a missing square on alpha_{t|s}, sigma_{t|s} without
    the sqrt, or the variance subtracted the wrong way round.
    """
    sched = S.get_schedule(name)
    got = S.transition(sched, jnp.float32(t), jnp.float32(s))
    np.testing.assert_allclose(np.asarray(got, np.float64), [a_ts, s_ts], rtol=1e-6)

  def test_dmd_weight_at_hand_worked_points(self):
    """w_{t|s} = alpha_t alpha_{t|s} / (alpha_t sigma_t + sigma_t^2):

    FM, s = 1/4, t = 3/4: (1/4)(1/3) / (3/16 + 9/16) = 1/9; s = 0: (1/16) / (3/4) = 1/12.
    VP, s = 1/3, t = 2/3: (1/2)(1/sqrt3) / (sqrt3/4 + 3/4) = 2 / (3 (1 + sqrt3)).
    Catches w_{t|s} missing its alpha_{t|s} factor (1/12 instead of 1/9) or a wrong denominator.
    """
    fm, vp = S.flow_matching(), S.variance_preserving_cosine()
    np.testing.assert_allclose(float(S.dmd_weight(fm, jnp.float32(0.75), 0.25)), 1 / 9, rtol=1e-6)
    np.testing.assert_allclose(float(S.dmd_weight(fm, jnp.float32(0.75), 0.0)), 1 / 12, rtol=1e-6)
    np.testing.assert_allclose(float(S.dmd_weight(vp, jnp.float32(2 / 3), jnp.float32(1 / 3))),
                               2 / (3 * (1 + np.sqrt(3))), rtol=1e-5)

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_limit_s_zero(self, name):
    """s = 0: p(x_t | x_0) itself, i.e. alpha_{t|0} = alpha_t and sigma_{t|0} = sigma_t."""
    sched = S.get_schedule(name)
    t = np.linspace(0.05, 1.0, 20)
    a_ts, s_ts = S.transition(sched, jnp.asarray(t, jnp.float32), 0.0)
    want_a, want_s = HAND[name](t)
    np.testing.assert_allclose(a_ts, want_a, atol=1e-6)
    np.testing.assert_allclose(s_ts, want_s, atol=1e-6)

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_limit_t_equals_s(self, name):
    """t = s: the transition is the identity (alpha 1, sigma at its floor sqrt(1e-8) = 1e-4)."""
    sched = S.get_schedule(name)
    s = jnp.asarray([0.0, 0.3, 0.8333, 0.99])
    a_ts, s_ts = S.transition(sched, s, s)
    np.testing.assert_allclose(a_ts, 1.0, rtol=1e-6)
    np.testing.assert_allclose(s_ts, np.sqrt(S.SIGMA2_FLOOR), rtol=1e-3)
    x, eps = _rand(20, (4, 3)), _rand(21, (4, 3))
    chex.assert_trees_all_close(S.renoise(sched, x, s, s, eps), x, atol=1e-3)


class CompositionTest(parameterized.TestCase):
  """§7 item 1: alpha_{t|s} alpha_s = alpha_t and sigma_{t|s}^2 + alpha_{t|s}^2 sigma_s^2 = sigma_t^2."""

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_transition_composes(self, name):
    """Both composition identities hold on a set of (t, s) pairs (alpha_t, sigma_t by hand)."""
    sched = S.get_schedule(name)
    t, s = T_S_PAIRS[:-1, 0].astype(np.float64), T_S_PAIRS[:-1, 1].astype(np.float64)
    a_ts, s_ts = [np.asarray(v, np.float64) for v in
                  S.transition(sched, jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32))]
    a_t, s_t = HAND[name](t)
    a_s, s_s = HAND[name](s)
    np.testing.assert_allclose(a_ts * a_s, a_t, atol=1e-6)
    np.testing.assert_allclose(s_ts**2 + a_ts**2 * s_s**2, s_t**2, atol=1e-6)
    self.assertTrue(np.all(s_ts > 0))

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_two_transitions_compose(self, name):
    """p(x_t | x_u) composed with p(x_u | x_s) is p(x_t | x_s): alpha multiplies, variance adds.

    alpha_{t|u} alpha_{u|s} = alpha_{t|s}, sigma_{t|u}^2 + alpha_{t|u}^2 sigma_{u|s}^2 = sigma_{t|s}^2.
    """
    sched = S.get_schedule(name)
    s, u, t = jnp.float32(0.2), jnp.float32(0.55), jnp.float32(0.9)
    a_tu, s_tu = S.transition(sched, t, u)
    a_us, s_us = S.transition(sched, u, s)
    a_ts, s_ts = S.transition(sched, t, s)
    np.testing.assert_allclose(float(a_tu * a_us), float(a_ts), rtol=1e-6)
    np.testing.assert_allclose(float(s_tu**2 + a_tu**2 * s_us**2), float(s_ts**2), rtol=1e-5)

  def test_flow_matching_sigma_ts_closed_form(self):
    """FM: sigma_{t|s}^2 = t^2 - (1-t)^2 s^2 / (1-s)^2 > 0 for t > s."""
    sched = S.flow_matching()
    t, s = T_S_PAIRS[:, 0].astype(np.float64), T_S_PAIRS[:, 1].astype(np.float64)
    _, s_ts = S.transition(sched, jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32))
    expected = t**2 - (1 - t)**2 * s**2 / (1 - s)**2
    self.assertTrue(np.all(expected > 0))
    np.testing.assert_allclose(np.asarray(s_ts)**2, expected, rtol=1e-4, atol=1e-6)

  def test_transition_floor(self):
    """sigma_{t|s}^2 is floored at SIGMA2_FLOOR, so t = s stays finite."""
    _, s_ts = S.transition(S.flow_matching(), jnp.float32(0.5), jnp.float32(0.5))
    np.testing.assert_allclose(float(s_ts)**2, S.SIGMA2_FLOOR, rtol=1e-3)

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_two_stage_sampling_reproduces_marginal(self, name):
    """x_s ~ p(x_s|x_0) then renoise to t gives x_t ~ N(alpha_t x_0, sigma_t^2) (Monte Carlo)."""
    sched = S.get_schedule(name)
    n, x0, s, t = 400_000, 0.7, 0.6, 0.8
    a_s, s_s = HAND[name](s)
    x_s = a_s * x0 + s_s * _rand(0, (n, 1))
    x_t = S.renoise(sched, x_s, s, jnp.full((n,), t), _rand(1, (n, 1)))
    a_t, s_t = HAND[name](t)
    tol = 5 * float(s_t) / np.sqrt(n)
    self.assertAlmostEqual(float(jnp.mean(x_t)), float(a_t) * x0, delta=tol)
    self.assertAlmostEqual(float(jnp.std(x_t)), float(s_t), delta=tol)


class ReductionAtZeroTest(parameterized.TestCase):
  """§7 item 2: every subinterval formula reduces to plain DMD at s = 0."""

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_dmd_weight_at_zero(self, name):
    """w_{t|0} = w_t = alpha_t^2 / (alpha_t sigma_t + sigma_t^2) (Eq. 7, alpha and sigma by hand)."""
    sched = S.get_schedule(name)
    t = np.linspace(0.05, 0.99, 17)
    a, s = HAND[name](t)
    np.testing.assert_allclose(S.dmd_weight(sched, jnp.asarray(t, jnp.float32), 0.0),
                               a**2 / (a * s + s**2), rtol=1e-5)

  def test_flow_matching_dmd_weights(self):
    """FM: w_t = (1-t)^2/t and w_{t|s} = (1-t)^2 / ((1-s) t)."""
    sched = S.flow_matching()
    t = np.linspace(0.05, 0.99, 17).astype(np.float32)
    np.testing.assert_allclose(S.dmd_weight(sched, jnp.asarray(t), 0.0), (1 - t)**2 / t,
                               rtol=1e-5)
    for s in (0.3, 0.6, 0.8333):
      tt = t[t > s]
      np.testing.assert_allclose(S.dmd_weight(sched, jnp.asarray(tt), s),
                                 (1 - tt)**2 / ((1 - s) * tt), rtol=1e-5)

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_fake_targets_at_zero(self, name):
    """Eq. 11 target -> eps - x_0 (= Eq. 4); Eq. 13 -> weight min(1/sigma_t^2, 10), scale sigma_t.

    Catches a subinterval target that does not reduce to the teacher's own objective at s = 0.
    """
    sched = S.get_schedule(name)
    b = 16
    x0, eps = _rand(0, (b, 3)), _rand(1, (b, 3))
    t = np.linspace(0.02, 0.98, b)
    _, s_t = HAND[name](t)
    t = jnp.asarray(t, jnp.float32)
    w, scale, target = losses.fake_target(sched, x0, 0.0, t, eps, "eq11")
    chex.assert_trees_all_close(target, eps - x0, atol=1e-5)
    chex.assert_trees_all_close(w, jnp.ones((b,)))
    chex.assert_trees_all_close(scale, jnp.ones((b, 1)))
    w13, scale13, target13 = losses.fake_target(sched, x0, 0.0, t, eps, "eq13")
    np.testing.assert_allclose(w13, np.minimum(1.0 / s_t**2, 10.0), rtol=1e-5)
    np.testing.assert_allclose(scale13[:, 0], s_t, rtol=1e-6)
    np.testing.assert_allclose(target13, s_t[:, None] * (eps - x0), atol=1e-5)
    # Eq. 13 loss at s = 0 is min(1, 10 sigma_t^2) ||psi - (eps - x0)||^2.
    psi = _rand(2, (b, 3))
    per = jax.vmap(lambda *a: losses.fake_loss(*(v[None] for v in a)))(psi, w13, scale13, target13)
    expected = np.minimum(1.0, 10 * s_t**2) * np.mean((psi - (eps - x0))**2, axis=1)
    np.testing.assert_allclose(per, expected, rtol=1e-4, atol=1e-6)

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_eq12_target_is_the_x0_of_the_eq11_target(self, name):
    """The Eq. 12 target x0~ is the x0 that v_to_x0 reads off the Eq. 11 target at x_t.

    Independent pieces: renoise (x_t), fake_target('eq11') (v target) and v_to_x0 must agree on
    x0~ = x_s/alpha_s - alpha_t sigma_s^2 / (alpha_s^2 sigma_{t|s}) eps; at s = 0 that is x_0.
    """
    sched = S.get_schedule(name)
    x0, eps = _rand(3, (8, 2)), _rand(4, (8, 2))
    t = jnp.linspace(0.1, 0.9, 8)
    x_t = S.renoise(sched, x0, 0.0, t, eps)
    _, _, v_target = losses.fake_target(sched, x0, 0.0, t, eps, "eq11")
    chex.assert_trees_all_close(S.v_to_x0(sched, x_t, t, v_target), x0, atol=1e-5)

  def test_eq11_eq12_targets_at_hand_worked_point(self):
    """FM, s = 1/4, t = 3/4 (alpha_{t|s} = 1/3, sigma_{t|s} = sqrt5/3):

    x0~ = (4/3) x_s - eps / (12 sqrt5), eps~ = 9 eps / (4 sqrt5), and the Eq. 11 target
    eps~ - x0~ = 7 eps / (3 sqrt5) - (4/3) x_s; Eq. 13: weight 9/5, scale sqrt5/3, target
    (7/9) eps - (4 sqrt5 / 9) x_s. Catches any wrong coefficient of Eq. 11/13 at s > 0.
    """
    sched = S.flow_matching()
    x_s = jnp.asarray([[1.0], [0.0], [2.0]])
    eps = jnp.asarray([[0.0], [1.0], [-1.0]])
    t = jnp.full((3,), 0.75)
    r5 = np.sqrt(5.0)
    _, _, v = losses.fake_target(sched, x_s, 0.25, t, eps, "eq11")
    want_v = 7 / (3 * r5) * np.asarray(eps) - 4 / 3 * np.asarray(x_s)
    np.testing.assert_allclose(v, want_v, rtol=1e-6, atol=1e-6)
    x_t = S.renoise(sched, x_s, 0.25, t, eps)
    np.testing.assert_allclose(x_t, np.asarray(x_s) / 3 + r5 / 3 * np.asarray(eps), rtol=1e-6)
    want_x0 = 4 / 3 * np.asarray(x_s) - np.asarray(eps) / (12 * r5)
    np.testing.assert_allclose(S.v_to_x0(sched, x_t, t, v), want_x0, rtol=1e-5, atol=1e-6)
    w, scale, target = losses.fake_target(sched, x_s, 0.25, t, eps, "eq13")
    np.testing.assert_allclose(w, 9 / 5, rtol=1e-6)
    np.testing.assert_allclose(scale[:, 0], r5 / 3, rtol=1e-6)
    np.testing.assert_allclose(target, 7 / 9 * np.asarray(eps) - 4 * r5 / 9 * np.asarray(x_s),
                               rtol=1e-6, atol=1e-6)


class PseudoPairTest(parameterized.TestCase):
  """§7 item 3: pseudo pairs (x0~, eps~) reproduce x_t and the Eq. 11 target is eps~ - x0~."""

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_pseudo_pairs(self, name):
    """alpha_t x0~ + sigma_t eps~ == x_t, and fake_target('eq11') == eps~ - x0~."""
    sched = S.get_schedule(name)
    b = 32
    x_s, eps = _rand(5, (b, 4)), _rand(6, (b, 4))
    for s in (0.0, 0.3, 0.6, 0.8333):
      t = jnp.linspace(s + 0.01, 0.999, b)
      a_t, s_t = [v[:, None] for v in S.alpha_sigma(sched, t)]
      a_s, s_s = S.alpha_sigma(sched, jnp.float32(s))
      s_ts = S.transition(sched, t, s)[1][:, None]
      x0_tilde = x_s / a_s - a_t * s_s**2 / (a_s**2 * s_ts) * eps
      eps_tilde = s_t * eps / s_ts
      x_t = S.renoise(sched, x_s, s, t, eps)
      chex.assert_trees_all_close(a_t * x0_tilde + s_t * eps_tilde, x_t, atol=2e-5, rtol=1e-5)
      w, scale, target = losses.fake_target(sched, x_s, s, t, eps, "eq11")
      chex.assert_trees_all_close(target, eps_tilde - x0_tilde, atol=2e-5, rtol=1e-5)
      chex.assert_trees_all_close(w, jnp.ones((b,)))
      chex.assert_trees_all_close(scale, jnp.ones((b, 1)))


def _gauss_posterior(name, x, t, mu=0.7, tau=0.5):
  """x_0 ~ N(mu, tau^2): (score, E[x0|x_t], E[eps|x_t]) in closed form (numpy float64).

  x_t ~ N(alpha mu, alpha^2 tau^2 + sigma^2); E[x0|x] = mu + alpha tau^2 (x - alpha mu)/var
  and E[eps|x] = sigma (x - alpha mu)/var (spec §7 item 5).
  """
  a, s = HAND[name](t)
  var = a**2 * tau**2 + s**2
  r = x - a * mu
  return -r / var, mu + a * tau**2 * r / var, s * r / var


class ConversionTest(parameterized.TestCase):
  """§7 item 8: velocity <-> x0 / eps / score conversions with v := eps - x_0."""

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_round_trips(self, name):
    """(x0, eps) -> x_t (built by hand) and v = eps - x0 -> v_to_x0, v_to_eps give (x0, eps) back;
    v -> score -> score_to_v gives v back; score = -eps/sigma_t.

    Catches alpha and sigma swapped in any conversion, or score_to_v not inverting v_to_score.
    """
    sched = S.get_schedule(name)
    b = 24
    x0, eps = _rand(7, (b, 3)), _rand(8, (b, 3))
    t = np.linspace(0.02, 0.98, b)
    a, s = [v[:, None] for v in HAND[name](t)]
    x_t = jnp.asarray(a * np.asarray(x0) + s * np.asarray(eps), jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    v = S.x0_eps_to_v(x0, eps)
    chex.assert_trees_all_close(S.v_to_x0(sched, x_t, t, v), x0, atol=5e-6)
    chex.assert_trees_all_close(S.v_to_eps(sched, x_t, t, v), eps, atol=5e-6)
    chex.assert_trees_all_close(S.x0_eps_to_v(S.v_to_x0(sched, x_t, t, v),
                                              S.v_to_eps(sched, x_t, t, v)), v, atol=1e-5)
    score = S.v_to_score(sched, x_t, t, v)
    np.testing.assert_allclose(score, -np.asarray(eps) / s, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(S.score_to_v(sched, x_t, t, score), v, rtol=1e-4, atol=1e-4)

  def test_flow_matching_hand_worked_point(self):
    """FM, t = 3/4, x0 = -1/2, eps = 3/2: x_t = -1/8 + 9/8 = 1, v = 2, score = -eps/t = -2.

    Catches an FM schedule with alpha = t, sigma = 1 - t (the round trips alone would not).
    """
    sched = S.flow_matching()
    x_t, v, t = jnp.asarray([[1.0]]), jnp.asarray([[2.0]]), jnp.asarray([0.75])
    np.testing.assert_allclose(S.v_to_x0(sched, x_t, t, v), [[-0.5]], atol=1e-6)
    np.testing.assert_allclose(S.v_to_eps(sched, x_t, t, v), [[1.5]], atol=1e-6)
    np.testing.assert_allclose(S.v_to_score(sched, x_t, t, v), [[-2.0]], atol=1e-6)
    np.testing.assert_allclose(S.score_to_v(sched, x_t, t, jnp.asarray([[-2.0]])), [[2.0]],
                               atol=1e-6)
    np.testing.assert_allclose(S.renoise(sched, jnp.asarray([[-0.5]]), 0.0, t,
                                         jnp.asarray([[1.5]])), [[1.0]], atol=1e-6)

  @parameterized.named_parameters(*SCHEDULE_NAMES)
  def test_gaussian_tweedie(self, name):
    """For x_0 ~ N(0.7, 0.5^2) the exact velocity v* = E[eps|x] - E[x0|x] (posterior means in
    closed form) converts to the closed-form score of p_t, and back; v_to_x0 gives E[x0|x]
    (Tweedie). At FM t = 0.8: v* = -2.0154, -0.8615, 0.2923, 1.4462 (spec §7 item 5).

    Catches a wrong Eq. 5 coefficient (sigma + sigma^2/alpha) or sign in score_to_v/v_to_score,
    and (two Gaussians) a wrong score difference s_T - s_F = -alpha (v_T - v_F)/(sigma (alpha+sigma)).
    """
    sched = S.get_schedule(name)
    xs = np.array([-1.0, 0.0, 1.0, 2.0])
    for t_val in (0.1, 0.5, 0.8, 0.95):
      score, ex0, eeps = _gauss_posterior(name, xs, t_val)
      v_star = eeps - ex0
      if name == "flow_matching" and t_val == 0.8:
        np.testing.assert_allclose(v_star, [-2.0154, -0.8615, 0.2923, 1.4462], atol=1e-4)
      x = jnp.asarray(xs, jnp.float32)[:, None]
      t = jnp.full((4,), t_val, jnp.float32)
      vj = jnp.asarray(v_star, jnp.float32)[:, None]
      np.testing.assert_allclose(S.score_to_v(sched, x, t, jnp.asarray(score, jnp.float32)[:, None])[:, 0],
                                 v_star, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(S.v_to_score(sched, x, t, vj)[:, 0], score, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(S.v_to_x0(sched, x, t, vj)[:, 0], ex0, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(S.v_to_eps(sched, x, t, vj)[:, 0], eeps, rtol=1e-4, atol=1e-4)
      # Two Gaussians: the score difference is the difference of the closed-form scores.
      score_f, ex0_f, eeps_f = _gauss_posterior(name, xs, t_val, mu=-0.3, tau=0.9)
      diff = (S.v_to_score(sched, x, t, vj)
              - S.v_to_score(sched, x, t, jnp.asarray(eeps_f - ex0_f, jnp.float32)[:, None]))
      np.testing.assert_allclose(diff[:, 0], score - score_f, rtol=1e-4, atol=1e-4)

  def test_flow_matching_special_case(self):
    """FM: x0 = x_t - t v, eps = x_t + (1-t) v, score = -(x_t + (1-t) v)/t (spec §1.2)."""
    sched = S.flow_matching()
    x_t, v = _rand(12, (10, 2)), _rand(13, (10, 2))
    t = jnp.linspace(0.05, 0.95, 10)
    tt = t[:, None]
    chex.assert_trees_all_close(S.v_to_x0(sched, x_t, t, v), x_t - tt * v, atol=1e-6)
    chex.assert_trees_all_close(S.v_to_eps(sched, x_t, t, v), x_t + (1 - tt) * v, atol=1e-6)
    chex.assert_trees_all_close(S.v_to_score(sched, x_t, t, v), -(x_t + (1 - tt) * v) / tt,
                                rtol=1e-5, atol=1e-5)


class ShiftGridTest(parameterized.TestCase):
  """§7 item 9: shifted grids, the Wan2.2 boundary split, and the clamp point mass."""

  @parameterized.named_parameters(
      ("shift5", 5.0, [1.0, 0.9375, 0.833333, 0.625, 0.0]),
      ("shift3", 3.0, [1.0, 0.9, 0.75, 0.5, 0.0]))
  def test_grid(self, shift, expected):
    """shift_5([1,.75,.5,.25,0]) = [1,.9375,.8333,.625,0]; shift_3 = [1,.9,.75,.5,0]."""
    np.testing.assert_allclose(S.grid(4, shift), expected, atol=1e-6)

  def test_shift_unshift_inverse(self):
    """unshift(shift(u)) = u, shift is monotone and fixes 0 and 1."""
    u = np.linspace(0, 1, 101)
    for s in (1.0, 3.0, 5.0):
      np.testing.assert_allclose(S.unshift(S.shift(u, s), s), u, atol=1e-12)
      self.assertTrue(np.all(np.diff(S.shift(u, s)) > 0))
      np.testing.assert_allclose(S.shift(np.array([0.0, 1.0]), s), [0.0, 1.0])

  def test_wan_boundary_splits_two_two(self):
    """The T2V boundary 0.875 puts {1, .9375} on the high-noise and {.8333, .625} on the low-noise expert."""
    steps = np.asarray(S.grid(4, 5.0))[:-1]
    high = steps >= 0.875
    np.testing.assert_array_equal(high, [True, True, False, False])
    np.testing.assert_array_equal(steps >= 0.9, [True, True, False, False])

  def test_phase_boundaries(self):
    """phase_boundaries(grid(4), 2) = (.8333, 0); (4) = (.9375, .8333, .625, 0); 3 phases raise."""
    g = S.grid(4, 5.0)
    np.testing.assert_allclose(S.phase_boundaries(g, 2), [0.833333, 0.0], atol=1e-6)
    np.testing.assert_allclose(S.phase_boundaries(g, 4), [0.9375, 0.833333, 0.625, 0.0], atol=1e-6)
    np.testing.assert_allclose(S.phase_boundaries(g, 1), [0.0], atol=1e-6)
    with self.assertRaisesRegex(ValueError, "num_phases=3"):
      S.phase_boundaries(g, 3)

  @parameterized.named_parameters(("t2v", 0.875, 1.0 / 6.0), ("i2v", 0.9, 2.0 / 7.0))
  def test_clamp_point_mass(self, floor, fraction):
    """Clamping shift_5(U(0.5, 1)) at b puts (u* - .5)/.5 on b, u* = b/(5 - 4b): 1/6 and 2/7."""
    u_star = floor / (5 - 4 * floor)
    self.assertAlmostEqual((u_star - 0.5) / 0.5, fraction, places=12)
    low = float(S.shift(0.5, 5.0))
    sampler = S.TimeSampler(low=low, high=1.0, shift_value=5.0, floor=floor, floor_mode="clamp")
    self.assertAlmostEqual(sampler.point_mass_at_floor(), fraction, places=6)
    n = 200_000
    t = _draw(sampler, 1, n)
    at_floor = np.mean(t == np.float32(floor))
    self.assertAlmostEqual(at_floor, fraction, delta=5 * np.sqrt(fraction / n))
    self.assertGreaterEqual(t.min(), np.float32(floor))
    self.assertLessEqual(t.max(), 1.0)

  @parameterized.named_parameters(("t2v", 0.875), ("i2v", 0.9))
  def test_resample_mode(self, floor):
    """Resampling never goes below the floor, has no point mass, and is uniform in u on (u*, 1)."""
    low = float(S.shift(0.5, 5.0))
    sampler = S.TimeSampler(low=low, high=1.0, shift_value=5.0, floor=floor,
                            floor_mode="resample")
    self.assertEqual(sampler.point_mass_at_floor(), 0.0)
    n = 200_000
    t = _draw(sampler, 2, n)
    self.assertGreaterEqual(t.min(), floor - 1e-6)
    self.assertLess(np.mean(np.abs(t - floor) < 1e-7), 1e-3)
    u = S.unshift(t.astype(np.float64), 5.0)
    u_star = floor / (5 - 4 * floor)
    self.assertAlmostEqual(u.mean(), 0.5 * (u_star + 1.0), delta=2e-3)

  @parameterized.named_parameters(
      ("full", 0.0, 1.0, 5.0), ("phase1", 0.833333, 1.0, 5.0), ("margins", 0.02, 0.98, 3.0),
      ("late", 0.625, 1.0, 1.0))
  def test_sampler_range_and_law(self, low, high, shift):
    """Samples lie in [low, high] and u = unshift(t) is uniform on (unshift(low), unshift(high))."""
    sampler = S.TimeSampler(low=low, high=high, shift_value=shift)
    self.assertEqual(sampler.point_mass_at_floor(), 0.0)
    t = _draw(sampler, 3, 100_000).astype(np.float64)
    self.assertGreaterEqual(t.min(), low - 1e-6)
    self.assertLessEqual(t.max(), high + 1e-6)
    u = S.unshift(t, shift)
    u_lo, u_hi = S.unshift(low, shift), S.unshift(high, shift)
    qs = np.quantile(u, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(qs, u_lo + (u_hi - u_lo) * np.array([0.1, 0.5, 0.9]), atol=5e-3)

  def test_sampler_excludes_low_endpoint(self):
    """The documented half-open range (low, high]: t == low must never be drawn."""
    sampler = S.TimeSampler(low=0.0, high=1.0, shift_value=5.0)
    n = 1 << 24  # ~2 expected draws of u == 0 exactly at float32
    t_min = jax.jit(lambda k: jnp.min(sampler(k, (n,))))(jax.random.PRNGKey(0))
    self.assertGreater(float(t_min), 0.0)
    self.assertTrue(bool(jnp.isfinite(S.dmd_weight(S.flow_matching(), t_min, 0.0))))


class EulerTest(parameterized.TestCase):
  """§7 item 11: Euler jumps compose for a constant velocity."""

  def test_euler_composition(self):
    """euler(t -> s) == euler(t' -> s) o euler(t -> t') for constant v; scalar and per-sample t."""
    x, v = _rand(14, (6, 3)), _rand(15, (6, 3))
    for t, tp, s in ((1.0, 0.9375, 0.833333), (0.833333, 0.625, 0.0), (1.0, 0.5, 0.0)):
      one = S.euler_step(x, t, s, v)
      two = S.euler_step(S.euler_step(x, t, tp, v), tp, s, v)
      chex.assert_trees_all_close(one, two, atol=1e-6)
    t = jnp.linspace(0.6, 1.0, 6)
    tp, s = t - 0.2, t - 0.5
    chex.assert_trees_all_close(S.euler_step(x, t, s, v),
                                S.euler_step(S.euler_step(x, t, tp, v), tp, s, v), atol=1e-6)

  def test_euler_is_exact_on_a_flow_matching_path(self):
    """FM paths x_t = (1-t) x0 + t eps are straight with velocity eps - x0, so one Euler step
    from x_t with that velocity lands exactly on x_s (also at s = 0: x0). Hand-worked: x0 = -1/2,
    eps = 3/2, t = 3/4 (x_t = 1, v = 2) -> s = 1/4: x_s = 1 - (1/2) 2 = 0 = (3/4)(-1/2) + (1/4)(3/2).

    Catches a step with the wrong sign of (t' - t), or a step that uses t instead of t - t'.
    """
    x0, eps = _rand(16, (6, 3)), _rand(17, (6, 3))
    path = lambda t: (1 - t) * x0 + t * eps
    for t, s in ((1.0, 0.833333), (0.75, 0.25), (0.625, 0.0)):
      chex.assert_trees_all_close(S.euler_step(path(t), t, s, eps - x0), path(s), atol=1e-5)
    np.testing.assert_allclose(S.euler_step(jnp.asarray([[1.0]]), 0.75, 0.25, jnp.asarray([[2.0]])),
                               [[0.0]], atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Phase plans
# ---------------------------------------------------------------------------------------------

G5 = [1.0, 0.9375, 0.833333, 0.625, 0.0]


class MakePlanTest(parameterized.TestCase):
  """methods.make_plan: phases, times, boundaries, gradient modes and samplers per method."""

  @parameterized.named_parameters(
      ("dmd", "dmd", [((1.0,), 0.0)], "full"),
      ("dmd_multistep", "dmd_multistep", [(tuple(G5[:4]), 0.0)], "full"),
      ("dmd2_sgts", "dmd2_sgts", [(tuple(G5[:4]), 0.0)], "sgts"),
      ("phased_dmd", "phased_dmd",
       [((1.0,), 0.9375), ((0.9375,), 0.833333), ((0.833333,), 0.625), ((0.625,), 0.0)], "full"),
      ("phased_dmd_sgts", "phased_dmd_sgts",
       [((1.0, 0.9375), 0.833333), ((0.833333, 0.625), 0.0)], "sgts"))
  def test_plan(self, method, expected, grad_mode):
    """4 steps, 2 phases (forced to 1 / N where the method fixes it), shift 5."""
    plan = methods.make_plan(method, 4, 2, 5.0)
    self.assertEqual(plan.method, method)
    self.assertLen(plan.phases, len(expected))
    self.assertEqual(plan.num_steps, 1 if method == "dmd" else 4)
    self.assertEqual(plan.grid[0], 1.0)
    self.assertEqual(plan.grid[-1], 0.0)
    for k, (phase, (times, boundary)) in enumerate(zip(plan.phases, expected)):
      self.assertEqual(phase.index, k)
      np.testing.assert_allclose(phase.times, times, atol=1e-6)
      self.assertAlmostEqual(phase.boundary, boundary, places=6)
      self.assertEqual(phase.grad_mode, grad_mode)
      self.assertEqual(phase.num_steps, len(times))
      ts = phase.t_sampler
      self.assertAlmostEqual(ts.low, boundary, places=6)
      self.assertEqual(ts.high, 1.0)
      self.assertEqual(ts.shift_value, 5.0)
      self.assertIsNone(ts.floor)
    self.assertEqual(plan.phases[-1].boundary, 0.0)
    flat = [t for p in plan.phases for t in p.times]
    np.testing.assert_allclose(flat, plan.grid[:-1], atol=0)
    self.assertLen(plan.expert_of_step(), plan.num_steps)
    self.assertIn(method, plan.describe())

  def test_dmd_is_one_step(self):
    """dmd: one step at t = 1 straight to the boundary 0, whatever num_steps says."""
    plan = methods.make_plan("dmd", 4, 4, 5.0)
    self.assertEqual(plan.grid, (1.0, 0.0))
    self.assertLen(plan.phases, 1)
    self.assertEqual(plan.phases[0].times, (1.0,))
    self.assertEqual(plan.phases[0].boundary, 0.0)

  def test_qwen_two_phase(self):
    """Shift 3, 2 phases: phase 1 (1, .9) -> .75, phase 2 (.75, .5) -> 0."""
    plan = methods.make_plan("phased_dmd_sgts", 4, 2, 3.0)
    np.testing.assert_allclose(plan.phases[0].times, (1.0, 0.9), atol=1e-6)
    self.assertAlmostEqual(plan.phases[0].boundary, 0.75, places=6)
    np.testing.assert_allclose(plan.phases[1].times, (0.75, 0.5), atol=1e-6)

  def test_multistep_phases_ablate_only_the_gradient(self):
    """phased_dmd_multistep: the SGTS plan's phases, grid and re-noise ranges, full gradient."""
    sgts = methods.make_plan("phased_dmd_sgts", 4, 2, 3.0)
    full = methods.make_plan("phased_dmd_multistep", 4, 2, 3.0)
    self.assertEqual(full.grid, sgts.grid)
    for a, b in zip(full.phases, sgts.phases):
      self.assertEqual((a.times, a.boundary, a.t_sampler), (b.times, b.boundary, b.t_sampler))
      self.assertEqual((a.grad_mode, b.grad_mode), ("full", "sgts"))

  def test_expert_routing(self):
    """expert_of_step: (0,0,1,1) for 2 phases, (0,1,2,3) for phased_dmd, (0,0,0,0) for dmd2."""
    self.assertEqual(methods.make_plan("phased_dmd_sgts", 4, 2, 5.0).expert_of_step(), (0, 0, 1, 1))
    self.assertEqual(methods.make_plan("phased_dmd", 4, 2, 5.0).expert_of_step(), (0, 1, 2, 3))
    self.assertEqual(methods.make_plan("dmd2_sgts", 4, 2, 5.0).expert_of_step(), (0, 0, 0, 0))

  def test_phase1_floor_and_margins(self):
    """phase1_floor only applies to phase 1 of multi-phase plans; t_min/t_max set the range."""
    plan = methods.make_plan("phased_dmd_sgts", 4, 2, 5.0, phase1_floor=0.875, floor_mode="clamp",
                             t_min=0.02, t_max=0.98)
    ts0, ts1 = plan.phases[0].t_sampler, plan.phases[1].t_sampler
    self.assertEqual(ts0.floor, 0.875)
    self.assertEqual(ts0.floor_mode, "clamp")
    u_star, u_hi = S.unshift(0.875, 5.0), S.unshift(0.98, 5.0)
    self.assertAlmostEqual(ts0.point_mass_at_floor(), (u_star - 0.5) / (u_hi - 0.5), places=6)
    self.assertIsNone(ts1.floor)
    self.assertAlmostEqual(ts0.low, 0.833333, places=6)
    self.assertEqual(ts1.low, 0.02)
    self.assertEqual(ts0.high, 0.98)
    single = methods.make_plan("dmd2_sgts", 4, 1, 5.0, phase1_floor=0.875)
    self.assertIsNone(single.phases[0].t_sampler.floor)
    resample = methods.make_plan("phased_dmd_sgts", 4, 2, 5.0, phase1_floor=0.9,
                                 floor_mode="resample")
    self.assertEqual(resample.phases[0].t_sampler.point_mass_at_floor(), 0.0)

  def test_explicit_grid(self):
    """grid_times overrides the shifted grid and must be strictly decreasing from 1 to 0."""
    plan = methods.make_plan("phased_dmd_sgts", 4, 2, 5.0, grid_times=[1.0, 0.9, 0.75, 0.5, 0.0])
    self.assertEqual(plan.phases[0].boundary, 0.75)
    with self.assertRaisesRegex(ValueError, "grid_times="):
      methods.make_plan("phased_dmd_sgts", 4, 2, 5.0, grid_times=[1.0, 0.5, 0.75, 0.25, 0.0])

  def test_steps_per_phase(self):
    """steps_per_phase (1, 3) on the shift-3 grid (1, .9, .75, .5, 0): phase 1 is the single
    step 1 -> 0.9 and re-noises above 0.9, phase 2 runs 0.9, 0.75, 0.5 -> 0; (3, 1) puts the
    boundary at 0.5; None is the even split (boundary 0.75)."""
    grid = (1.0, 0.9, 0.75, 0.5, 0.0)
    for sizes, boundary, route in (((1, 3), 0.9, (0, 1, 1, 1)), ((3, 1), 0.5, (0, 0, 0, 1)),
                                   (None, 0.75, (0, 0, 1, 1))):
      plan = methods.make_plan("phased_dmd_sgts", 4, 2, 3.0, grid_times=grid,
                               steps_per_phase=sizes)
      first, last = plan.phases
      self.assertEqual(first.boundary, boundary)
      self.assertEqual(plan.grid[plan.boundary_index(0)], boundary)
      self.assertEqual(plan.boundary_index(1), 4)
      self.assertEqual(first.times + last.times, grid[:-1])
      self.assertEqual(last.times[0], boundary)
      self.assertEqual(plan.expert_of_step(), route)
      self.assertEqual((first.t_sampler.low, last.t_sampler.low), (boundary, 0.0))
      self.assertEqual(last.boundary, 0.0)

  @parameterized.named_parameters(
      ("method", dict(method="dmd3"), "method="),
      ("steps_per_phase_sum", dict(method="phased_dmd_sgts", steps_per_phase=(2, 1)),
       r"steps_per_phase=\[2, 1\].*summing to num_steps=4"),
      ("steps_per_phase_zero", dict(method="phased_dmd_sgts", steps_per_phase=(0, 4)),
       r"steps_per_phase=\[0, 4\].*>= 1"),
      ("steps_per_phase_count", dict(method="phased_dmd_sgts", steps_per_phase=(1, 1, 2)),
       r"steps_per_phase=\[1, 1, 2\].*num_phases=2"),
      ("phases", dict(method="phased_dmd_sgts", num_phases=3), "num_phases=3"),
      ("phases_zero", dict(method="phased_dmd_sgts", num_phases=0), "num_phases=0"),
      ("order", dict(method="phased_dmd_sgts", order="random"), "phase_order="),
      ("floor_mode", dict(method="phased_dmd_sgts", floor_mode="reflect"), "floor_mode="),
      ("steps", dict(method="dmd_multistep", num_steps=0), "num_steps=0"))
  def test_errors_name_the_field(self, kwargs, field):
    """Invalid arguments raise ValueError whose message names the offending field."""
    args = dict(method="dmd", num_steps=4, num_phases=2, shift=5.0)
    args.update(kwargs)
    with self.assertRaisesRegex(ValueError, field):
      methods.make_plan(args.pop("method"), args.pop("num_steps"), args.pop("num_phases"),
                        args.pop("shift"), **args)


if __name__ == "__main__":
  absltest.main()
