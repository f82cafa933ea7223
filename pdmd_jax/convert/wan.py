"""diffusers WanTransformer3DModel <-> pdmd_jax.models.wan params (pure dicts), both ways.

A Wan2.2 A14B diffusers root holds two experts. diffusers' WanPipeline runs ``transformer``
for timesteps >= boundary_ratio * 1000 (high noise; t >= boundary_ratio in our [0, 1] time) and
``transformer_2`` below it (low noise); ``boundary_ratio`` sits in ``model_index.json``
(0.875 for T2V-A14B, 0.9 for I2V-A14B).

The key map is explicit: every parameter path of our model maps to one diffusers key through
``_RENAMES`` with one transform: ``linear`` (torch [out, in] <-> our kernel [in, out]),
``conv`` (Conv3d [D, C, pt, ph, pw] <-> patch Linear [C*pt*ph*pw, D]) or ``copy``. Stacked
(scan_layers) block params are layer-stacked on axis 0. Tensors are read in their stored dtype
(bf16 via ml_dtypes, bit-exact) and cast to the model's param dtype; every missing, unexpected or
mis-shaped key is a ValueError. Loading places one leaf at a time with ``jax.device_put`` onto
the caller's shardings, so no device (and at most one leaf on the host) holds a whole expert.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from pdmd_jax.models import wan

SUBFOLDERS = {"transformer": "high_noise", "transformer_2": "low_noise"}
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
# As diffusers' _keys_to_ignore_on_load_unexpected: some Wan2.1 I2V exports carry an unused one.
IGNORED = re.compile(r"(^|\.)norm_added_q\.")
# Our module names -> diffusers' (applied in order to the '.'-joined param path).
_RENAMES = (
    (r"^(time_embedder|time_proj|text_embedder)\.", r"condition_embedder.\1."),
    (r"^image_embedder\.fc1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^image_embedder\.fc2\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^image_embedder\.", "condition_embedder.image_embedder."),
    (r"\.ffn\.fc1\.", ".ffn.net.0.proj."),
    (r"\.ffn\.fc2\.", ".ffn.net.2."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.(kernel|scale)$", ".weight"),
)


class Entry(NamedTuple):
  key: str            # diffusers key
  path: tuple         # our leaf path in the params tree
  layer: int | None   # index on the stacked axis (scan_layers) or None
  kind: str           # "linear" | "conv" | "copy"
  shape: tuple        # diffusers shape


def diffusers_key(path) -> str:
  """Our (unstacked) leaf path, e.g. ('blocks', 0, 'ffn', 'fc1', 'kernel') -> diffusers key."""
  key = ".".join(str(p) for p in path)
  for pattern, repl in _RENAMES:
    key = re.sub(pattern, repl, key)
  return key


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def key_map(config: wan.WanConfig) -> list[Entry]:
  """One Entry per diffusers tensor of the architecture in ``config``."""
  entries = []
  for path, leaf in _flatten(wan.abstract_params(config)):
    stacked = config.scan_layers and path[0] == "blocks"
    shape = leaf.shape[1:] if stacked else leaf.shape
    kind = "copy"
    if path[-1] == "kernel":
      kind = "conv" if path[0] == "patch_embedding" else "linear"
      shape = ((shape[1], config.in_channels, *config.patch_size) if kind == "conv"
               else shape[::-1])
    for layer in range(leaf.shape[0]) if stacked else [None]:
      unstacked = path if layer is None else ("blocks", layer) + path[1:]
      entries.append(Entry(diffusers_key(unstacked), path, layer, kind, tuple(shape)))
  return entries


def _to_ours(kind, x):
  return x.T if kind == "linear" else x.reshape(x.shape[0], -1).T if kind == "conv" else x


def _to_diffusers(kind, x, shape):
  return np.ascontiguousarray(x.T.reshape(shape) if kind in ("linear", "conv") else x)


# ----------------------------------------------------------------------------- loading


def read_config(path) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def boundary_ratio(root) -> float | None:
  """The high/low-noise switch t of a Wan2.2 pipeline root (model_index.json), or None."""
  f = os.path.join(root, "model_index.json")
  if not os.path.exists(f):
    return None
  with open(f) as fh:
    return json.load(fh).get("boundary_ratio")


def _tensor_files(path) -> dict[str, str]:
  """diffusers key -> safetensors file (through the shard index when there is one)."""
  if os.path.exists(os.path.join(path, INDEX)):
    with open(os.path.join(path, INDEX)) as f:
      return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise ValueError(f"no *.safetensors in {path}")
  out = {}
  for name in files:
    with safe_open(os.path.join(path, name), framework="np") as f:
      out.update({k: os.path.join(path, name) for k in f.keys()})
  return out


def _check_config(config: wan.WanConfig, path) -> wan.WanConfig:
  stored = wan.WanConfig.from_diffusers(read_config(path))
  if config is None:
    return stored
  for k in wan._DIFFUSERS_KEYS:  # pylint: disable=protected-access
    if getattr(config, k) != getattr(stored, k):
      raise ValueError(f"config.{k}={getattr(config, k)!r} but {path}/config.json has "
                       f"{getattr(stored, k)!r}")
  return config


def load_expert(path, config: wan.WanConfig | None = None, shardings=None):
  """One diffusers transformer folder -> params pure dict (leaves placed by ``shardings``).

  Args:
    path: folder with config.json and safetensors shard(s) (+ optional index json).
    config: our WanConfig (dtype/param_dtype/scan_layers); its architecture must equal the
      folder's config.json. None: built from config.json (fp32, unscanned).
    shardings: None (default device), one Sharding for all leaves, or a tree of Shardings
      shaped like the params pure dict (e.g. from ``pdmd_jax.sharding.tree_shardings``).
  """
  config = _check_config(config, path)
  entries, files = key_map(config), _tensor_files(path)
  expected = {e.key for e in entries}
  missing = sorted(expected - set(files))
  unexpected = sorted(k for k in set(files) - expected if not IGNORED.search(k))
  if missing or unexpected:
    raise ValueError(f"{path}: missing keys {missing}; unexpected keys {unexpected}")
  abstract = wan.abstract_params(config)
  params = {}
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(f, framework="np")) for f in set(files.values())}
    for e in entries:  # all shapes first: fail before reading any tensor
      got = tuple(handles[files[e.key]].get_slice(e.key).get_shape())
      if got != e.shape:
        raise ValueError(f"{e.key}: checkpoint shape {got} != expected shape {e.shape}")
    by_leaf: dict[tuple, list[Entry]] = {}
    for e in entries:
      by_leaf.setdefault(e.path, []).append(e)
    for path_, group in by_leaf.items():
      leaf = _get(abstract, path_)
      host = np.empty(leaf.shape, leaf.dtype)
      for e in group:
        x = _to_ours(e.kind, handles[files[e.key]].get_tensor(e.key)).astype(leaf.dtype)
        host[() if e.layer is None else e.layer] = x
      sharding = (shardings if shardings is None or isinstance(shardings, jax.sharding.Sharding)
                  else _get(shardings, path_))
      _set(params, path_, jax.device_put(host, sharding))
  return params


def load_experts(root, config: wan.WanConfig | None = None, shardings=None) -> dict[str, Any]:
  """A Wan2.2 root ({transformer, transformer_2}/) or a single transformer folder.

  Returns {"transformer": params (high-noise expert), "transformer_2": params (low-noise)}, or
  {"transformer": params} for a single folder.
  """
  if os.path.exists(os.path.join(root, "config.json")):
    return {"transformer": load_expert(root, config, shardings)}
  subs = [s for s in SUBFOLDERS if os.path.isdir(os.path.join(root, s))]
  if not subs:
    raise ValueError(f"{root}: neither config.json nor transformer/, transformer_2/ found")
  return {s: load_expert(os.path.join(root, s), config, shardings) for s in subs}


# ----------------------------------------------------------------------------- LoRA + export


def _parse(path: str) -> tuple:
  """'blocks/0/attn1/to_q/kernel' or the LoRA trees' 'blocks.0.attn1.to_q.kernel' -> key tuple."""
  sep = "/" if "/" in path else "."
  return tuple(int(p) if p.isdigit() else p for p in path.split(sep))


