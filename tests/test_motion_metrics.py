"""Tests of pdmd_jax.evaluation.motion_metrics on moving-digit clips of known speed.

Measured ink-weighted Farneback flow (px/frame) on 32x32x16 clips of 1-2 glyph digits, 20 clips
per speed (mean [min, max]); bounce frames have shorter steps, hence slightly < speed:

  speed 0: 0.00 | 0.5: 0.48 [0.37, 0.51] | 1: 0.93 [0.83, 1.00] | 1.5: 1.42 | 2: 1.86 [1.72, 1.98]
  speed 2.5: 2.30 | 3: 2.72 [2.50, 2.92]; ratio speed 2 / speed 1 = 1.99, speed 3 / 1 = 2.91.

Warp error (temporal consistency, [0, 1] units): real clips ~0.01, frame-shuffled 0.096,
uniform noise 0.28. Real MNIST clips (pdmd_jax.data.mnist, train or heldout) read the same to
within 0.02 px/frame: 0.94 at speed 1, 1.85 at 2, 2.70 at 3 (32x32); 0.95 / 1.90 / 2.81 (48x48).
"""

import numpy as np
import pytest
from scipy.stats import spearmanr

from pdmd_jax.data import moving_digits as md
from pdmd_jax.evaluation import motion_metrics as mm

DIGITS, LABELS = md.glyph_digits(100, seed=0)
SRC = md.MovingDigitsSource(DIGITS, LABELS, num_clips=1000, seed=1)


def _clips(speed, n=10, start=0):
  return SRC.batch(range(start, start + n), speed=speed)["video"]


def test_flow_ranks_speed():
  speeds = np.random.default_rng(0).uniform(0, 3, 40)
  speeds[:4] = 0.0
  videos = np.stack([SRC.clip(i, speed=s)["video"] for i, s in enumerate(speeds)])
  flow = mm.clip_motion(videos)["flow"]
  rho = spearmanr(flow, speeds).statistic
  assert rho >= 0.9, rho
  # Reads in px/frame, a little low: bounce steps are shorter, crossing digits occlude.
  assert 0.85 <= flow.sum() / speeds.sum() <= 1.02 and np.all(flow <= speeds + 0.05)


def test_flow_scales_linearly():
  f1 = mm.clip_motion(_clips(1.0))["flow"].mean()
  f2 = mm.clip_motion(_clips(2.0))["flow"].mean()
  assert 0.8 < f1 <= 1.0
  assert 1.6 <= f2 / f1 <= 2.4, (f1, f2)


def test_static_and_dynamic_degree():
  static = _clips(0.0)
  flow = mm.clip_motion(static)["flow"]
  assert flow.max() < 0.05
  assert mm.dynamic_degree(flow) == 0.0
  noisy = np.clip(static + 0.05 * np.random.default_rng(0).normal(size=static.shape), -1, 1)
  assert mm.motion_report(noisy)["dynamic_degree"] == 0.0  # pixel noise is not motion
  fast = np.concatenate([_clips(s, n=4, start=10 * k) for k, s in enumerate((1.0, 2.0, 3.0))])
  assert mm.motion_report(fast)["dynamic_degree"] == 1.0


def test_fast_dynamic_degree_splits_slow_from_fast_motion():
  """The 1.5 px/frame threshold: every speed-1 clip below it, every speed-2 clip above it, and
  on clips with the data's speed mixture (20% static, else U[0.5, 3]) the share of true speeds
  above ~1.6 px/frame: 0.8 * 1.4 / 2.5 = 0.45."""
  slow, fast = _clips(1.0, n=10), _clips(2.0, n=10)
  assert mm.motion_report(slow)["dynamic_degree_fast"] == 0.0
  assert mm.motion_report(fast)["dynamic_degree_fast"] == 1.0
  rng = np.random.default_rng(1)
  speeds = np.where(rng.random(200) < 0.2, 0.0, rng.uniform(0.5, 3.0, 200))
  mix = np.stack([SRC.clip(i, speed=s)["video"] for i, s in enumerate(speeds)])
  share = mm.motion_report(mix)["dynamic_degree_fast"]
  assert abs(share - 0.45) < 0.08, share


