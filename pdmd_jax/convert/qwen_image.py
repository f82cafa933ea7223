"""diffusers QwenImageTransformer2DModel <-> pdmd_jax.models.qwen_image params, both ways.

A Qwen-Image diffusers root keeps the 20B MMDiT in ``transformer/`` (config.json + bf16
shards + ``diffusion_pytorch_model.safetensors.index.json``); the text encoder and VAE are not
read here. The key map is ``qwen_image.diffusers_key`` (the one ``params_from_state_dict``
uses): every kernel is a torch Linear (transposed), norm scales and biases are copied, and the
stacked (scan_layers) ``transformer_blocks`` split on axis 0. Reading and writing are
``convert/common.py``'s: bf16 read bit-exactly, one leaf at a time onto the caller's shardings,
every missing, unexpected or mis-shaped key named in one ValueError, an unreadable or absent
shard named by its path.

LoRA export in the two namings Qwen-Image LoRAs circulate in (``module`` e.g.
``transformer_blocks.0.attn.to_q``, ``transformer_blocks.3.img_mlp.net.0.proj``):
- diffusers/PEFT (``QwenImagePipeline.load_lora_weights``, ``load_lora_adapter``):
  ``transformer.<module>.lora_A.weight`` [r, in], ``lora_B.weight`` [out, r], alpha/r folded
  into B;
- ComfyUI (``LoraLoaderModelOnly``; diffusers converts it with
  ``_convert_non_diffusers_qwen_lora_to_diffusers``): ``diffusion_model.<module>.lora_down.weight``
  [r, in], ``lora_up.weight`` [out, r], ``.alpha`` (scale alpha / r).
"""

from __future__ import annotations

import os

from pdmd_jax.convert import common
from pdmd_jax.convert.common import INDEX, WEIGHTS, Entry  # noqa: F401
from pdmd_jax.models import qwen_image as qi

SUBFOLDER = "transformer"
LORA_PREFIXES = {"diffusers": "transformer", "comfyui": "diffusion_model"}
LORA_FILES = {"diffusers": common.LORA_WEIGHTS, "comfyui": "qwen_image_lora_comfyui.safetensors"}


def key_map(config: qi.QwenImageConfig) -> list[Entry]:
  """One Entry per diffusers tensor of the architecture in ``config``."""
  return common.key_map(qi.abstract_params(config), qi.diffusers_key,
                        "transformer_blocks" if config.scan_layers else None)


def transformer_dir(path) -> str:
  """``path`` itself if it holds config.json, else its ``transformer/`` (a pipeline root)."""
  for d in (path, os.path.join(path, SUBFOLDER)):
    if os.path.isfile(os.path.join(d, "config.json")):
      return str(d)
  raise ValueError(f"{path}: neither config.json nor {SUBFOLDER}/config.json found (a "
                   "QwenImageTransformer2DModel folder or a Qwen-Image diffusers root)")


def read_config(path) -> dict:
  return common.read_config(transformer_dir(path))


def load_transformer(path, config: qi.QwenImageConfig | None = None, shardings=None):
  """A Qwen-Image root or transformer folder -> params pure dict (leaves placed by ``shardings``).

  Args:
    path: diffusers root (with ``transformer/``) or the transformer folder (config.json and
      one safetensors file, or numbered shards + index json).
    config: our QwenImageConfig (dtype/param_dtype/scan_layers); its architecture must equal the
      folder's config.json. None: built from config.json (fp32, unscanned).
    shardings: None (default device), one Sharding for all leaves, or a tree of Shardings
      shaped like the params pure dict (e.g. NamedShardings from ``qwen_image.param_specs``).
  """
  path = transformer_dir(path)
  keys = qi._DIFFUSERS_KEYS  # pylint: disable=protected-access
  config = common.check_config(config, qi.QwenImageConfig, keys, path)
  return common.load(path, key_map(config), qi.abstract_params(config), shardings)


merge_lora = common.merge_lora


def export_diffusers(params, config: qi.QwenImageConfig, out_dir, *, lora=None, dtype=None,
                     max_shard_bytes: int = 5 * 2**30):
  """Writes the transformer folder (config.json + safetensors, sharded past ``max_shard_bytes``
  with an index) that ``QwenImageTransformer2DModel.from_pretrained`` loads; for a pipeline
  root pass ``<root>/transformer``.

  Args:
    lora: optional (lora_dict, scale), merged into the kernels first (see ``merge_lora``).
    dtype: optional storage dtype (e.g. "bfloat16", as the published weights); default: each
      param's own dtype.
  """
  if lora is not None:
    params = merge_lora(params, *lora)
  common.export(params, key_map(config), config.to_diffusers(), out_dir, dtype=dtype,
                max_shard_bytes=max_shard_bytes)


def export_lora(lora_params: dict, out_dir, *, scale=1.0, naming: str = "diffusers",
                weights: str | None = None) -> str:
  """The LoRA alone, one safetensors file in ``out_dir``; returns its path.

  Args:
    lora_params: {path: {"a": [.., in, r], "b": [.., r, out]}} ('.'- or '/'-joined kernel
      paths; stacked a/b of a scan_layers model give one module per layer).
    scale: alpha / r, one float or {path: scale} (``models.lora.scales``).
    naming: "diffusers" (PEFT ``lora_A``/``lora_B``, scale folded into B;
      ``pytorch_lora_weights.safetensors``) or "comfyui" (``diffusion_model.`` +
      ``lora_down``/``lora_up``/``alpha``; ``qwen_image_lora_comfyui.safetensors``).
    weights: file name instead of the default.
  """
  if naming not in LORA_PREFIXES:
    raise ValueError(f"naming={naming!r}; allowed: {sorted(LORA_PREFIXES)}")
  weights = weights or LORA_FILES[naming]
  common.export_lora(lora_params, out_dir, qi.diffusers_key, lambda p: True, scale=scale,
                     prefix=LORA_PREFIXES[naming], naming=naming, weights=weights)
  return os.path.join(out_dir, weights)