def merge_lora(params, lora: dict, scale: float):
  """kernel + scale a @ b for every path ('/'- or '.'-joined) of ``lora``: {"a": [.., in, r], "b": [.., r, out]}.

  Stacked (scan_layers) kernels take stacked a [L, in, r] and b [L, r, out].
  """
  out = jax.tree.map(lambda x: x, params)
  for path, ab in lora.items():
    p = _parse(path)
    try:
      k = _get(params, p)
    except (KeyError, IndexError, TypeError):
      raise ValueError(f"LoRA path {path!r} is not a parameter") from None
    delta = jnp.asarray(ab["a"], jnp.float32) @ jnp.asarray(ab["b"], jnp.float32)
    if delta.shape != k.shape:
      raise ValueError(f"LoRA {path}: a @ b shape {delta.shape} != kernel shape {k.shape}")
    _set(out, p, (k.astype(jnp.float32) + scale * delta).astype(k.dtype))
  return out


def _write_safetensors(tensors, out_dir, max_shard_bytes, weights=WEIGHTS):
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


def export_diffusers(params, config: wan.WanConfig, out_dir, *, lora=None, dtype=None,
                     max_shard_bytes: int = 5 * 2**30):
  """Writes config.json + safetensors that ``WanTransformer3DModel.from_pretrained`` loads.

  Args:
    lora: optional (lora_dict, scale), merged into the kernels first (see ``merge_lora``).
    dtype: optional storage dtype (e.g. "bfloat16"); default: each param's own dtype.
  """
  if lora is not None:
    params = merge_lora(params, *lora)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config.to_diffusers(), f, indent=2)
  cache = {}

  def tensors():
    for e in key_map(config):
      if e.path not in cache:  # one leaf on the host at a time
        cache.clear()
        cache[e.path] = np.asarray(jax.device_get(_get(params, e.path)))
      x = cache[e.path] if e.layer is None else cache[e.path][e.layer]
      yield e.key, _to_diffusers(e.kind, x if dtype is None else x.astype(jnp.dtype(dtype)),
                                  e.shape)

  _write_safetensors(tensors(), out_dir, max_shard_bytes)