def test_temporal_consistency():
  real = _clips(1.5, n=5)
  rng = np.random.default_rng(0)
  shuffled = real[:, rng.permutation(real.shape[1])]
  noise = rng.uniform(-1, 1, real.shape).astype(np.float32)
  w_real, w_shuf, w_noise = (mm.motion_report(v)["warp_error"] for v in (real, shuffled, noise))
  assert w_real < 0.02 and w_real < w_shuf / 3 and w_shuf < w_noise, (w_real, w_shuf, w_noise)


def test_motion_report_keys_and_ratio():
  slow, fast = _clips(1.0, n=5), _clips(2.0, n=5)
  rep = mm.motion_report(slow, reference=fast)
  assert set(rep) == {"mean_flow", "std_flow", "frame_flow", "dynamic_degree",
                      "dynamic_degree_fast", "warp_error", "frame_diff", "flow_ratio"}
  assert rep["flow_ratio"] == pytest.approx(0.5, abs=0.1)
  single = mm.motion_report(slow[0])  # one clip [T, H, W, 1]
  assert single["mean_flow"] == pytest.approx(mm.clip_motion(slow[:1])["flow"][0])


def test_save_video_strip(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  videos = _clips(2.0, n=3)
  out = mm.save_video_strip(videos, str(tmp_path / "clips.gif"), scale=2)
  with Image.open(out["gif"]) as gif:
    assert gif.n_frames == 16 and gif.size == (3 * 64, 64)
  with Image.open(out["png"]) as png:
    assert png.size == (16 * 64, 3 * 64)
  if "mp4" in out:
    import cv2  # pylint: disable=import-outside-toplevel
    cap = cv2.VideoCapture(out["mp4"])
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 16
    cap.release()


def test_flow_on_mnist_clips():
  pytest.importorskip("pdmd_jax.data.mnist")
  src = md.mnist_source("heldout", 100, seed=0)
  f = {s: mm.clip_motion(src.batch(range(8), speed=s)["video"])["flow"] for s in (0.0, 1.0, 2.0)}
  assert f[0.0].max() < 0.05 and f[1.0].min() > mm.DYNAMIC_THRESHOLD
  assert 1.6 <= f[2.0].mean() / f[1.0].mean() <= 2.4


def test_warp_breakdown_separates_flicker_from_motion():
  """Real motion: zero error when static, growing with speed, on the ink. Flicker (a static
  digit whose ink brightness jitters per frame, plus background haze) has error at any speed,
  and the haze's share is what falls off the ink."""
  real = np.concatenate([_clips(s, n=6, start=20 * i) for i, s in enumerate((0.0, 1.0, 2.5))])
  b = mm.warp_breakdown(real)
  static, mid, fast = b["by_speed"]
  assert [r["clips"] for r in b["by_speed"]] == [6, 6, 6]
  assert static["warp_error"] < 1e-3 < mid["warp_error"]
  assert 0 < mid["warp_error"] < fast["warp_error"] and b["flow_warp_corr"] > 0.5
  assert b["ink_share"] > 0.9

  rng = np.random.default_rng(0)
  still = _clips(0.0, n=6, start=200)
  ink = (still + 1) / 2
  gain = rng.uniform(0.6, 1.0, still.shape[:2])[:, :, None, None, None]
  flicker = ink * gain * 2 - 1
  fb = mm.warp_breakdown(flicker)
  assert fb["by_speed"][0]["clips"] == 6 and fb["by_speed"][0]["warp_error"] > 5e-3
  assert fb["ink_share"] > 0.95
  haze = np.clip(flicker + rng.uniform(0, 0.1, flicker.shape), -1, 1).astype(np.float32)
  hb = mm.warp_breakdown(haze)
  assert hb["warp_error"] > fb["warp_error"] and hb["ink_share"] < fb["ink_share"] - 0.1
  assert np.isnan(mm.warp_breakdown(real[:6])["by_speed"][1]["warp_error"])
