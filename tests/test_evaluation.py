"""Tests of pdmd_jax.evaluation: each metric on exact, collapsed, widened and shifted samples."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdmd_jax.data import gmm as gmm_lib
from pdmd_jax.evaluation import gmm_metrics as gm

N = 20_000
GMMS = {"ring": gmm_lib.ring(), "random": gmm_lib.random_mixture()}


def _null_labels(gmm, n=N):
  # y == num_classes selects the whole mixture (the unconditional branch).
  return jnp.full((n,), int(np.max(np.asarray(gmm.classes))) + 1, jnp.int32)


def _exact(gmm, seed, n=N):
  x, mode = gmm_lib.sample(jax.random.PRNGKey(seed), gmm, _null_labels(gmm, n))
  return np.asarray(x, np.float64), np.asarray(mode)


@pytest.fixture(scope="module", params=sorted(GMMS))
def exact_pair(request):
  """(gmm, x, modes of x, y): two independent exact sample sets of size N."""
  gmm = GMMS[request.param]
  x, mode = _exact(gmm, 0)
  y, _ = _exact(gmm, 1)
  return gmm, x, mode, y


def test_exact_samples_score_perfectly(exact_pair):
  gmm, x, mode, y = exact_pair
  idx, dist = gm.assign_modes(jnp.asarray(x), gmm)  # jax input accepted
  assert np.mean(idx == mode) > 0.999
  np.testing.assert_array_less(0.0, dist)
  report = gm.gmm_report(x, gmm, reference=y)
  assert report["modes_covered"] == report["num_modes"] == gmm.num_modes
  assert gm.modes_covered(x, gmm) == gmm.num_modes
  assert report["weight_error_max"] < 0.02
  assert report["weight_error_mean"] <= report["weight_error_max"]
  assert report["weight_error_max"] == pytest.approx(gm.weight_error(x, gmm))
  np.testing.assert_allclose(report["mode_weights"], gm.mode_weights(x, gmm))
  np.testing.assert_allclose(sum(report["mode_weights"]), 1.0, rtol=1e-12)
  assert abs(report["std_ratio"] - 1.0) < 0.03
  assert report["std_ratio"] == pytest.approx(gm.intra_mode_std_ratio(x, gmm))
  assert abs(report["rms_std_ratio"] - 1.0) < 0.03
  assert report["rms_std_ratio"] == pytest.approx(gm.intra_mode_rms_ratio(x, gmm))
  assert report["outlier_fraction"] == pytest.approx(1e-3, abs=1e-3)   # the 99.9% radius
  assert report["sliced_wasserstein"] < 0.05
  assert report["mmd"] < 5e-3
  assert all(isinstance(v, float) for k, v in report.items() if k != "mode_weights")


def test_collapsed_samples_cover_two_modes(exact_pair):
  gmm, x, mode, _ = exact_pair
  collapsed = x[mode < 2]
  report = gm.gmm_report(collapsed, gmm)
  assert report["modes_covered"] == 2
  assert report["weight_error_max"] > 0.3
  np.testing.assert_array_equal(np.asarray(report["mode_weights"])[2:], 0.0)
  # The samples that are present still have the right spread.
  assert abs(report["std_ratio"] - 1.0) < 0.05


def test_std_ratio_of_widened_modes(exact_pair):
  gmm, x, mode, _ = exact_pair
  mu = np.asarray(gmm.means, np.float64)[mode]
  wide = mu + 1.5 * (x - mu)
  assert gm.intra_mode_std_ratio(wide, gmm) == pytest.approx(1.5, abs=0.04)
  assert gm.modes_covered(wide, gmm) == gmm.num_modes  # wider, but still covering


def test_std_ratio_robust_to_outliers_between_modes():
  gmm = GMMS["ring"]
  x, mode = _exact(gmm, 2)
  means = np.asarray(gmm.means, np.float64)
  # 5% of the samples replaced by points half-way between adjacent modes.
  k = N // 20
  x[:k] = 0.5 * (means[mode[:k]] + means[(mode[:k] + 1) % gmm.num_modes])
  idx, _ = gm.assign_modes(x, gmm)
  naive = np.sqrt(np.mean(np.sum((x - means[idx]) ** 2, 1) / gmm.dim)) / 0.15
  assert naive > 1.15  # a plain RMS would be dominated by the outliers ...
  assert abs(gm.intra_mode_std_ratio(x, gmm) - 1.0) < 0.06  # ... the median-based one is not


def test_narrow_core_with_heavy_tails_against_the_closed_forms():
  """Each ring mode's offsets scaled by 0.7 (85% of samples) or 2.0 (15%): the variance is
  about right (rms ratio sqrt(.85 .49 + .15 4) = 1.008) while the core is too narrow (the
  median-based ratio solves .85 F(m / .49) + .15 F(m / 4) = 1/2 with F the chi2_2 CDF) and
  15% x P(chi2_2 > (r / 2 tau)^2) = .15 exp(-r^2 / 8 tau^2) of the samples lie beyond the
  99.9% radius r. The distilled ring's modes look like this (docs/results/mode_spread.md)."""
  from scipy import optimize  # pylint: disable=import-outside-toplevel
  gmm = GMMS["ring"]
  x, mode = _exact(gmm, 3)
  mu = np.asarray(gmm.means, np.float64)[mode]
  scale = np.where(np.random.default_rng(0).random(N) < 0.15, 2.0, 0.7)[:, None]
  x = mu + scale * (x - mu)
  cdf = lambda v: 1.0 - np.exp(-v / 2.0)
  m = optimize.brentq(lambda m: 0.85 * cdf(m / 0.49) + 0.15 * cdf(m / 4.0) - 0.5, 1e-3, 50.0)
  report = gm.gmm_report(x, gmm)
  assert report["std_ratio"] == pytest.approx(np.sqrt(m / (2 * np.log(2))), abs=0.02)
  assert report["std_ratio"] < 0.85
  assert report["rms_std_ratio"] == pytest.approx(np.sqrt(0.85 * 0.49 + 0.15 * 4.0), abs=0.03)
  r_over_tau = np.sqrt(-2.0 * np.log(1e-3))
  assert report["outlier_fraction"] == pytest.approx(0.15 * np.exp(-r_over_tau**2 / 8.0), abs=4e-3)


