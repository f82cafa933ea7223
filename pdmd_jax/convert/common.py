"""diffusers transformer folders <-> our params (pure dicts): the model-independent half.

A converter (``convert/wan.py``, ``convert/qwen_image.py``) gives the key map: one ``Entry`` per
diffusers tensor, naming our leaf path, its index on a stacked (scan_layers) axis and one
transform: ``linear`` (torch [out, in] <-> our kernel [in, out]), ``conv`` (Conv [D, C, *k] <->
patch Linear [C*prod(k), D]) or ``copy``. This module reads and writes the diffusers layout
(``config.json`` + ``diffusion_pytorch_model.safetensors``, or numbered shards + an index json)
through such a map: tensors are read in their stored dtype (bf16 via ml_dtypes, bit-exact) and
cast to the leaf's dtype, one leaf at a time onto the caller's shardings (no device, and at most
one leaf on the host, holds a whole model); every missing, unexpected or mis-shaped key is named
in one ValueError, and an unreadable (truncated, corrupt) or absent shard by its file path.

LoRA: ``{path: {"a": [.., in, r], "b": [.., r, out]}}`` (``models/lora.py``) merges as
W + s a b; exported per module as diffusers/PEFT ``lora_A`` = a^T [r, in], ``lora_B`` = s b^T
[out, r] (no alpha: PEFT's default alpha = r, scale 1), or ComfyUI/kohya ``lora_down`` = a^T,
``lora_up`` = b^T and ``alpha`` = s r (the loaders scale by alpha / r).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from typing import Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class Entry(NamedTuple):
  key: str            # diffusers key
  path: tuple         # our leaf path in the params tree
  layer: int | None   # index on the stacked axis (scan_layers) or None
  kind: str           # "linear" | "conv" | "copy"
  shape: tuple        # diffusers shape


def flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def get_leaf(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def set_leaf(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def key_map(abstract, diffusers_key: Callable[[tuple], str], stacked: str | None = None,
            conv_shapes: Mapping[str, tuple] | None = None) -> list[Entry]:
  """One Entry per diffusers tensor of the abstract params tree.

  Args:
    diffusers_key: our unstacked leaf path -> diffusers key.
    stacked: top-level name of the layer-stacked (scan_layers) subtree, or None.
    conv_shapes: top-level name -> (C, *kernel) of a conv stored as our patch Linear kernel;
      every other ``kernel`` is a torch Linear weight.
  """
  entries = []
  for path, leaf in flatten(abstract):
    is_stacked = path[0] == stacked
    shape = leaf.shape[1:] if is_stacked else leaf.shape
    kind = "copy"
    if path[-1] == "kernel":
      conv = (conv_shapes or {}).get(path[0])
      kind = "linear" if conv is None else "conv"
      shape = shape[::-1] if conv is None else (shape[1], *conv)
    for layer in range(leaf.shape[0]) if is_stacked else [None]:
      unstacked = path if layer is None else (path[0], layer) + path[1:]
      entries.append(Entry(diffusers_key(unstacked), path, layer, kind, tuple(shape)))
  return entries


def to_ours(kind, x):
  return x.T if kind == "linear" else x.reshape(x.shape[0], -1).T if kind == "conv" else x


def to_diffusers(kind, x, shape):
  return np.ascontiguousarray(x.T.reshape(shape) if kind in ("linear", "conv") else x)


# ----------------------------------------------------------------------------- reading


def read_config(path) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def check_config(config, config_cls, keys, path):
  """``config`` (None: built from ``path``/config.json) after checking its architecture
  ``keys`` against the folder's."""
  stored = config_cls.from_diffusers(read_config(path))
  if config is None:
    return stored
  for k in keys:
    if getattr(config, k) != getattr(stored, k):
      raise ValueError(f"config.{k}={getattr(config, k)!r} but {path}/config.json has "
                       f"{getattr(stored, k)!r}")
  return config


def open_safetensors(file):
  """safe_open(file), any header/size error re-raised naming the file (safetensors does not)."""
  try:
    return safe_open(file, framework="np")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{file}: unreadable safetensors file ({e}); truncated or corrupt "
                     "download? Fetch it again.") from e


