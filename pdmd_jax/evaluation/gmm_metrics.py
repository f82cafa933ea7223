"""Sample-quality metrics against a known Gaussian mixture, plus two-sample distances.

Owns everything that scores generated samples: mode assignment, mode coverage, mode-weight
error, intra-mode spread, sliced Wasserstein, RBF MMD, the phase-boundary distance, the
one-call ``gmm_report`` and a small markdown table formatter for experiment summaries.

All functions are plain numpy on the host (float64); inputs may be jax arrays. Nothing here is
differentiated or jitted: metrics run once per evaluation, outside the training step.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import numpy as np

# A mode's "radius" is the 0.999 quantile of ||x - mu_i|| under N(mu_i, tau_i^2 I).
RADIUS_QUANTILE = 0.999
# intra_mode_std_ratio ignores samples further than this many radii from their mode.
STD_GATE_RADII = 4.0


def _np(a) -> np.ndarray:
  return np.asarray(a, dtype=np.float64)


def _gmm_np(gmm):
  """(means [M, D], stds [M], weights [M]) as float64 numpy."""
  return _np(gmm.means), _np(gmm.stds), _np(gmm.weights)


def _wilson_hilferty(q: float, df: int) -> float:
  """chi2_df quantile ~ df (1 - 2/(9 df) + z_q sqrt(2/(9 df)))^3 (~2% high at df=2, q=.999)."""
  z = statistics.NormalDist().inv_cdf(q)
  c = 2.0 / (9.0 * df)
  return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2_quantile(q: float, df: int) -> float:
  """Quantile of chi^2 with df degrees of freedom: scipy if importable, else Wilson-Hilferty."""
  try:
    from scipy.stats import chi2
  except ImportError:  # scipy ships with jax, but keep the metrics usable without it
    return _wilson_hilferty(q, df)
  return float(chi2.ppf(q, df))


def mode_radii(gmm) -> np.ndarray:
  """[M]: r_i = tau_i sqrt(chi2_D^{-1}(0.999)), the ball holding 99.9% of mode i's mass."""
  _, stds, _ = _gmm_np(gmm)
  return stds * math.sqrt(chi2_quantile(RADIUS_QUANTILE, gmm.means.shape[1]))


def assign_modes(x, gmm, alpha: float = 1.0):
  """Nearest scaled mode: idx_j = argmin_i ||x_j - alpha mu_i||; returns (idx [N], dist [N]).

  Plain Euclidean (not posterior) assignment: metrics should not depend on the weights
  they are meant to estimate.
  """
  x = _np(x)
  mu = alpha * _np(gmm.means)
  # ||x||^2 - 2 x.mu + ||mu||^2 avoids an [N, M, D] temporary; float64 keeps it accurate.
  sq = (np.sum(x**2, 1)[:, None] - 2.0 * x @ mu.T + np.sum(mu**2, 1)[None, :])
  idx = np.argmin(sq, axis=1)
  dist = np.sqrt(np.maximum(sq[np.arange(x.shape[0]), idx], 0.0))
  return idx, dist


def _weights_from_idx(idx, num_modes: int) -> np.ndarray:
  return np.bincount(idx, minlength=num_modes) / max(len(idx), 1)


def mode_weights(x, gmm) -> np.ndarray:
  """[M]: w_hat_i = #{j : idx_j = i} / N, the fraction of samples nearest to mode i."""
  idx, _ = assign_modes(x, gmm)
  return _weights_from_idx(idx, gmm.means.shape[0])


def _covered_mask(idx, dist, gmm, min_fraction: float) -> np.ndarray:
  _, _, weights = _gmm_np(gmm)
  radii = mode_radii(gmm)
  inside = dist <= radii[idx]
  counts = np.bincount(idx[inside], minlength=weights.shape[0])
  return counts >= min_fraction * weights * len(idx)


def modes_covered(x, gmm, min_fraction: float = 0.2) -> int:
  """#{i : #{j : idx_j = i, ||x_j - mu_i|| <= r_i} >= min_fraction pi_i N}.

  Requiring samples inside r_i (not just nearest) stops a blob of junk between modes from
  counting as coverage; the min_fraction of the expected count pi_i N tolerates weight error.
  """
  idx, dist = assign_modes(x, gmm)
  return int(np.sum(_covered_mask(idx, dist, gmm, min_fraction)))


def weight_error(x, gmm) -> float:
  """max_i |w_hat_i - pi_i| (gmm_report also gives the mean over modes)."""
  return float(np.max(np.abs(mode_weights(x, gmm) - _np(gmm.weights))))


