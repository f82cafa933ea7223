"""Qwen-Image weights: the diffusers layout on disk, the random tiny stand-in, shard-on-load, VAE.

``load_teacher`` reads the 20B MMDiT (``<root>/transformer``: config.json + bf16 shards + index)
leaf by leaf onto the run's shardings (no device ever holds the whole model); with
``teacher.random`` it first writes a random tiny Qwen-Image in the same layout and reads it
back through the same loader. ``decode`` turns latents into RGB with diffusers'
``AutoencoderKLQwenImage`` (``<root>/vae``) when torch and diffusers are installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np

HF_REPO = "Qwen/Qwen-Image"
SUBFOLDER = "transformer"
WEIGHTS = "diffusion_pytorch_model"
VAE_STRIDE = 8                 # AutoencoderKLQwenImage: 8 x 8 pixels per latent position
MAX_TEXT_LEN = 1024            # QwenImagePipeline's max_sequence_length (tokens after the template)
# The negative prompt of the pipeline's examples and of LightX2V's Qwen DMD config: a space
# (true CFG needs one; it is encoded like any prompt).
NEGATIVE_PROMPT = " "


def latent_shape(channels: int, height: int, width: int) -> tuple[int, int, int]:
  """[C, h, w] of a Qwen-Image latent: 1328 x 1328 pixels -> [16, 166, 166]."""
  return (channels, height // VAE_STRIDE, width // VAE_STRIDE)


def transformer_dir(root: str) -> str:
  """``root`` itself if it holds config.json (a transformer folder), else ``root/transformer``."""
  if os.path.isfile(os.path.join(root, "config.json")):
    return root
  return os.path.join(root, SUBFOLDER)


def missing_weights(root: str) -> list[str]:
  """What of a diffusers Qwen-Image root (or its transformer folder) is missing (empty: all
  there)."""
  d = transformer_dir(root)
  out = []
  if not os.path.isfile(os.path.join(d, "config.json")):
    out.append(os.path.join(d, "config.json"))
  index = os.path.join(d, WEIGHTS + ".safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out += [os.path.join(d, s) for s in shards if not os.path.isfile(os.path.join(d, s))]
  elif not (os.path.isdir(d) and any(n.endswith(".safetensors") for n in os.listdir(d))):
    out.append(os.path.join(d, WEIGHTS + ".safetensors (or sharded *.safetensors + "
                            f"{WEIGHTS}.safetensors.index.json)"))
  return out


def weights_message(root: str, missing: list[str]) -> str:
  return (
      f"config.teacher.path={root!r}: the Qwen-Image diffusers weights are not there. Looked "
      f"for {SUBFOLDER}/config.json and {SUBFOLDER}/{WEIGHTS}*.safetensors (the 20B MMDiT, "
      "with its shard index); missing:\n  " + "\n  ".join(missing) +
      "\nGet them with\n"
      f"  huggingface-cli download {HF_REPO} --local-dir {root} --include 'transformer/*'\n"
      "(add 'vae/*' to decode samples with --config.eval.vae_path=<root>/vae; 'text_encoder/*' "
      "'tokenizer/*' are only needed by scripts/write_qwen_image_embeddings.py), or point "
      "--config.teacher.path at your copy. `--config=configs/qwen_image.py:tiny` runs without "
      "any weights (a random 2-layer Qwen-Image and random stand-in embeddings).")


def embeddings_message(path: str) -> str:
  return (
      f"config.data.embeddings={path!r}: no prompt-embedding file there. Write one with\n"
      f"  python scripts/write_qwen_image_embeddings.py --prompts prompts.txt "
      f"--model {HF_REPO} --out {path or 'prompts.safetensors'}\n"
      "(Qwen2.5-VL through diffusers' QwenImagePipeline.encode_prompt: torch + transformers + "
      "diffusers and the repo's text_encoder/ and tokenizer/), or from arrays your own encoder "
      "wrote (--from_npy). `:tiny` uses random stand-in embeddings instead.")


def qwen_config(config, arch: dict | None = None):
  """Our QwenImageConfig: the architecture (a diffusers config dict or the tiny one) + numerics."""
  from pdmd_jax.models import qwen_image as qi  # pylint: disable=import-outside-toplevel
  m = config.model
  numerics = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                  remat=m.remat, attention=m.get("attention", "dense"))
  if arch is None:
    return qi.tiny(**numerics)
  return qi.QwenImageConfig.from_diffusers(arch, **numerics)


def architecture(config, *, files: bool = True):
  """Our QwenImageConfig of the run: teacher.path's transformer/config.json (or the tiny one);
  ``model.num_layers`` > 0 keeps only that many blocks (AOT planning). files=False: the
  published 20B architecture instead of the files'."""
  from pdmd_jax.convert import qwen_image as convert  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import qwen_image as qi  # pylint: disable=import-outside-toplevel
  if config.teacher.random:
    cfg = qwen_config(config)
  elif not files:   # AOT planning without weights: the published architecture
    cfg = qwen_config(config, qi.QWEN_IMAGE_20B.to_diffusers())
  else:
    cfg = qwen_config(config, convert.read_config(config.teacher.path))
  layers = config.model.get("num_layers", 0)
  return dataclasses.replace(cfg, num_layers=layers) if layers else cfg


