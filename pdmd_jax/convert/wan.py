"""diffusers WanTransformer3DModel <-> pdmd_jax.models.wan params (pure dicts), both ways.

A Wan2.2 A14B diffusers root holds two experts. diffusers' WanPipeline runs ``transformer``
for timesteps >= boundary_ratio * 1000 (high noise; t >= boundary_ratio in our [0, 1] time) and
``transformer_2`` below it (low noise); ``boundary_ratio`` sits in ``model_index.json``
(0.875 for T2V-A14B, 0.9 for I2V-A14B).

The key map is explicit: every parameter path of our model maps to one diffusers key through
``_RENAMES`` with one transform: ``linear`` (torch [out, in] <-> our kernel [in, out]),
``conv`` (Conv3d [D, C, pt, ph, pw] <-> patch Linear [C*pt*ph*pw, D]) or ``copy``. Stacked
(scan_layers) block params are layer-stacked on axis 0. Reading and writing are
``convert/common.py``'s: tensors in their stored dtype (bf16 via ml_dtypes, bit-exact) cast to
the model's param dtype; every missing, unexpected or mis-shaped key in one ValueError; one leaf
at a time with ``jax.device_put`` onto the caller's shardings, so no device (and at most one leaf
on the host) holds a whole expert.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from pdmd_jax.convert import common
from pdmd_jax.convert.common import (INDEX, WEIGHTS, Entry, read_config,  # noqa: F401
                                     get_leaf as _get, to_diffusers as _to_diffusers)
from pdmd_jax.models import wan

SUBFOLDERS = {"transformer": "high_noise", "transformer_2": "low_noise"}
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


def diffusers_key(path) -> str:
  """Our (unstacked) leaf path, e.g. ('blocks', 0, 'ffn', 'fc1', 'kernel') -> diffusers key."""
  key = ".".join(str(p) for p in path)
  for pattern, repl in _RENAMES:
    key = re.sub(pattern, repl, key)
  return key


def key_map(config: wan.WanConfig) -> list[Entry]:
  """One Entry per diffusers tensor of the architecture in ``config``."""
  return common.key_map(wan.abstract_params(config), diffusers_key,
                        "blocks" if config.scan_layers else None,
                        {"patch_embedding": (config.in_channels, *config.patch_size)})


# ----------------------------------------------------------------------------- loading


def boundary_ratio(root) -> float | None:
  """The high/low-noise switch t of a Wan2.2 pipeline root (model_index.json), or None."""
  f = os.path.join(root, "model_index.json")
  if not os.path.exists(f):
    return None
  with open(f) as fh:
    return json.load(fh).get("boundary_ratio")


def load_expert(path, config: wan.WanConfig | None = None, shardings=None):
  """One diffusers transformer folder -> params pure dict (leaves placed by ``shardings``).

  Args:
    path: folder with config.json and safetensors shard(s) (+ optional index json).
    config: our WanConfig (dtype/param_dtype/scan_layers); its architecture must equal the
      folder's config.json. None: built from config.json (fp32, unscanned).
    shardings: None (default device), one Sharding for all leaves, or a tree of Shardings
      shaped like the params pure dict (e.g. from ``pdmd_jax.sharding.tree_shardings``).
  """
  keys = wan._DIFFUSERS_KEYS  # pylint: disable=protected-access
  config = common.check_config(config, wan.WanConfig, keys, path)
  return common.load(path, key_map(config), wan.abstract_params(config), shardings, IGNORED)


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


merge_lora = common.merge_lora


def export_diffusers(params, config: wan.WanConfig, out_dir, *, lora=None, dtype=None,
                     max_shard_bytes: int = 5 * 2**30):
  """Writes config.json + safetensors that ``WanTransformer3DModel.from_pretrained`` loads.

  Args:
    lora: optional (lora_dict, scale), merged into the kernels first (see ``merge_lora``).
    dtype: optional storage dtype (e.g. "bfloat16"); default: each param's own dtype.
  """
  if lora is not None:
    params = merge_lora(params, *lora)
  common.export(params, key_map(config), config.to_diffusers(), out_dir, dtype=dtype,
                max_shard_bytes=max_shard_bytes)


def export_lora(lora_params: dict, out_dir, *, scale=1.0, prefix: str = "transformer"):
  """LoRA alone in the diffusers/PEFT convention (``pytorch_lora_weights.safetensors``).

  ``<prefix>.blocks.0.attn1.to_q.lora_A.weight`` = a^T [r, in], ``lora_B.weight`` = scale b^T
  [out, r]: the scale (alpha / r; a float or {path: scale}) is folded into B, so any loader's
  default alpha = r merges W + B A exactly as ``merge_lora``. Stacked (scan_layers) a/b get one
  entry per layer.
  """
  common.export_lora(lora_params, out_dir, diffusers_key, lambda p: p[0] != "patch_embedding",
                     scale=scale, prefix=prefix)
