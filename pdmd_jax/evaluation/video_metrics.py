"""Sample-quality metrics for generated moving-digit clips: per-frame image metrics + motion.

The digit classifier of ``image_metrics`` was trained on MNIST's layout: a 28x28 digit centred
by its centre of mass, padded to 32x32. A moving-digit frame holds a smaller sprite (16 px on a
32 px canvas) anywhere on the canvas, so each frame is brought back to that layout before it is
classified: a ``sprite_size`` window centred on the frame's ink centroid is cropped (background
outside the canvas), resized to 28x28 (bilinear) and padded to 32x32 — exactly MNIST's own
centre-of-mass preprocessing. With one digit per clip (the shipped video teacher's data) this is
unambiguous; with two digits the crop sits between them and the accuracy is only indicative.

For clips [N, T, H, W, 1] in [-1, 1] with their intended labels:
- accuracy: fraction of *frames* classified as the clip's label (prompt following per frame);
- fd_real / fd_reference: Frechet distance of clip features (the classifier's 128-d features
  averaged over the clip's frames) to real clips / to another sample set (e.g. the teacher's);
- feature_cosine / pixel_l2: same-class pairwise diversity of clip features / of clip pixels;
- saturation: values beyond [-1.1, 1.1] before clipping;
- motion (``motion_metrics``): mean_flow (ink-weighted Farneback flow, px/frame),
  dynamic_degree, warp_error (temporal consistency: what the flow cannot explain), flow_ratio
  against the reference when one is given.
"""

from __future__ import annotations

import numpy as np

from pdmd_jax.evaluation import image_metrics
from pdmd_jax.evaluation import motion_metrics


def center_crops(videos, sprite_size: int = 16) -> np.ndarray:
  """Clips [N, T, H, W, 1] in [-1, 1] -> frames [N * T, 32, 32, 1] in MNIST's layout."""
  import cv2  # pylint: disable=import-outside-toplevel
  v = np.clip(np.asarray(videos, np.float32), -1.0, 1.0)[..., 0]
  frames = v.reshape((-1,) + v.shape[2:])
  ink = (frames + 1.0) / 2.0
  h, w = frames.shape[1:]
  s = sprite_size
  pad = np.pad(ink, ((0, 0), (s, s), (s, s)))
  out = np.zeros((len(frames), 32, 32, 1), np.float32) - 1.0
  ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
  for i, f in enumerate(ink):
    mass = f.sum()
    if mass < 1e-6:
      cy, cx = (h - 1) / 2, (w - 1) / 2
    else:
      cy = float(f.sum(1) @ ys / mass)
      cx = float(f.sum(0) @ xs / mass)
    top = int(round(cy - (s - 1) / 2)) + s
    left = int(round(cx - (s - 1) / 2)) + s
    crop = pad[i, top:top + s, left:left + s]
    digit = cv2.resize(crop, (28, 28), interpolation=cv2.INTER_LINEAR)
    out[i, 2:30, 2:30, 0] = np.clip(digit, 0.0, 1.0) * 2.0 - 1.0
  return out


def clip_features(videos, sprite_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """(clip features [N, 128] = mean over frames, frame logits [N, T, 10]) of the classifier."""
  v = np.asarray(videos)
  n, t = v.shape[:2]
  crops = center_crops(v, sprite_size)
  clf = image_metrics.load_classifier()
  feats = clf.features(crops).reshape(n, t, -1).mean(axis=1)
  return feats, clf.logits(crops).reshape(n, t, -1)


def video_report(videos, labels, reference=None, real=None, sprite_size: int | None = None) -> dict:
  """All per-frame image metrics and motion metrics of clips with their intended labels.

  Args:
    videos: [N, T, H, W, 1] generated clips in [-1, 1] (clipped here; see saturation).
    labels: [N] the classes the clips were generated for.
    reference: optional clips of another sample set: adds fd_reference and flow_ratio.
    real: optional real clips: adds fd_real.
    sprite_size: the digits' size in pixels (the crop window); None: half the canvas (the
      default of ``moving_digits.make_clip``).
  """
  raw = np.asarray(videos, np.float32)
  sprite_size = sprite_size or raw.shape[2] // 2
  x = np.clip(raw, -1.0, 1.0)
  labels = np.asarray(labels)
  feats, logits = clip_features(x, sprite_size)
  report = {
      "accuracy": float(np.mean(np.argmax(logits, -1) == labels[:, None])),
      "feature_cosine": image_metrics.feature_cosine(feats, labels),
      "pixel_l2": image_metrics.pixel_l2(x, labels),
      "saturation": image_metrics.saturation(raw),
  }
  if real is not None:
    report["fd_real"] = image_metrics.frechet_distance(feats, clip_features(real, sprite_size)[0])
  if reference is not None:
    ref = np.clip(np.asarray(reference, np.float32), -1.0, 1.0)
    report["fd_reference"] = image_metrics.frechet_distance(feats, clip_features(ref, sprite_size)[0])
  report.update(motion_metrics.motion_report(x, reference=None if reference is None else
                                             np.clip(reference, -1.0, 1.0)))
  return report


def real_clips(data: dict, num: int, seed: int = 99) -> tuple[np.ndarray, np.ndarray]:
  """(clips [num, T, H, W, 1], labels [num]) from the held-out digits, with the data settings
  ``data`` of a video teacher's card (the keyword arguments of ``moving_digits.make_clip``)."""
  from pdmd_jax.data import moving_digits  # pylint: disable=import-outside-toplevel
  src = moving_digits.mnist_source("heldout", num_clips=num, seed=seed, **data)
  b = src.batch(range(num))
  return b["video"], b["label"]