def random_params(cfg, seed: int):
  """Random parameters of a Qwen-Image (numpy, host): kernels N(0, 1/fan_in), norm scales
  1 + 0.1 n, biases 0.1 n. Far cheaper than tracing the module's init."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import qwen_image as qi  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(qi.abstract_params(cfg)).items():
    n = rng.standard_normal(leaf.shape).astype(np.float32)
    x = {"kernel": lambda: n / np.sqrt(leaf.shape[-2]), "scale": lambda: 1.0 + 0.1 * n,
         "bias": lambda: 0.1 * n}.get(path[-1], lambda: 0.02 * n)()
    out[path] = x.astype(leaf.dtype)
  return traverse_util.unflatten_dict(out)


def _random_root(config) -> str:
  """A random tiny Qwen-Image written as a diffusers root (the real loader then reads it)."""
  from pdmd_jax.convert import qwen_image as convert  # pylint: disable=import-outside-toplevel
  cfg = architecture(config)
  root = tempfile.mkdtemp(prefix="pdmd_qwen_image_tiny_")
  convert.export_diffusers(random_params(cfg, config.teacher.seed), cfg,
                           os.path.join(root, SUBFOLDER))
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "QwenImagePipeline"}, f)
  return root


def load_teacher(config, shardings=None):
  """(QwenImageConfig, params): the diffusers root, or a random tiny Qwen-Image.

  shardings: the params' NamedSharding tree (None: host arrays, placed later by jit).
  """
  from pdmd_jax.convert import qwen_image as convert  # pylint: disable=import-outside-toplevel
  t = config.teacher
  root = _random_root(config) if t.random else t.path
  try:
    cfg = architecture(config)
    params = convert.load_transformer(root, cfg, shardings)
  finally:
    if t.random:
      shutil.rmtree(root, ignore_errors=True)
  return cfg, params


def decode(vae_path: str, latents: np.ndarray) -> np.ndarray | None:
  """RGB uint8 images [N, H, W, 3] from latents [N, 16, h, w] through AutoencoderKLQwenImage.

  As QwenImagePipeline: latents un-normalised (x * std + mean, from the VAE's config), one
  frame [N, 16, 1, h, w] decoded, the frame taken. Returns None (with a message) when
  torch/diffusers or the VAE are unavailable.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from diffusers import AutoencoderKLQwenImage  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"qwen_image decode: not decoding ({e}); install torch and diffusers to decode")
    return None
  if not os.path.exists(os.path.join(vae_path, "config.json")):
    print(f"qwen_image decode: not decoding; no AutoencoderKLQwenImage config.json under "
          f"{vae_path!r}")
    return None
  vae = AutoencoderKLQwenImage.from_pretrained(vae_path, torch_dtype=torch.float32).eval()
  c = latents.shape[1]
  mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1)
  std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1)
  images = []
  with torch.no_grad():
    for x in latents:
      x = torch.from_numpy(np.asarray(x, np.float32)[None, :, None]) * std + mean
      img = vae.decode(x, return_dict=False)[0][0, :, 0]          # [3, H, W] in [-1, 1]
      img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
      images.append(img.permute(1, 2, 0).numpy())
  return np.stack(images)
