"""Tests of pdmd_jax.evaluation.image_metrics, including the shipped classifier's accuracy."""

import jax
import matplotlib.image
import numpy as np
import pytest
import scipy.linalg

from pdmd_jax.data import mnist
from pdmd_jax.evaluation import image_metrics as im
from pdmd_jax.evaluation.train_classifier import random_affine


def _random_cov(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  # Commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = im.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(want, rel=1e-10)
  # General covariances: the textbook formula with scipy's sqrtm.
  c1, c2 = _random_cov(rng, 5), _random_cov(rng, 5)
  want = (np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2)
          - 2.0 * np.trace(scipy.linalg.sqrtm(c1 @ c2).real))
  assert im.frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-8)
  # Fitted to samples of the two Gaussians.
  n = 100_000
  x = rng.multivariate_normal(mu1, c1, size=n)
  y = rng.multivariate_normal(mu2, c2, size=n)
  assert im.frechet_distance(x, y) == pytest.approx(want, rel=0.03)
  assert im.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_diversity_metrics():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 4)
  same = np.tile(rng.normal(size=(3, 1, 16)), (1, 4, 1)).reshape(12, 16)
  assert im.feature_cosine(same, labels) == pytest.approx(1.0)
  assert im.feature_cosine(rng.normal(size=(12, 16)), labels) < 0.5
  assert im.pixel_l2(same, labels) == pytest.approx(0.0, abs=1e-6)
  # Two images per class differing by 0.5 in each of 16 pixels: distance 0.5 * 4 = 2.
  pair = np.stack([np.zeros(16), np.full(16, 0.5)])
  assert im.pixel_l2(pair, np.array([1, 1])) == pytest.approx(2.0)


def test_class_coverage_closed_forms():
  np.testing.assert_allclose(im.class_histogram(np.eye(4)[[0, 0, 1, 3]]), [0.5, 0.25, 0, 0.25])
  uniform = np.full(10, 0.1)
  c = im.class_coverage(uniform, uniform)
  assert c == pytest.approx({"class_entropy": 1.0, "class_min_share": 0.1,
                             "class_tv_reference": 0.0})
  c = im.class_coverage(np.eye(10)[3], uniform)       # every sample one class
  assert c == pytest.approx({"class_entropy": 0.0, "class_min_share": 0.0,
                             "class_tv_reference": 0.9})
  half = np.array([0.5, 0.5] + [0.0] * 8)             # two classes: log 2 / log 10
  c = im.class_coverage(half, uniform)
  assert c["class_entropy"] == pytest.approx(np.log10(2.0))
  assert c["class_tv_reference"] == pytest.approx(0.5 * (2 * 0.4 + 8 * 0.1))
  assert "class_tv_reference" not in im.class_coverage(half)


def test_unconditional_report_measures_class_coverage():
  """Samples of the null class (label 10) have no intended class: the report gives class
  coverage instead of accuracy, and diversity over all samples."""
  x, y = mnist.load("heldout")
  null = np.full(len(x), 10)
  report = im.image_report(x, null, reference=x)
  assert "accuracy" not in report
  truth = np.bincount(y, minlength=10) / len(y)       # the classifier reads 97%+ right
  assert report["class_entropy"] == pytest.approx(im.class_coverage(truth)["class_entropy"],
                                                  abs=0.01)
  assert report["class_min_share"] > 0.05
  assert report["class_tv_reference"] == pytest.approx(0.0)
  # Digits of different classes lie further apart than digits of one class.
  assert report["pixel_l2"] > im.image_report(x, y)["pixel_l2"] + 0.5
  threes = x[y == 3]                                  # a sampler that dropped nine classes
  dropped = im.image_report(threes, null[:len(threes)], reference=x)
  assert dropped["class_entropy"] < 0.15 and dropped["class_min_share"] == 0.0
  assert dropped["class_tv_reference"] > 0.85


def test_saturation():
  x = np.array([-1.5, -1.0, -1.05, 0.0, 1.0, 1.0001, 1.11, 2.0, 0.3, -0.99])
  assert im.saturation(x) == pytest.approx(3 / 10)          # beyond [-1.1, 1.1]
  assert im.saturation(x, margin=0.0) == pytest.approx(5 / 10)


def test_grid_layout_and_png(tmp_path):
  nrow, ncol, h, w = 3, 4, 5, 6
  images = np.broadcast_to(np.arange(nrow * ncol, dtype=np.float32)[:, None, None, None],
                           (nrow * ncol, h, w, 1))
  grid = im.image_grid(images, nrow)
  assert grid.shape == (nrow * h, ncol * w, 1)
  for r in range(nrow):
    for c in range(ncol):
      np.testing.assert_array_equal(grid[r * h:(r + 1) * h, c * w:(c + 1) * w], r * ncol + c)
  x, _ = mnist.load("heldout")
  path = str(tmp_path / "grid.png")
  im.save_grid_png(x[:6], path, nrow=2)
  png = matplotlib.image.imread(path)
  assert png.shape[:2] == (64, 96)
  np.testing.assert_allclose(png[..., 0], (im.image_grid(x[:6], 2)[..., 0] + 1) / 2, atol=1 / 255)


def test_shipped_classifier_on_real_digits():
  x, y = mnist.load("heldout")
  clf = im.load_classifier()
  assert clf.card["heldout_accuracy"] >= 0.97
  # The csv (hence every split) is ordered by class: every 9th train image is 50 per class.
  report = im.image_report(x, y, reference=mnist.load("train")[0][::9])
  assert report["accuracy"] >= 0.97
  assert report["accuracy"] == pytest.approx(clf.card["heldout_accuracy"], abs=1e-6)
  assert report["fd_real"] == pytest.approx(0.0, abs=1e-6)  # the reference set itself
  assert report["fd_reference"] > 0.0  # train vs held-out: small, finite-sample bias mostly
  assert report["saturation"] == 0.0
  assert 0.0 < report["feature_cosine"] < 1.0
  # Collapsed samples (one digit per class, repeated) have cosine similarity 1; noise is off.
  first = np.array([np.flatnonzero(y == c)[0] for c in range(10)])
  collapsed = im.image_report(np.repeat(x[first], 5, axis=0), np.repeat(y[first], 5))
  assert collapsed["feature_cosine"] == pytest.approx(1.0)
  assert collapsed["pixel_l2"] == pytest.approx(0.0, abs=1e-6)
  assert collapsed["fd_real"] > 10 * report["fd_reference"]
  noise = np.random.default_rng(0).uniform(-1.2, 1.2, size=(50, 32, 32))
  bad = im.image_report(noise, np.repeat(np.arange(10), 5))
  assert bad["saturation"] == pytest.approx(0.2 / 2.4, abs=0.02)
  assert bad["accuracy"] < 0.5
  table = im.markdown_table({"real": report, "noise": bad})
  assert table.splitlines()[0].startswith("| name | accuracy | fd_real")
  assert "| noise |" in table and "fd_reference" in table


def test_classifier_augmentation():
  x = mnist.load("heldout")[0][:4]
  affine = jax.jit(random_affine)  # one compile; eager op-by-op dispatch is slower
  np.testing.assert_array_equal(affine(jax.random.PRNGKey(0), x, 0.0, 0.0, 0.0), x)
  rotated = np.asarray(affine(jax.random.PRNGKey(1), x, 2.0, 10.0, 0.1))
  assert rotated.shape == x.shape
  assert rotated.min() >= -1.0 - 1e-6 and rotated.max() <= 1.0 + 1e-6
  assert not np.allclose(rotated, x)