def export_lora(lora_params: dict, out_dir, *, scale: float = 1.0, prefix: str = "transformer"):
  """LoRA alone in the diffusers/PEFT convention (``pytorch_lora_weights.safetensors``).

  ``<prefix>.blocks.0.attn1.to_q.lora_A.weight`` = a^T [r, in], ``lora_B.weight`` = scale b^T
  [out, r]: the scale (alpha / r) is folded into B, so any loader's default alpha = r merges
  W + B A exactly as ``merge_lora``. Stacked (scan_layers) a/b get one entry per layer.
  """
  def tensors():
    for path, ab in lora_params.items():
      p = _parse(path)
      if p[-1] != "kernel" or p[0] == "patch_embedding":
        raise ValueError(f"LoRA path {path!r}: only Linear kernels are exportable")
      a, b = np.asarray(jax.device_get(ab["a"])), np.asarray(jax.device_get(ab["b"]))
      layers = [(p, a, b)] if a.ndim == 2 else [
          (("blocks", i) + p[1:], a[i], b[i]) for i in range(a.shape[0])]
      for q, ai, bi in layers:
        module = f"{prefix}.{diffusers_key(q)[:-len('.weight')]}"
        yield f"{module}.lora_A.weight", np.ascontiguousarray(ai.T)
        yield f"{module}.lora_B.weight", np.ascontiguousarray((scale * bi).astype(bi.dtype).T)

  os.makedirs(out_dir, exist_ok=True)
  _write_safetensors(tensors(), out_dir, 2**62, weights="pytorch_lora_weights.safetensors")
