"""Sample-quality metrics for generated digits, in the feature space of the project's classifier.

The classifier (``pdmd_jax.models.classifier``, trained by ``train_classifier``) ships in
``assets/classifier``. For generated images with their intended labels it gives:

- accuracy: fraction classified as the intended label (prompt following);
- fd_real / fd_reference: Frechet distance of the 128-d penultimate features to the real
  held-out digits (500 images, statistics computed once per process) and to another sample
  set, e.g. the teacher's samples. FD is biased upward at small N: compare only at equal N;
- feature_cosine: mean pairwise cosine similarity of features within a class (different seeds),
  averaged over classes (higher = less diverse; the analogue of the paper's DINOv3 metric);
- pixel_l2: mean pairwise pixel L2 distance within a class, averaged over classes;
- saturation: fraction of pixel values beyond [-1.1, 1.1] before clipping (the generator
  overshooting the data range). Every other metric sees the images clipped to [-1, 1].

Images are [N, 32, 32, 1] (or [N, 32, 32]) in [-1, 1]: the layout of ``pdmd_jax.data.mnist``.
Statistics are float64 numpy on the host; only the classifier runs in JAX.
"""

from __future__ import annotations

import functools
import io
import json
import os
from typing import Callable, NamedTuple

import einops
import jax
import numpy as np
from flax import nnx
from flax import serialization

from pdmd_jax import paths
from pdmd_jax.data import mnist
from pdmd_jax.evaluation import gmm_metrics
from pdmd_jax.models.classifier import DigitClassifier

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "assets", "classifier")
EVAL_BATCH = 500  # every call is padded to a multiple of this: one compile per process


class Classifier(NamedTuple):
  """Jitted host-side functions of images [N, 32, 32, 1] -> numpy [N, 128] / [N, 10]."""
  features: Callable[[np.ndarray], np.ndarray]
  logits: Callable[[np.ndarray], np.ndarray]
  card: dict


def _batched(fn):
  """Applies a jitted [EVAL_BATCH, ...] function to any N by chunking and padding."""
  def apply(images):
    x = np.asarray(images, np.float32)
    n = x.shape[0]
    x = np.concatenate([x, np.zeros((-n % EVAL_BATCH,) + x.shape[1:], np.float32)])
    out = [np.asarray(fn(x[i:i + EVAL_BATCH])) for i in range(0, x.shape[0], EVAL_BATCH)]
    return np.concatenate(out)[:n].astype(np.float64)
  return apply


@functools.lru_cache(maxsize=None)
def _classifier_state(path: str = ASSETS):
  """(graphdef, parameter state, card) of the classifier: reads params.msgpack + card.json."""
  with open(os.path.join(path, "card.json")) as f:
    card = json.load(f)
  arch = card["architecture"]
  abstract = nnx.eval_shape(lambda: DigitClassifier(
      arch["num_classes"], widths=tuple(arch["widths"]), feature_dim=arch["feature_dim"],
      rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  with open(os.path.join(path, "params.msgpack"), "rb") as f:
    params = serialization.msgpack_restore(f.read())
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
  return graphdef, state, card


def feature_map(path: str = ASSETS) -> Callable:
  """x [B, 32, 32, 1] -> features [B, 128], traceable (the weights enter as constants): the
  ODE anchor's "features" distance on digits."""
  graphdef, state, _ = _classifier_state(path)
  return lambda x: nnx.merge(graphdef, state).features(x)


@functools.lru_cache(maxsize=None)
def load_classifier(path: str = ASSETS) -> Classifier:
  """The classifier's jitted host-side functions (cached per path)."""
  graphdef, state, card = _classifier_state(path)
  feats = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))
  logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return Classifier(_batched(functools.partial(feats, state)),
                    _batched(functools.partial(logits, state)), card)


@functools.lru_cache(maxsize=None)
def real_stats(path: str = ASSETS) -> tuple[np.ndarray, np.ndarray]:
  """(mean [128], cov [128, 128]) of the classifier features of the real held-out digits."""
  return feature_stats(load_classifier(path).features(mnist.load("heldout")[0]))


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
  f = np.asarray(features, np.float64)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
  """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2}), the W2^2 between two Gaussians.

  tr (C1 C2)^{1/2} = sum_i sqrt(lambda_i(C1^{1/2} C2 C1^{1/2})): a symmetric PSD
  eigenproblem (C1 C2 is similar to it), so no complex sqrtm and no singular-C1 blow-up.
  """
  mu1, mu2, cov1, cov2 = (np.asarray(a, np.float64) for a in (mu1, mu2, cov1, cov2))
  w, v = np.linalg.eigh(cov1)
  s1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  lam = np.linalg.eigvalsh(s1 @ cov2 @ s1)
  tr_sqrt = np.sum(np.sqrt(np.clip(lam, 0.0, None)))
  fd = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt
  return float(max(fd, 0.0))  # a squared distance: negatives are rounding only


def frechet_distance(features_a, features_b) -> float:
  """FD between Gaussians fitted (mean, unbiased covariance) to two feature sets [N, D]."""
  return frechet_distance_from_stats(*feature_stats(features_a), *feature_stats(features_b))


def _per_class_mean(values, labels, pair_stat) -> float:
  """Average over classes with >= 2 samples of pair_stat(values of the class)."""
  labels = np.asarray(labels)
  out = [pair_stat(values[labels == c]) for c in np.unique(labels) if np.sum(labels == c) > 1]
  return float(np.mean(out)) if out else float("nan")