def test_coverage_requires_samples_inside_the_mode_radius():
  gmm = GMMS["ring"]
  means = np.asarray(gmm.means, np.float64)
  # Nearest to mode i (slightly biased towards it) but far outside r_i = 0.15 * 3.72.
  junk = np.repeat(0.55 * means + 0.45 * np.roll(means, -1, axis=0), 100, axis=0)
  np.testing.assert_allclose(gm.mode_weights(junk, gmm), 1.0 / gmm.num_modes)
  assert gm.modes_covered(junk, gmm) == 0


def test_sliced_wasserstein_of_a_translation(exact_pair):
  gmm, x, _, y = exact_pair
  d = np.zeros(gmm.dim)
  d[:2] = [0.6, -0.8]  # |d| = 1
  # Pure translation: every projected quantile moves by u.d, so SW2^2 = E (u.d)^2 = |d|^2 / D.
  # Many directions on a subset: in 16-D (u.d)^2 fluctuates, 256 would give ~4% noise (4096: ~1%).
  expected = 1.0 / math.sqrt(gmm.dim)
  sub = x[:1000]
  assert gm.sliced_wasserstein(sub, sub + d, num_projections=4096) == pytest.approx(
      expected, rel=0.03)
  assert gm.sliced_wasserstein(sub + d, sub) == pytest.approx(gm.sliced_wasserstein(sub, sub + d))
  assert gm.sliced_wasserstein(sub, sub) == 0.0
  # Independent sets of unequal sizes (quantile interpolation) agree to sampling noise.
  assert gm.sliced_wasserstein(y[:7000], x + d) == pytest.approx(expected, rel=0.08)


def test_sliced_wasserstein_is_w2_in_one_dimension():
  # In 1-D the only directions are +-1 and W2(N(0, 1), N(0, 4)) = |1 - 2| = 1.
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(N, 1)), 2.0 * rng.normal(size=(5000, 1))
  assert gm.sliced_wasserstein(x, y, num_projections=8) == pytest.approx(1.0, abs=0.03)


def test_mmd_increases_with_shift():
  gmm = GMMS["ring"]
  x, _ = _exact(gmm, 3)
  y, _ = _exact(gmm, 4)
  mmds = [gm.mmd_rbf(x + np.array([s, 0.0]), y) for s in (0.0, 0.25, 0.5, 1.0)]
  assert mmds[0] < 5e-3
  assert np.all(np.diff(mmds) > 0), mmds
  # Explicit bandwidths are honoured. With a tiny kernel only the diagonals k(x_j, x_j) = 1
  # survive: the biased estimator gives 1/n + 1/n.
  assert gm.mmd_rbf(x[:500], y[:500], bandwidths=[1e-6]) == pytest.approx(2 / 500, rel=1e-9)