def tensor_files(path) -> dict[str, str]:
  """diffusers key -> safetensors file (through the shard index when there is one)."""
  index = os.path.join(path, INDEX)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError) as e:
      raise ValueError(f"{index}: not a shard index ({e!r})") from e
    out = {k: os.path.join(path, v) for k, v in weight_map.items()}
    absent = sorted(f for f in set(out.values()) if not os.path.isfile(f))
    if absent:
      raise FileNotFoundError(f"shards listed in {index} are missing: {absent}")
    return out
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise ValueError(f"no *.safetensors in {path}")
  out = {}
  for name in files:
    with open_safetensors(os.path.join(path, name)) as f:
      out.update({k: os.path.join(path, name) for k in f.keys()})
  return out


def load(path, entries: list[Entry], abstract, shardings=None, ignored=None):
  """The params pure dict of ``abstract``'s structure from the diffusers folder ``path``.

  Args:
    entries: the key map (``key_map``) of ``abstract``.
    shardings: None (default device), one Sharding for all leaves, or a tree of Shardings
      shaped like the params pure dict; each leaf goes straight to its own.
    ignored: optional compiled regex of unexpected keys to skip (diffusers'
      ``_keys_to_ignore_on_load_unexpected``).
  """
  files = tensor_files(path)
  expected = {e.key for e in entries}
  missing = sorted(expected - set(files))
  unexpected = sorted(k for k in set(files) - expected if not (ignored and ignored.search(k)))
  errors = ([f"missing keys {missing}"] if missing else []) + (
      [f"unexpected keys {unexpected}"] if unexpected else [])
  params = {}
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(open_safetensors(f)) for f in sorted(set(files.values()))}
    for e in entries:  # all shapes first: fail before reading any tensor
      if e.key in files:
        got = tuple(handles[files[e.key]].get_slice(e.key).get_shape())
        if got != e.shape:
          errors.append(f"{e.key}: checkpoint shape {got} != expected shape {e.shape}")
    if errors:
      raise ValueError(f"{path}: " + "; ".join(errors))
    by_leaf: dict[tuple, list[Entry]] = {}
    for e in entries:
      by_leaf.setdefault(e.path, []).append(e)
    for path_, group in by_leaf.items():
      leaf = get_leaf(abstract, path_)
      host = np.empty(leaf.shape, leaf.dtype)
      for e in group:
        x = to_ours(e.kind, handles[files[e.key]].get_tensor(e.key)).astype(leaf.dtype)
        host[() if e.layer is None else e.layer] = x
      sharding = (shardings if shardings is None or isinstance(shardings, jax.sharding.Sharding)
                  else get_leaf(shardings, path_))
      set_leaf(params, path_, jax.device_put(host, sharding))
  return params


# ----------------------------------------------------------------------------- writing


def write_safetensors(tensors, out_dir, max_shard_bytes, weights=WEIGHTS):
  """Stream (key, np array) pairs into <= max_shard_bytes shards (+ index if > 1 shard)."""
  shards, cur, size = [], {}, 0  # shards: (tmp file, keys, bytes)
  for key, x in itertools.chain(tensors, [(None, None)]):
    if cur and (key is None or size + x.nbytes > max_shard_bytes):
      tmp = os.path.join(out_dir, f".shard{len(shards)}.tmp")
      save_file(cur, tmp, metadata={"format": "pt"})
      shards.append((tmp, list(cur), size))
      cur, size = {}, 0
    if key is not None:
      cur[key], size = x, size + x.nbytes
  if len(shards) == 1:
    os.replace(shards[0][0], os.path.join(out_dir, weights))
    return
  stem, n, weight_map = weights[:-len(".safetensors")], len(shards), {}
  for i, (tmp, keys, _) in enumerate(shards):
    name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(tmp, os.path.join(out_dir, name))
    weight_map.update({k: name for k in keys})
  with open(os.path.join(out_dir, weights + ".index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(s[2] for s in shards)},
               "weight_map": weight_map}, f, indent=2)


def export(params, entries: list[Entry], diffusers_config: dict, out_dir, *, dtype=None,
           max_shard_bytes: int = 5 * 2**30):
  """config.json + safetensors (sharded past ``max_shard_bytes``, with an index) of ``params``;
  ``dtype``: optional storage dtype (e.g. "bfloat16"), default each param's own."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(diffusers_config, f, indent=2)
  cache = {}

  def tensors():
    for e in entries:
      if e.path not in cache:  # one leaf on the host at a time
        cache.clear()
        cache[e.path] = np.asarray(jax.device_get(get_leaf(params, e.path)))
      x = cache[e.path] if e.layer is None else cache[e.path][e.layer]
      yield e.key, to_diffusers(e.kind, x if dtype is None else x.astype(jnp.dtype(dtype)),
                                e.shape)

  write_safetensors(tensors(), out_dir, max_shard_bytes)


# ----------------------------------------------------------------------------- LoRA


def parse_path(path: str) -> tuple:
  """'blocks/0/attn1/to_q/kernel' or the LoRA trees' 'blocks.0.attn1.to_q.kernel' -> key tuple."""
  sep = "/" if "/" in path else "."
  return tuple(int(p) if p.isdigit() else p for p in path.split(sep))


