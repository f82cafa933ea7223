"""Motion metrics for generated clips: optical-flow speed, dynamic degree, temporal consistency.

The video claim under test is that DMD2/SGTS distillation slows motion while Phased DMD keeps
it, so the central number is the mean optical-flow magnitude between consecutive frames,
measured with OpenCV's Farneback flow on uint8 frames (``FARNEBACK``). OpenCV builds no
pyramid level smaller than 32 px, so on 32-48 px frames the flow is single-scale whatever
``levels`` says (levels=2 only matters from 64 px); displacements of <= 3 px/frame are within
reach of a 9 px window, which is also small against a ~11 px digit (winsize 7 or 13 and
poly_n=7 change the readings by < 3%).

The magnitude is averaged with ink weights w = max(I_t, I_t+1) (intensity in [0, 1]): the
background of a digit clip is textureless, so an unweighted frame mean would mostly measure
the digit's area; the weighted mean reads in pixels/frame of the moving content (the frame mean
is reported too, as ``frame_flow``). Numbers measured on ``pdmd_jax.data.moving_digits`` clips
are in ``tests/test_motion_metrics.py`` and the docstring of ``DYNAMIC_THRESHOLD``.

All functions take videos [N, T, H, W, 1] (or [T, H, W, 1] for one clip) in [-1, 1] and run
in numpy/OpenCV on the host.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

# cv2.calcOpticalFlowFarneback(prev, next, None, **FARNEBACK).
FARNEBACK = dict(pyr_scale=0.5, levels=2, winsize=9, iterations=3, poly_n=5, poly_sigma=1.1,
                 flags=0)
# A clip is "dynamic" if its ink-weighted mean flow exceeds this (px/frame). Measured on
# 32x32x16 clips (20 per speed): static clips read exactly 0 (0.11 mean / 0.19 max with added
# N(0, 0.1^2) pixel noise), speed 0.5 reads 0.37-0.51 and speed 1 reads 0.83-1.00 (0.73 min
# with 8 frames), so 0.5 separates static from >= 1 px/frame with margin on both sides.
DYNAMIC_THRESHOLD = 0.5
# The share of clips faster than this (``dynamic_degree_fast``) stays informative where the 0.5
# threshold saturates: the shipped video teacher draws almost no static clip from pure noise (its
# 5% flow quantile is 0.61 px/frame; 20% of the data's clips are static), so the teacher and
# every student read 0.93-0.98 at 0.5. 1.5 px/frame is about the real clips' median flow (1.43;
# true speeds 0 w.p. 0.2, else U[0.5, 3]) and reads 0.46-0.47 on them; clips of true speed 1 read
# 0.83-1.00 and of speed 2 read 1.72-1.98, so it separates slow from fast motion, and it sits far
# above the teacher's flicker on static clips (0.29 mean after SDEdit from t = 0.6).
FAST_THRESHOLD = 1.5


def _clips(videos) -> np.ndarray:
  v = np.asarray(videos, np.float32)
  if v.ndim == 4:
    v = v[None]
  if v.ndim != 5 or v.shape[-1] != 1:
    raise ValueError(f"expected videos [N, T, H, W, 1], got {v.shape}")
  return v[..., 0]


def to_uint8(videos) -> np.ndarray:
  """[-1, 1] -> uint8 [0, 255], channel axis dropped: [N, T, H, W]."""
  return np.clip(np.rint((_clips(videos) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def flow_fields(clip_u8: np.ndarray) -> np.ndarray:
  """Farneback flow [T-1, H, W, 2] (dx, dy) with frame_t(p) ~ frame_t+1(p + flow(p))."""
  return np.stack([cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK)
                   for a, b in zip(clip_u8[:-1], clip_u8[1:])])


def _warp_back(nxt: np.ndarray, flow: np.ndarray) -> np.ndarray:
  """Frame t+1 sampled at p + flow(p): the estimate of frame t (float32, [0, 255])."""
  h, w = nxt.shape
  gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
  return cv2.remap(nxt.astype(np.float32), gx + flow[..., 0], gy + flow[..., 1],
                   cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# Pixels brighter than this (in [0, 1]) in frame t or in its warped successor count as ink.
INK_THRESHOLD = 0.1


def clip_motion(videos) -> dict:
  """Per-clip arrays [N]: flow (ink-weighted, px/frame), frame_flow, warp_error, frame_diff,
  warp_error_ink.

  warp_error: mean |warp(frame_t+1 -> t) - frame_t| in [0, 1] intensity units, i.e. what the
  flow cannot explain (flicker, appearing/vanishing content); frame_diff: mean |frame_t+1 -
  frame_t| in the same units (no motion compensation). Both are averaged over frame pairs.
  warp_error_ink: the part of warp_error summed over ink pixels (either image > INK_THRESHOLD),
  still divided by all pixels, so warp_error - warp_error_ink is the background's part.
  """
  u8 = to_uint8(videos)
  out = {k: np.zeros(len(u8)) for k in ("flow", "frame_flow", "warp_error", "frame_diff",
                                        "warp_error_ink")}
  for i, clip in enumerate(u8):
    if clip.shape[0] < 2:
      raise ValueError("need at least 2 frames")
    f = flow_fields(clip)
    mag = np.linalg.norm(f, axis=-1)
    x = clip.astype(np.float32) / 255.0
    w = np.maximum(x[:-1], x[1:])
    out["flow"][i] = (mag * w).sum() / max(w.sum(), 1e-6)
    out["frame_flow"][i] = mag.mean()
    warped = np.stack([_warp_back(b, fl) for b, fl in zip(clip[1:], f)]) / 255.0
    err = np.abs(warped - x[:-1])
    out["warp_error"][i] = err.mean()
    out["warp_error_ink"][i] = (err * (np.maximum(warped, x[:-1]) > INK_THRESHOLD)).mean()
    out["frame_diff"][i] = np.abs(x[1:] - x[:-1]).mean()
  return out


def dynamic_degree(flow: np.ndarray, threshold: float = DYNAMIC_THRESHOLD) -> float:
  """Share of clips whose mean flow (px/frame) exceeds ``threshold``."""
  return float(np.mean(np.asarray(flow) > threshold))


def motion_report(videos, reference=None, threshold: float = DYNAMIC_THRESHOLD) -> dict:
  """Scalar motion summary of videos [N, T, H, W, 1] in [-1, 1].

  Keys: mean_flow / std_flow (ink-weighted px/frame over clips), frame_flow, dynamic_degree,
  dynamic_degree_fast (share of clips above ``FAST_THRESHOLD``), warp_error, frame_diff; with
  ``reference`` videos (e.g. the data or the teacher) also flow_ratio = mean_flow / reference
  mean_flow (< 1: slowed motion).
  """
  m = clip_motion(videos)
  rep = {"mean_flow": float(m["flow"].mean()), "std_flow": float(m["flow"].std()),
         "frame_flow": float(m["frame_flow"].mean()),
         "dynamic_degree": dynamic_degree(m["flow"], threshold),
         "dynamic_degree_fast": dynamic_degree(m["flow"], FAST_THRESHOLD),
         "warp_error": float(m["warp_error"].mean()), "frame_diff": float(m["frame_diff"].mean())}
  if reference is not None:
    ref = clip_motion(reference)["flow"].mean()
    rep["flow_ratio"] = float(rep["mean_flow"] / max(ref, 1e-6))
  return rep


def warp_breakdown(videos, bins=(0.0, DYNAMIC_THRESHOLD, FAST_THRESHOLD, np.inf)) -> dict:
  """Where a set of clips' warp error sits: on the ink or the background, and by clip speed.

  Keys: warp_error (as ``motion_report``), ink_share (fraction of it on ink pixels),
  flow_warp_corr (Pearson correlation over clips of ink-weighted flow and warp error; nan if
  either is constant) and by_speed: one {"lo", "hi", "clips", "warp_error"} per flow bin
  [lo, hi) (warp_error nan for an empty bin). On real clips the error is the resampling of a
  rigidly moving sprite, so it is zero on static clips and grows with speed; flicker does not.
  """
  m = clip_motion(videos)
  flow, warp = m["flow"], m["warp_error"]
  total = float(warp.mean())
  corr = (float(np.corrcoef(flow, warp)[0, 1]) if len(flow) > 1 and flow.std() > 0
          and warp.std() > 0 else float("nan"))
  rows = []
  for lo, hi in zip(bins[:-1], bins[1:]):
    sel = (flow >= lo) & (flow < hi)
    rows.append({"lo": float(lo), "hi": float(hi), "clips": int(sel.sum()),
                 "warp_error": float(warp[sel].mean()) if sel.any() else float("nan")})
  return {"warp_error": total, "ink_share": float(m["warp_error_ink"].mean() / max(total, 1e-12)),
          "flow_warp_corr": corr, "by_speed": rows}


def save_video_strip(videos, path: str, fps: int = 4, scale: int = 3, ncols: int | None = None,
                     mp4: bool = True) -> dict:
  """Writes videos [N, T, H, W, 1] in [-1, 1] as an animated grid and a still strip.

  ``path`` is the stem (an extension is dropped). Writes ``stem.gif`` (Pillow, looping),
  ``stem.mp4`` (cv2.VideoWriter, mp4v; skipped if the writer cannot open) and ``stem.png``
  (rows = clips, columns = frames). Frames are upscaled ``scale``x (nearest). Returns
  {"gif"|"mp4"|"png": path} of the files written.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  u8 = to_uint8(videos)
  n, t, h, w = u8.shape
  ncols = ncols or min(n, 8)
  nrows = -(-n // ncols)
  pad = np.zeros((nrows * ncols - n, t, h, w), np.uint8)
  grid = np.concatenate([u8, pad]).reshape(nrows, ncols, t, h, w)
  grid = grid.transpose(2, 0, 3, 1, 4).reshape(t, nrows * h, ncols * w)
  grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
  stem = os.path.splitext(path)[0]
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  out = {"gif": stem + ".gif", "png": stem + ".png"}
  frames = [Image.fromarray(g) for g in grid]
  frames[0].save(out["gif"], save_all=True, append_images=frames[1:],
                 duration=int(1000 / fps), loop=0)
  strip = u8.transpose(0, 2, 1, 3).reshape(n * h, t * w).repeat(scale, 0).repeat(scale, 1)
  Image.fromarray(strip).save(out["png"])
  if mp4:
    writer = cv2.VideoWriter(stem + ".mp4", cv2.VideoWriter_fourcc(*"mp4v"), fps,
                             (grid.shape[2], grid.shape[1]), False)
    if writer.isOpened():
      for g in grid:
        writer.write(g)
      out["mp4"] = stem + ".mp4"
    writer.release()
  return out
