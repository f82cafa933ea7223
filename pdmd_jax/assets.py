"""Small committed artefacts (shipped teachers, the evaluation classifier): safetensors + a card.

An asset directory holds ``params.safetensors`` (the parameter tree flattened to '.'-joined
keys) and ``card.json`` (architecture, training settings, wall time, measured metrics). Files
are written to a temporary name and renamed, so an asset is never left half-written.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from flax import traverse_util
from safetensors import numpy as st_numpy

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def path(name: str) -> str:
  """Absolute path of a shipped asset (``assets/<name>`` in the repository)."""
  return os.path.join(ROOT, name)


def portable(p: str) -> str:
  """``p`` relative to the repository when it lies inside it (as cards record paths), else ``p``."""
  repo = os.path.dirname(ROOT)
  a = os.path.abspath(p) if p else p
  return os.path.relpath(a, repo) if a and a.startswith(repo + os.sep) else p


def _key(k) -> str:
  return ".".join(map(str, k))


def save(directory: str, params, card: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  flat = {_key(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  tmp = os.path.join(directory, "params.safetensors.tmp")
  st_numpy.save_file(flat, tmp)
  os.replace(tmp, os.path.join(directory, "params.safetensors"))
  tmp = os.path.join(directory, "card.json.tmp")
  with open(tmp, "w") as f:
    json.dump(card, f, indent=2, default=float)
  os.replace(tmp, os.path.join(directory, "card.json"))


def load_card(directory: str) -> dict:
  with open(os.path.join(directory, "card.json")) as f:
    return json.load(f)


def fingerprint(directory: str) -> str:
  """8 hex digits naming an asset by its card (architecture, training run, metrics): experiment
  caches key on it, so results of a teacher retrained in place are never mixed with the old."""
  blob = json.dumps(load_card(directory), sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:8]


def load(directory: str, abstract):
  """Parameters shaped like ``abstract`` (a pytree of arrays or ShapeDtypeStructs).

  Raises ValueError naming every missing, unexpected or mis-shaped key.
  """
  file = os.path.join(directory, "params.safetensors")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} does not exist")
  flat = st_numpy.load_file(file)
  want = {_key(k): (k, v) for k, v in traverse_util.flatten_dict(abstract).items()}
  errors = [f"missing {k}" for k in want if k not in flat]
  errors += [f"unexpected {k}" for k in flat if k not in want]
  errors += [f"{k}: file {flat[k].shape} vs model {tuple(v.shape)}" for k, (_, v) in want.items()
             if k in flat and flat[k].shape != tuple(v.shape)]
  if errors:
    raise ValueError(f"{file} does not match the model: " + "; ".join(errors[:10]))
  out = {k: jax.numpy.asarray(flat[name], v.dtype) for name, (k, v) in want.items()}
  return traverse_util.unflatten_dict(out)