def _scale_of(scale, path) -> float:
  return scale[path] if isinstance(scale, Mapping) else scale


def merge_lora(params, lora: dict, scale):
  """kernel + s a @ b for every path ('/'- or '.'-joined) of ``lora``: {"a": [.., in, r],
  "b": [.., r, out]}.

  ``scale`` s: one float, or {path: alpha / r} (``models.lora.scales``). Stacked (scan_layers)
  kernels take stacked a [L, in, r] and b [L, r, out].
  """
  out = jax.tree.map(lambda x: x, params)
  for path, ab in lora.items():
    p = parse_path(path)
    try:
      k = get_leaf(params, p)
    except (KeyError, IndexError, TypeError):
      raise ValueError(f"LoRA path {path!r} is not a parameter") from None
    delta = jnp.asarray(ab["a"], jnp.float32) @ jnp.asarray(ab["b"], jnp.float32)
    if delta.shape != k.shape:
      raise ValueError(f"LoRA {path}: a @ b shape {delta.shape} != kernel shape {k.shape}")
    set_leaf(out, p, (k.astype(jnp.float32) + _scale_of(scale, path) * delta).astype(k.dtype))
  return out


def lora_modules(lora_params: dict, diffusers_key, linear: Callable[[tuple], bool]
                 ) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
  """(our path, diffusers module, a [in, r], b [r, out]) per layer of each LoRA entry (stacked
  a/b give one module per layer); ``linear(path)`` tells which kernels are torch Linears."""
  for path, ab in lora_params.items():
    p = parse_path(path)
    if p[-1] != "kernel" or not linear(p):
      raise ValueError(f"LoRA path {path!r}: only Linear kernels are exportable")
    a, b = np.asarray(jax.device_get(ab["a"])), np.asarray(jax.device_get(ab["b"]))
    layers = [(p, a, b)] if a.ndim == 2 else [
        ((p[0], i) + p[1:], a[i], b[i]) for i in range(a.shape[0])]
    for q, ai, bi in layers:
      yield path, diffusers_key(q)[:-len(".weight")], ai, bi


def export_lora(lora_params: dict, out_dir, diffusers_key, linear, *, scale=1.0,
                prefix: str = "transformer", naming: str = "diffusers", weights=None):
  """The LoRA alone as one safetensors file in ``out_dir``; ``scale``: float or {path: scale}.

  naming="diffusers": ``<prefix>.<module>.lora_A.weight`` = a^T [r, in], ``lora_B.weight`` =
    s b^T [out, r] (s folded into B: any loader's default alpha = r merges W + B A exactly as
    ``merge_lora``); file ``pytorch_lora_weights.safetensors``.
  naming="comfyui": ``<prefix>.<module>.lora_down.weight`` = a^T, ``lora_up.weight`` = b^T,
    ``.alpha`` = s r (fp32 scalar; ComfyUI and diffusers scale B A by alpha / r).
  """
  if naming not in ("diffusers", "comfyui"):
    raise ValueError(f"naming={naming!r}; allowed: 'diffusers', 'comfyui'")

  def tensors():
    for path, module, a, b in lora_modules(lora_params, diffusers_key, linear):
      s, name = _scale_of(scale, path), f"{prefix}.{module}"
      if naming == "diffusers":
        yield f"{name}.lora_A.weight", np.ascontiguousarray(a.T)
        yield f"{name}.lora_B.weight", np.ascontiguousarray((s * b).astype(b.dtype).T)
      else:
        yield f"{name}.alpha", np.asarray(s * a.shape[-1], np.float32)
        yield f"{name}.lora_down.weight", np.ascontiguousarray(a.T)
        yield f"{name}.lora_up.weight", np.ascontiguousarray(b.T)

  os.makedirs(out_dir, exist_ok=True)
  write_safetensors(tensors(), out_dir, 2**62, weights=weights or LORA_WEIGHTS)
