"""Moving-MNIST-style clips with known per-clip speed: the video part of the reproduction.

Each clip has 1-2 digit sprites bouncing inside a square canvas for T frames. All digits of a
clip move at the same speed (pixels/frame), each in its own random direction; the speed is drawn
per clip from a mixture: ``static_frac`` of clips are static (speed 0), the rest uniform in
[min_speed, max_speed]. The true speed is returned with every clip so that the measured motion of
generated clips (``pdmd_jax.evaluation.motion_metrics``) can be checked against it.

Rendering: the 28x28 MNIST sprite is resized (cv2 INTER_AREA) to ``sprite_size`` (default half
the canvas: 16 on 32x32, 24 on 48x48; a full 28x28 sprite would leave a 32x32 canvas only 4 px of
room), then placed at its sub-pixel top-left position by a bilinear shift (the sprite is split
over the 4 neighbouring integer offsets with bilinear weights), which conserves the ink mass and
moves its centroid by exactly the fractional offset. Digits are combined with a pixelwise max.
Bouncing is exact: the unbounded path p0 + v t is folded into [0, size - sprite_size] by a
triangle wave, i.e. a mirror reflection at each wall.

Conditioning: ``label`` is the class of the first digit (10 classes) whatever the number of
digits; the other digit (if any) is a distractor. All classes are in ``make_clip``'s metadata.

Determinism / random access: clip i is a pure function of (seed, i), drawn with
``np.random.default_rng([seed, i])``, so any clip can be regenerated on its own.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 10


def to_sprites(digits) -> np.ndarray:
  """Digits in any common layout -> [N, 28, 28] float32 ink in [0, 1].

  Accepts [N, 28, 28] / [N, 28, 28, 1] / [N, 32, 32, 1] (``pdmd_jax.data.mnist`` layout, 2 px
  of padding cropped), with values uint8 [0, 255], float [0, 1] or float [-1, 1].
  """
  x = np.asarray(digits)
  if x.ndim == 4:
    x = x[..., 0]
  if x.shape[1] == 32:
    x = x[:, 2:30, 2:30]
  if x.shape[1:] != (28, 28):
    raise ValueError(f"expected 28x28 or padded 32x32 digits, got {x.shape}")
  x = x.astype(np.float32)
  if x.max() > 1.0:
    x = x / 255.0
  elif x.min() < 0.0:
    x = (x + 1.0) / 2.0
  return np.clip(x, 0.0, 1.0)


def glyph_digits(num: int = 200, seed: int = 0):
  """Font-rendered stand-in for MNIST: (digits [N, 32, 32, 1] in [-1, 1], labels [N] int32).

  Same layout as ``pdmd_jax.data.mnist.load``; random font, scale, thickness and offset per
  digit. For tests and offline runs only.
  """
  rng = np.random.default_rng(seed)
  import cv2  # pylint: disable=import-outside-toplevel
  fonts = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX)
  labels = rng.integers(0, NUM_CLASSES, num).astype(np.int32)
  out = np.zeros((num, 32, 32), np.uint8)
  for i, c in enumerate(labels):
    font, scale, thick = fonts[rng.integers(3)], rng.uniform(0.85, 1.05), int(rng.integers(2, 4))
    (w, h), _ = cv2.getTextSize(str(c), font, scale, thick)
    org = ((32 - w) // 2 + int(rng.integers(-1, 2)), (32 + h) // 2 + int(rng.integers(-1, 2)))
    cv2.putText(out[i], str(c), org, font, scale, 255, thick, cv2.LINE_AA)
  return (out[..., None].astype(np.float32) / 127.5 - 1.0), labels


def bounce(p: np.ndarray, limit: float) -> np.ndarray:
  """Fold unbounded positions into [0, limit] by mirror reflection at both walls."""
  if limit <= 0:
    return np.zeros_like(p)
  q = np.mod(p, 2 * limit)
  return np.where(q > limit, 2 * limit - q, q)


def render(sprites: np.ndarray, pos: np.ndarray, size: int) -> np.ndarray:
  """Sprites [K, s, s] in [0, 1] at top-left positions pos [T, K, 2] (y, x) -> [T, size, size]."""
  k, s, _ = sprites.shape
  frames = np.zeros((pos.shape[0], size + 1, size + 1), np.float32)
  for t in range(pos.shape[0]):
    for j in range(k):
      (iy, ix), (fy, fx) = np.divmod(pos[t, j], 1.0)
      iy, ix = int(iy), int(ix)
      patch = np.zeros((s + 1, s + 1), np.float32)
      patch[:s, :s] += (1 - fy) * (1 - fx) * sprites[j]
      patch[1:, :s] += fy * (1 - fx) * sprites[j]
      patch[:s, 1:] += (1 - fy) * fx * sprites[j]
      patch[1:, 1:] += fy * fx * sprites[j]
      view = frames[t, iy:iy + s + 1, ix:ix + s + 1]
      np.maximum(view, patch[:view.shape[0], :view.shape[1]], out=view)
  # pos <= size - s, so the extra row/column only ever receives zero weight.
  return np.clip(frames[:, :size, :size], 0.0, 1.0)


def make_clip(sprites: np.ndarray, labels: np.ndarray, seed: int, index: int, *,
              num_frames: int = 16, size: int = 32, sprite_size: int | None = None,
              min_digits: int = 1, max_digits: int = 2, static_frac: float = 0.2,
              min_speed: float = 0.5, max_speed: float = 3.0, speed: float | None = None) -> dict:
  """Clip ``index`` of stream ``seed`` from sprites [N, 28, 28] in [0, 1] (see ``to_sprites``).

  Args:
    speed: if given, overrides the drawn speed (pixels/frame) of this clip.

  Returns:
    dict: video [T, size, size, 1] float32 in [-1, 1]; label int32 (first digit's class);
    speed float32 (true pixels/frame, before bounces); classes [K]; num_digits; pos [T, K, 2]
    (top-left, y-x); vel [K, 2].
  """
  sprite_size = sprite_size or size // 2
  rng = np.random.default_rng([seed, index])
  k = int(rng.integers(min_digits, max_digits + 1))
  idx = rng.integers(0, len(sprites), k)
  drawn = 0.0 if rng.random() < static_frac else rng.uniform(min_speed, max_speed)
  v = drawn if speed is None else float(speed)
  ang = rng.uniform(0, 2 * np.pi, k)
  vel = v * np.stack([np.sin(ang), np.cos(ang)], axis=1)
  limit = size - sprite_size
  p0 = rng.uniform(0, limit, (k, 2))
  pos = bounce(p0[None] + np.arange(num_frames)[:, None, None] * vel[None], limit)
  import cv2  # pylint: disable=import-outside-toplevel
  sp = np.stack([cv2.resize(sprites[i], (sprite_size, sprite_size), interpolation=cv2.INTER_AREA)
                 for i in idx]) if sprite_size != sprites.shape[1] else sprites[idx]
  video = render(sp, pos, size)[..., None] * 2.0 - 1.0
  classes = np.asarray(labels)[idx].astype(np.int32)
  return {"video": video.astype(np.float32), "label": np.int32(classes[0]),
          "speed": np.float32(v), "classes": classes, "num_digits": k,
          "pos": pos.astype(np.float32), "vel": vel.astype(np.float32)}


class MovingDigitsSource:
  """Random-access clip source (``grain.MapDataset.source(src)`` compatible).

  ``src[i]`` is {"video" [T, H, W, 1] in [-1, 1], "label" int32, "speed" float32}; indices wrap
  modulo ``len(src)``. The clip kwargs are those of ``make_clip``.
  """

  def __init__(self, digits, labels, num_clips: int, seed: int = 0, **clip_kwargs):
    self.sprites = to_sprites(digits)
    self.labels = np.asarray(labels, np.int32)
    self.num_clips, self.seed, self.clip_kwargs = num_clips, seed, clip_kwargs

  def __len__(self) -> int:
    return self.num_clips

  def clip(self, index: int, **overrides) -> dict:
    """Full clip with metadata (see ``make_clip``)."""
    return make_clip(self.sprites, self.labels, self.seed, int(index) % self.num_clips,
                     **{**self.clip_kwargs, **overrides})

  def __getitem__(self, index: int) -> dict:
    c = self.clip(index)
    return {"video": c["video"], "label": c["label"], "speed": c["speed"]}

  def batch(self, indices, **overrides) -> dict:
    """Stacked {"video" [B, T, H, W, 1], "label" [B], "speed" [B]} for the given indices."""
    clips = [self.clip(i, **overrides) for i in indices]
    return {key: np.stack([c[key] for c in clips]) for key in ("video", "label", "speed")}


def mnist_source(split: str = "train", num_clips: int = 10_000, seed: int = 0,
                 **clip_kwargs) -> MovingDigitsSource:
  """Clips from ``pdmd_jax.data.mnist`` digits: split "train" for training, "heldout" for eval."""
  from pdmd_jax.data import mnist  # pylint: disable=import-outside-toplevel
  digits, labels = mnist.load(split)
  return MovingDigitsSource(digits, labels, num_clips, seed, **clip_kwargs)


def dataset(split: str, batch_size: int, seed: int, num_clips: int = 1_000_000, **clip_kwargs):
  """A random-access grain MapDataset whose element i is batch i of {"video" [B, T, H, W, 1],
  "label", "speed"}, endless: clips from the ``split`` digits of ``pdmd_jax.data.mnist`` (clip
  i is a pure function of (seed, i), rendered on demand), shuffled and batched by grain."""
  import grain  # pylint: disable=import-outside-toplevel
  src = mnist_source(split, num_clips=num_clips, seed=seed, **clip_kwargs)
  ds = grain.MapDataset.source(src).shuffle(seed=seed).repeat()
  return ds.batch(batch_size, drop_remainder=True)


def make_iterator(split: str, batch_size: int, seed: int, num_clips: int = 1_000_000,
                  **clip_kwargs):
  """``dataset`` as an endless, checkpointable iterator (``it.get_state()`` /
  ``it.set_state(s)`` resume the exact stream)."""
  import grain  # pylint: disable=import-outside-toplevel
  ds = dataset(split, batch_size, seed, num_clips, **clip_kwargs)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
