"""Workdir files through etils.epath: local paths and cloud URLs (``gs://``, ``s3://``) alike.

TPU and cluster runs keep their workdir on cloud storage (``--workdir=gs://bucket/run``).
Orbax checkpoints already speak those URLs; every other file the run writes or reads back
(metrics JSON and tables, sample grids, ``.npz`` / ``.npy`` caches, the mixture fit) goes
through these helpers instead of ``open`` / ``os``, so a URL never becomes a local folder named
``gs:``. (``gs://`` needs gcsfs, the ``gcs`` extra; TensorBoard events use tensorboardX's own
writer, which needs google-cloud-storage for ``gs://``.) Writes are whole-file: a local file
is written to a temporary name and renamed; object stores commit an object on close.
"""

from __future__ import annotations

import io
import json
import os
import uuid

import numpy as np
from etils import epath


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


def path(p) -> epath.Path:
  return epath.Path(p)


def is_url(p) -> bool:
  return "://" in str(p)


def absolute(p) -> str:
  """``p`` as an absolute local path, or the URL unchanged."""
  return str(p) if is_url(p) else os.path.abspath(p)


def join(base, *parts) -> str:
  return str(path(base).joinpath(*parts))


def exists(p) -> bool:
  return path(p).exists()


def makedirs(p) -> None:
  """Creates the directory ``p`` (and parents); an unwritable one is a WorkdirError naming it.

  The write probe has a name of its own per call: the processes of a multi-process run create
  their shared workdir at the same time, and a shared name let one delete another's probe."""
  try:
    path(p).mkdir(parents=True, exist_ok=True)
    probe = path(p) / f".pdmd_write_probe_{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"workdir {str(p)!r} cannot be written: {e.strerror or e}") from e


def write_bytes(p, data: bytes) -> None:
  """Writes ``data`` to ``p`` as a whole (local: temporary file + rename)."""
  p = path(p)
  if is_url(p):
    p.write_bytes(data)
    return
  tmp = p.with_name(p.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(p)


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode())


def write_json(p, obj) -> None:
  write_text(p, json.dumps(obj, indent=2, default=float))


def save_npy(p, array) -> None:
  buf = io.BytesIO()
  np.save(buf, np.asarray(array))
  write_bytes(p, buf.getvalue())


def load_npy(p) -> np.ndarray:
  return np.load(io.BytesIO(read_bytes(p)))


def save_npz(p, **arrays) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(p, buf.getvalue())


def save_figure(p, fig, **kwargs) -> None:
  """A matplotlib figure as PNG at ``p``."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **kwargs)
  write_bytes(p, buf.getvalue())


class _EventFile:
  """A TensorBoard event file on an object store: buffered, the whole object rewritten on
  flush (object stores cannot append; tensorboardX's own S3/GCS writers do the same)."""

  def __init__(self, p):
    self.path, self.buffer = p, io.BytesIO()

  def write(self, data):
    self.buffer.write(data)

  def flush(self):
    write_bytes(self.path, self.buffer.getvalue())

  def close(self):
    self.flush()


class _EventFiles:
  def open(self, p):
    return _EventFile(p)

  def directory_check(self, p):
    path(p).mkdir(parents=True, exist_ok=True)


def register_tensorboard_scheme(scheme: str) -> None:
  """tensorboardX writes ``<scheme>://`` event files through epath (gs://: gcsfs)."""
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  record_writer.register_writer_factory(scheme, _EventFiles())