def _std_ratio(x, idx, dist, gmm, min_count: int) -> float:
  means, stds, weights = _gmm_np(gmm)
  dim = means.shape[1]
  gate = STD_GATE_RADII * mode_radii(gmm)
  chi2_median = chi2_quantile(0.5, dim)
  num, den = 0.0, 0.0
  for i in range(means.shape[0]):
    sel = (idx == i) & (dist <= gate[i])
    if np.sum(sel) < min_count:
      continue  # an empty (dropped) mode has no spread; coverage reports it instead
    sq = np.sum((x[sel] - means[i]) ** 2, axis=1)
    s_i = math.sqrt(np.median(sq) / chi2_median)
    num += weights[i] * s_i / stds[i]
    den += weights[i]
  return num / den if den > 0 else float("nan")


def _rms_ratio(x, idx, dist, gmm, min_count: int) -> float:
  means, stds, weights = _gmm_np(gmm)
  dim = means.shape[1]
  gate = STD_GATE_RADII * mode_radii(gmm)
  num, den = 0.0, 0.0
  for i in range(means.shape[0]):
    sel = (idx == i) & (dist <= gate[i])
    if np.sum(sel) < min_count:
      continue
    s_i = math.sqrt(np.mean(np.sum((x[sel] - means[i]) ** 2, axis=1)) / dim)
    num += weights[i] * s_i / stds[i]
    den += weights[i]
  return num / den if den > 0 else float("nan")


def intra_mode_rms_ratio(x, gmm, min_count: int = 10) -> float:
  """``intra_mode_std_ratio`` with the root mean square in place of the median: s_i =
  sqrt(mean ||x - mu_i||^2 / D) over the same samples (within 4 r_i of mu_i).

  Read together with the (median-based) std ratio: for Gaussian modes both are 1.0; a mode with
  a narrow core and heavy tails has std_ratio < 1 < rms_std_ratio (the core is too tight while
  the variance is too large), which a single number would hide.
  """
  x = _np(x)
  idx, dist = assign_modes(x, gmm)
  return _rms_ratio(x, idx, dist, gmm, min_count)


def outlier_fraction(x, gmm) -> float:
  """Fraction of samples farther from their nearest mode than its radius r_i (the ball with
  99.9% of an exact mode's mass): 0.001 for exact samples; stranded and tail samples raise it."""
  x = _np(x)
  idx, dist = assign_modes(x, gmm)
  return float(np.mean(dist > mode_radii(gmm)[idx]))


def intra_mode_std_ratio(x, gmm, min_count: int = 10) -> float:
  """sum_i pi_i (s_i / tau_i) / sum_i pi_i over modes with >= min_count samples.

  s_i is the per-dimension spread of the samples assigned to mode i and within 4 r_i of mu_i,
  estimated robustly as s_i = sqrt(median ||x - mu_i||^2 / median(chi2_D)). For samples
  from N(mu_i, s^2 I), ||x - mu_i||^2 / s^2 ~ chi2_D, so s_i is the RMS per-dimension
  deviation (exactly 1.0 tau_i for exact samples, in expectation), but outliers stranded
  between modes move a median far less than a mean square (breakdown 50%). The Voronoi
  cell truncates spreads approaching half the inter-mode gap, so very wide modes saturate.
  """
  x = _np(x)
  idx, dist = assign_modes(x, gmm)
  return _std_ratio(x, idx, dist, gmm, min_count)


def _quantiles(sorted_vals: np.ndarray, levels: np.ndarray) -> np.ndarray:
  """Linear interpolation of sorted [n, P] columns at levels in (0, 1): position q n - 1/2."""
  n = sorted_vals.shape[0]
  pos = np.clip(levels * n - 0.5, 0.0, n - 1)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, n - 1)
  frac = (pos - lo)[:, None]
  return sorted_vals[lo] * (1.0 - frac) + sorted_vals[hi] * frac


def sliced_wasserstein(x, y, num_projections: int = 256, seed: int = 0) -> float:
  """SW2 = sqrt(E_u int_0^1 (F^{-1}_{u.x}(q) - F^{-1}_{u.y}(q))^2 dq), u uniform on S^{D-1}.

  The expectation is a Monte-Carlo over num_projections fixed-seed directions; the quantile
  functions are compared at K = max(N_x, N_y) midpoint levels, so unequal sizes interpolate
  (and equal sizes reduce to matching sorted projections). A translation by d gives
  SW2 = sqrt(E (u.d)^2) = |d| / sqrt(D).
  """
  x, y = _np(x), _np(y)
  u = np.random.default_rng(seed).normal(size=(x.shape[1], num_projections))
  u /= np.linalg.norm(u, axis=0, keepdims=True)
  px, py = np.sort(x @ u, axis=0), np.sort(y @ u, axis=0)
  if px.shape[0] != py.shape[0]:
    k = max(px.shape[0], py.shape[0])
    levels = (np.arange(k) + 0.5) / k
    px, py = _quantiles(px, levels), _quantiles(py, levels)
  return float(np.sqrt(np.mean((px - py) ** 2)))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  sq = np.sum(a**2, 1)[:, None] - 2.0 * a @ b.T + np.sum(b**2, 1)[None, :]
  if a is b:
    np.fill_diagonal(sq, 0.0)  # the expansion leaves ~1e-16 rounding on the diagonal
  return np.maximum(sq, 0.0)