def _marginal(gmm, seed, t):
  xt, _ = gmm_lib.sample_marginal(jax.random.PRNGKey(seed), gmm, _null_labels(gmm),
                                  1.0 - t, t)
  return np.asarray(xt, np.float64)


def test_boundary_distance_matches_exact_marginals():
  gmm = GMMS["ring"]
  # Near t = 0 the scaled modes are well separated: distance ~ Rayleigh, mean s sqrt(pi/2).
  t = 0.05
  s = math.sqrt((1 - t) ** 2 * 0.15**2 + t**2)
  assert gm.boundary_distance(_marginal(gmm, 5, t), gmm, 1 - t) == pytest.approx(
      s * math.sqrt(math.pi / 2), rel=0.03)
  # At t = 0.5 modes overlap: compare two exact Monte-Carlo estimates, then wrong marginals.
  exact_a = gm.boundary_distance(_marginal(gmm, 6, 0.5), gmm, 0.5)
  exact_b = gm.boundary_distance(_marginal(gmm, 7, 0.5), gmm, 0.5)
  assert exact_a == pytest.approx(exact_b, rel=0.03)
  # Too noisy (the t = 0.9 marginal): clearly beyond the Monte-Carlo noise of ~1%.
  assert gm.boundary_distance(_marginal(gmm, 8, 0.9), gmm, 0.5) > 1.1 * exact_a
  # Unscaled clean data (alpha = 1 instead of 0.5): off by about the ring radius shrink.
  assert gm.boundary_distance(_marginal(gmm, 9, 0.0), gmm, 0.5) > 1.5 * exact_a


def test_chi2_quantile_and_radii(monkeypatch):
  exact = {df: gm.chi2_quantile(0.999, df) for df in (2, 16)}
  monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import now fails: fallback path
  for df in (2, 16):
    assert gm.chi2_quantile(0.999, df) == gm._wilson_hilferty(0.999, df)
    assert gm.chi2_quantile(0.999, df) == pytest.approx(exact[df], rel=0.03)
  monkeypatch.undo()
  assert gm.chi2_quantile(0.999, 2) == pytest.approx(-2 * math.log(1e-3))  # chi2_2 is Exp(1/2)
  np.testing.assert_allclose(gm.mode_radii(GMMS["ring"]), 0.15 * math.sqrt(-2 * math.log(1e-3)),
                             rtol=1e-6)


def test_markdown_table():
  rows = [{"method": "pdmd", "modes": [8.0, 6.0], "seeds": 2}, {"method": "dmd", "modes": 3.25}]
  assert gm.markdown_table(rows, ["method", "modes", "seeds"]) == (
      "| method | modes | seeds |\n"
      "|---|---|---|\n"
      "| pdmd | 7 ± 1 | 2 |\n"
      "| dmd | 3.25 |  |")


def test_boundary_marginals_follow_unequal_phases(gmm_config):
  """gmm_eval reports each phase boundary on the grid time where that phase ends: the 1 + 3
  plan's one boundary is the 4-phase plan's first (t = 0.9 at shift 3), the 3 + 1 plan's its
  third (t = 0.5); the same noise, the same untrained experts and the same teacher give the
  same distances there."""
  from pdmd_jax import trainer  # pylint: disable=import-outside-toplevel
  from pdmd_jax.evaluation import gmm_eval  # pylint: disable=import-outside-toplevel

  def boundaries(variant, sizes=()):
    config = gmm_config(variant + ",runlocal")
    config.steps_per_phase, config.init_fit.steps = sizes, 20
    run = trainer.build(config, None, devices=jax.devices()[:1])
    out = gmm_eval.evaluate(run, trainer.initial_state(run), None, tag="t", verbose=False)
    return {k: v for k, v in out.items() if k.startswith("boundary_")}

  four = boundaries("method=phased_dmd,steps=4")
  two = "method=phased_dmd_sgts,steps=4,phases=2"
  for sizes, k in (((1, 3), 1), ((3, 1), 3)):
    out = boundaries(two, sizes)
    assert sorted(out) == sorted(f"boundary_1/{m}" for m in ("t", "student_dist",
                                                             "teacher_dist", "ratio"))
    for m in ("t", "student_dist", "teacher_dist"):
      expected = four[f"boundary_{k}/{m}"]
      assert out[f"boundary_1/{m}"] == pytest.approx(expected, rel=1e-6), (sizes, m)
  assert four["boundary_1/t"] == pytest.approx(0.9) and four["boundary_3/t"] == pytest.approx(0.5)