def _offdiag_mean(m: np.ndarray) -> float:
  n = m.shape[0]
  return float((np.sum(m) - np.trace(m)) / (n * (n - 1)))


def feature_cosine(features, labels) -> float:
  """Mean over classes of the mean pairwise (i != j) cosine similarity of features."""
  f = np.asarray(features, np.float64)
  f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  return _per_class_mean(f, labels, lambda a: _offdiag_mean(a @ a.T))


def pixel_l2(images, labels) -> float:
  """Mean over classes of the mean pairwise (i != j) pixel L2 distance."""
  x = np.asarray(images, np.float64).reshape(len(images), -1)
  return _per_class_mean(x, labels, lambda a: _offdiag_mean(np.sqrt(gmm_metrics._sq_dists(a, a))))


SATURATION_MARGIN = 0.1


def saturation(images, margin: float = SATURATION_MARGIN) -> float:
  """Fraction of pixel values beyond the data range by more than ``margin`` (|x| > 1 + margin).

  The margin (5% of the range [-1, 1]) matters: MNIST's background sits exactly at -1, so a
  sampler that is correct to within rounding puts about half of it just outside [-1, 1].
  """
  return float(np.mean(np.abs(np.asarray(images)) > 1.0 + margin))


def _as_images(images) -> np.ndarray:
  x = np.asarray(images, np.float32)
  return x[..., None] if x.ndim == 3 else x


def class_histogram(logits) -> np.ndarray:
  """[C] share of the samples the classifier assigns to each class (argmax of ``logits``)."""
  logits = np.asarray(logits)
  return np.bincount(np.argmax(logits, axis=-1), minlength=logits.shape[-1]) / len(logits)


def class_coverage(hist, reference_hist=None) -> dict[str, float]:
  """How an unconditional sample set covers the classes (the modes of the digits):
  class_entropy = H(hist) / log C (1: every class equally often; 0: one class), class_min_share
  = the rarest class's share (1 / C when uniform; 0: a class dropped), and, given the reference
  set's histogram, class_tv_reference = total variation 1/2 sum |hist - reference| (0: the same
  class frequencies)."""
  h = np.asarray(hist, np.float64)
  nz = h[h > 0]
  out = {"class_entropy": float(-np.sum(nz * np.log(nz)) / np.log(len(h))),
         "class_min_share": float(h.min())}
  if reference_hist is not None:
    out["class_tv_reference"] = float(0.5 * np.abs(h - np.asarray(reference_hist)).sum())
  return out


def image_report(images, labels, reference=None, classifier: str = ASSETS) -> dict[str, float]:
  """All image metrics of samples with their intended labels; fd_reference if reference given.

  Labels outside the classifier's classes (the null class of an unconditional run) have no
  intended class: such samples get no accuracy but class coverage (``class_coverage``; against
  the reference's classes if given), and their diversity is measured over all of them.

  Args:
    images: [N, 32, 32(, 1)] generated images in [-1, 1] (clipped here; see saturation).
    labels: [N] the classes the images were generated for (all >= C: unconditional).
    reference: optional [M, 32, 32(, 1)] images of another sample set (e.g. the teacher's).
    classifier: the classifier assets directory.
  """
  raw = _as_images(images)
  x = np.clip(raw, -1.0, 1.0)
  labels = np.asarray(labels)
  clf = load_classifier(classifier)
  feats = clf.features(x)
  logits = clf.logits(x)
  unconditional = bool(np.all(labels >= logits.shape[-1]))
  report = {
      "fd_real": frechet_distance_from_stats(*feature_stats(feats), *real_stats(classifier)),
      "feature_cosine": feature_cosine(feats, labels),
      "pixel_l2": pixel_l2(x, labels),
      "saturation": saturation(raw),
  }
  if not unconditional:
    report = {"accuracy": float(np.mean(np.argmax(logits, axis=-1) == labels)), **report}
  ref = None if reference is None else np.clip(_as_images(reference), -1.0, 1.0)
  if unconditional:
    report.update(class_coverage(class_histogram(logits), None if ref is None
                                 else class_histogram(clf.logits(ref))))
  if ref is not None:
    report["fd_reference"] = frechet_distance(feats, clf.features(ref))
  return report


def markdown_table(rows: dict[str, dict], columns: list[str] | None = None) -> str:
  """A GitHub markdown table, one row per name; columns default to every key, first seen first."""
  if columns is None:
    columns = list(dict.fromkeys(k for report in rows.values() for k in report))
  return gmm_metrics.markdown_table([{"name": name, **report} for name, report in rows.items()],
                                    ["name"] + columns)


def image_grid(images, nrow: int) -> np.ndarray:
  """[nrow * ncol, H, W, C] -> [nrow * H, ncol * W, C]; image r * ncol + c lands at (r, c).

  Order the images class-major (rows = classes, columns = seeds).
  """
  return einops.rearrange(_as_images(images), "(r c) h w ch -> (r h) (c w) ch", r=nrow)


def save_grid_png(images, path: str, nrow: int) -> None:
  """Writes image_grid(clip(images)) as a grey-scale PNG (-1 black, 1 white)."""
  from matplotlib import image as mpl_image  # pylint: disable=import-outside-toplevel
  grid = (np.clip(image_grid(images, nrow), -1.0, 1.0) + 1.0) / 2.0
  grid = grid[..., 0] if grid.shape[-1] == 1 else grid
  buf = io.BytesIO()
  mpl_image.imsave(buf, grid, cmap="gray", vmin=0.0, vmax=1.0, format="png")
  paths.write_bytes(path, buf.getvalue())