def _subsample(a: np.ndarray, max_points: int, rng) -> np.ndarray:
  if a.shape[0] <= max_points:
    return a
  return a[rng.choice(a.shape[0], max_points, replace=False)]


def mmd_rbf(x, y, bandwidths: Sequence[float] | None = None, max_points: int = 2000,
            seed: int = 0) -> float:
  """Biased MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y), k = sum_h exp(-|a-b|^2/2h^2).

  Default bandwidths: m * {0.5, 1, 2}, m the median pairwise distance of the reference y.
  Taking m from y alone keeps the kernel fixed when several candidates are scored against one
  reference, so their MMDs are comparable. Each set is subsampled (fixed seed) to at most
  max_points because the cost is quadratic.
  """
  rng = np.random.default_rng(seed)
  x, y = _subsample(_np(x), max_points, rng), _subsample(_np(y), max_points, rng)
  d_yy = _sq_dists(y, y)
  if bandwidths is None:
    med = math.sqrt(np.median(d_yy[np.triu_indices(y.shape[0], k=1)]))
    bandwidths = [0.5 * med, med, 2.0 * med]

  def kmean(d2):
    return sum(np.mean(np.exp(-d2 / (2.0 * h * h))) for h in bandwidths)

  mmd2 = kmean(_sq_dists(x, x)) + kmean(d_yy) - 2.0 * kmean(_sq_dists(x, y))
  return float(max(mmd2, 0.0))  # a squared RKHS norm: negatives are rounding only


def boundary_distance(x_t, gmm, alpha: float) -> float:
  """mean_j min_i ||x_t,j - alpha mu_i||: distance of intermediate samples to the scaled modes.

  Checks a phase-boundary marginal p_{t_k} (alpha = alpha_{t_k} = 1 - t_k under flow
  matching); compare with the same quantity on exact marginal samples, not with zero,
  since the noise sigma_{t_k} keeps it positive.
  """
  _, dist = assign_modes(x_t, gmm, alpha)
  return float(np.mean(dist))


def gmm_report(x, gmm, reference=None) -> dict[str, Any]:
  """All mixture metrics of samples x (assignment computed once); SW2 and MMD^2 vs reference.

  Keys: modes_covered, num_modes, weight_error_max, weight_error_mean, std_ratio (median-based:
  the width of a mode's core), rms_std_ratio (root mean square: its variance), outlier_fraction
  (beyond the 99.9% radius; exact: 0.001), mode_weights (list, per mode) and, with a reference,
  sliced_wasserstein and mmd.
  """
  x = _np(x)
  num_modes = gmm.means.shape[0]
  idx, dist = assign_modes(x, gmm)
  w_hat = _weights_from_idx(idx, num_modes)
  err = np.abs(w_hat - _np(gmm.weights))
  report: dict[str, Any] = {
      "modes_covered": float(np.sum(_covered_mask(idx, dist, gmm, 0.2))),
      "num_modes": float(num_modes),
      "weight_error_max": float(np.max(err)),
      "weight_error_mean": float(np.mean(err)),
      "std_ratio": float(_std_ratio(x, idx, dist, gmm, 10)),
      "rms_std_ratio": float(_rms_ratio(x, idx, dist, gmm, 10)),
      "outlier_fraction": float(np.mean(dist > mode_radii(gmm)[idx])),
      "mode_weights": [float(w) for w in w_hat],
  }
  if reference is not None:
    report["sliced_wasserstein"] = sliced_wasserstein(x, reference)
    report["mmd"] = mmd_rbf(x, reference)
  return report


def _fmt(v) -> str:
  if isinstance(v, (list, tuple, np.ndarray)):
    a = np.asarray(v, dtype=np.float64)
    return f"{a.mean():.4g} ± {a.std():.2g}" if a.size else ""
  if isinstance(v, (float, np.floating)):
    return f"{v:.4g}"
  return str(v)


def paired_by_seed(base: dict, row: dict) -> tuple[list, np.ndarray]:
  """The seeds both {seed: value} maps have (sorted) and row - base on each: the paired
  comparison of two rows whose runs of one seed share initialisation, data and noise."""
  seeds = sorted(set(base) & set(row))
  return seeds, np.asarray([row[s] - base[s] for s in seeds], np.float64)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  """A GitHub markdown table; list values (e.g. over seeds) print as mean ± std, missing as ''."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row[c]) if c in row else "" for c in columns) + " |")
  return "\n".join(lines)
