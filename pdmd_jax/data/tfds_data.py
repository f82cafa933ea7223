"""Image and video data from a prepared tensorflow-datasets dataset (``data.source="tfds:NAME"``).

The dataset is read through ``tfds.data_source``: random access over its ArrayRecord files,
which needs neither TensorFlow nor a network (``pip install -e ".[tfds]"``). Prepare it once,
where the source files are, in that format:

  tfds build mnist --data_dir=/data/tfds --file_format=array_record

then ``--config.data.source=tfds:mnist --config.data.tfds_dir=/data/tfds`` (``NAME`` may carry a
config and version, ``tfds:NAME/CONFIG:1.2.0``). A record's ``data.image_key`` feature (default
``image``; ``video`` for clips) is an image [H, W, C] or a clip [T, H, W, C] of uint8 (a tfds
``Image``/``Video`` feature or a ``Tensor``; PNG decoding uses OpenCV, no TensorFlow), and
``data.label_key`` (default ``label``) its class. Pixels are scaled to [-1, 1] and padded with
the background value -1 to the model's side, centred (MNIST's 28 -> 32, as the offline digits);
a larger side is refused. Batches are shuffled per epoch and batched by grain exactly as the
offline digits (``pdmd_jax.data.mnist.dataset``): batch i is a function of (seed, i), and the
iterator's state resumes the stream.
"""

from __future__ import annotations

import os

import numpy as np

PREFIX = "tfds:"


def is_tfds(source: str) -> bool:
  return isinstance(source, str) and source.startswith(PREFIX)


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError("config.data.source='tfds:...' needs tensorflow-datasets: "
                     "pip install -e \".[tfds]\"") from None
  return tfds


def check(source: str, tfds_dir: str, split: str = "train", *,
          fields=("config.data.source", "config.data.tfds_dir", "config.data.split")):
  """The dataset ``source`` is prepared under ``tfds_dir`` in the ArrayRecord format and has
  ``split``; ValueError naming the field (``fields``: source, tfds_dir, split), the value and
  what was expected otherwise. Reads metadata only."""
  name = source[len(PREFIX):]
  field, dir_field, split_field = fields
  if not name:
    raise ValueError(f"{field}={source!r}: expected 'tfds:NAME' (e.g. 'tfds:mnist')")
  if not tfds_dir:
    raise ValueError(f"{dir_field}='': expected the --data_dir the dataset "
                     f"{name!r} was prepared in")
  tfds = _tfds()
  base = name.split(":")[0]
  if not os.path.isdir(os.path.join(tfds_dir, base)):
    raise ValueError(f"{field}={source!r}: not prepared under {dir_field}={tfds_dir!r} "
                     f"(no {os.path.join(tfds_dir, base)}); prepare it with `tfds build "
                     f"{base} --data_dir={tfds_dir} --file_format=array_record`")
  try:
    builder = tfds.builder(name, data_dir=tfds_dir)
  except Exception as e:  # pylint: disable=broad-except  (tfds' errors list every dataset)
    raise ValueError(f"{field}={source!r}: no prepared dataset of that name/version under "
                     f"{tfds_dir!r} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
  fmt = getattr(builder.info.file_format, "value", str(builder.info.file_format))
  if "array_record" not in fmt:
    raise ValueError(f"{field}={source!r}: prepared as {fmt}, but random access reads "
                     f"array_record; rebuild with `tfds build {base} --data_dir={tfds_dir} "
                     "--file_format=array_record`")
  if split not in builder.info.splits:
    raise ValueError(f"{split_field}={split!r}: the dataset {name!r} has splits "
                     f"{sorted(builder.info.splits)}")


def to_model(x: np.ndarray, size: int, frames: int = 0) -> np.ndarray:
  """uint8 [H, W, C] (or [T, H, W, C]) -> float32 in [-1, 1], padded with -1 to size x size."""
  x = np.asarray(x)
  if x.ndim == 2:
    x = x[..., None]
  if frames and (x.ndim != 4 or x.shape[0] != frames):
    raise ValueError(f"config.data.source: clips of shape {x.shape}, expected [{frames}, H, W, C] "
                     "(the model's frames)")
  h, w = x.shape[-3:-1]
  if h > size or w > size or (size - h) % 2 or (size - w) % 2:
    raise ValueError(f"config.data.source: images of {h}x{w} do not pad evenly to the model's "
                     f"{size}x{size}")
  ph, pw = (size - h) // 2, (size - w) // 2
  x = x.astype(np.float32) / 127.5 - 1.0
  pad = [(0, 0)] * (x.ndim - 3) + [(ph, ph), (pw, pw), (0, 0)]
  return np.pad(x, pad, constant_values=-1.0)


class _Source:
  """grain source of {key: float32 [..., size, size, C], "label": int32} records."""

  def __init__(self, source, tfds_dir, split, key, label_key, out_key, size, frames):
    self.records = _tfds().data_source(source[len(PREFIX):], split=split, data_dir=tfds_dir,
                                       download=False)
    self.key, self.label_key, self.out_key = key, label_key, out_key
    self.size, self.frames = size, frames

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i):
    r = self.records[i]
    return {self.out_key: to_model(r[self.key], self.size, self.frames),
            "label": np.int32(r[self.label_key])}


def dataset(data, split: str, batch_size: int, seed: int, *, size: int, frames: int = 0):
  """A random-access grain MapDataset whose element i is batch i of {"image" [B, size, size, C]
  (or "video" [B, frames, size, size, C]), "label" [B]}, endless, from ``data.source``."""
  import grain  # pylint: disable=import-outside-toplevel
  key = data.get("image_key") or ("video" if frames else "image")
  out = "video" if frames else "image"
  src = _Source(data["source"], data["tfds_dir"], split, key, data.get("label_key") or "label", out,
                size, frames)
  ds = grain.MapDataset.source(src).shuffle(seed=seed).repeat()
  return ds.batch(batch_size, drop_remainder=True)


def make_iterator(data, split: str, batch_size: int, seed: int, *, size: int, frames: int = 0):
  """``dataset`` as an endless, checkpointable iterator."""
  import grain  # pylint: disable=import-outside-toplevel
  ds = dataset(data, split, batch_size, seed, size=size, frames=frames)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
