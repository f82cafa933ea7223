"""Wan2.2 A14B weights: the diffusers layout on disk, the random tiny stand-in, shard-on-load.

``load_teacher`` reads the two experts (``transformer`` = high noise, ``transformer_2`` = low
noise) leaf by leaf onto the run's shardings (no device ever holds a whole 14B expert); with
``teacher.random`` it first writes two random tiny experts in the same layout and reads them
back through the same loader.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

TASKS = ("t2v", "i2v")
HF_REPOS = {"t2v": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "i2v": "Wan-AI/Wan2.2-I2V-A14B-Diffusers"}
BOUNDARIES = {"t2v": 0.875, "i2v": 0.9}     # model_index.json boundary_ratio of each repo
VAE_STRIDE = (4, 8, 8)                       # Wan2.1 VAE (used by Wan2.2 A14B): frames, h, w
EXPERT_DIRS = ("transformer", "transformer_2")   # high noise, low noise
WEIGHTS = "diffusion_pytorch_model"
# I2V condition channels of the tiny model (1 mask + 4 latent; Wan2.2 I2V-A14B: 4 + 16).
TINY_CONDITION_CHANNELS = 5
# Wan's own default negative prompt (Wan2.1/2.2 shared_config.sample_neg_prompt).
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
                       "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
                       "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def latent_shape(channels: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
  """[C, F, h, w] of a Wan latent: 81 frames at 480 x 832 -> [16, 21, 60, 104]."""
  st, sh, sw = VAE_STRIDE
  return (channels, (num_frames - 1) // st + 1, height // sh, width // sw)


def missing_weights(root: str) -> list[str]:
  """What of a diffusers Wan2.2 A14B root is missing (empty when loadable)."""
  out = []
  if not os.path.isfile(os.path.join(root, "model_index.json")):
    out.append(os.path.join(root, "model_index.json"))
  for sub in EXPERT_DIRS:
    d = os.path.join(root, sub)
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


def weights_message(root: str, task: str, missing: list[str]) -> str:
  repo = HF_REPOS[task]
  return (
      f"config.teacher.path={root!r}: the Wan2.2 {task.upper()}-A14B diffusers weights are not "
      "there. Looked for model_index.json, transformer/config.json + "
      f"transformer/{WEIGHTS}*.safetensors (high-noise expert) and transformer_2/config.json + "
      f"transformer_2/{WEIGHTS}*.safetensors (low-noise expert); missing:\n  "
      + "\n  ".join(missing) +
      "\nGet them with\n"
      f"  huggingface-cli download {repo} --local-dir {root} "
      "--include 'model_index.json' 'transformer/*' 'transformer_2/*'\n"
      "(the text encoder is only needed by scripts/write_wan_embeddings.py), or point "
      "--config.teacher.path at your copy. `--config=configs/wan22.py:tiny` runs without any "
      "weights (a random 2-layer Wan and random stand-in embeddings).")


def embeddings_message(path: str, task: str) -> str:
  return (
      f"config.data.embeddings={path!r}: no prompt-embedding file there. Write one with\n"
      f"  python scripts/write_wan_embeddings.py --prompts prompts.txt "
      f"--model {HF_REPOS[task]} --out {path or 'prompts.safetensors'}\n"
      "(umT5 from the diffusers repo's text_encoder/, run anywhere with torch + transformers), "
      "or from a .npy the encoder you use wrote (--from_npy). `:tiny` uses random stand-in "
      "embeddings instead.")


def wan_config(config, arch: dict | None = None):
  """Our WanConfig: the architecture (a diffusers config dict or the tiny one) + numerics."""
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  m = config.model
  numerics = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                  remat=m.remat, attention=m.get("attention", "dense"))
  if arch is None:
    cond = TINY_CONDITION_CHANNELS if config.teacher.task == "i2v" else 0
    return wan.tiny(in_channels=4 + cond, **numerics)
  return wan.WanConfig.from_diffusers(arch, **numerics)


def random_params(cfg, seed: int):
  """Random parameters of a Wan (numpy, host): kernels N(0, 1/fan_in), norm scales 1 + 0.1 n,
  biases 0.1 n, modulation tables n / sqrt(dim). Far cheaper than tracing the module's init."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(wan.abstract_params(cfg))
  out = {}
  for path, leaf in flat.items():
    n = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1]
    if name == "kernel":
      x = n / np.sqrt(leaf.shape[-2])
    elif name == "scale":
      x = 1.0 + 0.1 * n
    elif name == "bias":
      x = 0.1 * n
    elif name == "scale_shift_table":
      x = n / np.sqrt(leaf.shape[-1])
    else:
      x = 0.02 * n
    out[path] = x.astype(leaf.dtype)
  return traverse_util.unflatten_dict(out)


def _random_teacher_root(config) -> str:
  """Two random tiny experts written as a diffusers Wan2.2 root (the real loader then reads it)."""
  from pdmd_jax.convert import wan as convert  # pylint: disable=import-outside-toplevel
  cfg = architecture(config)
  root = tempfile.mkdtemp(prefix="pdmd_wan_tiny_")
  for i, sub in enumerate(EXPERT_DIRS):
    convert.export_diffusers(random_params(cfg, config.teacher.seed + i), cfg,
                             os.path.join(root, sub))
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "WanPipeline", "boundary_ratio": config.teacher.boundary}, f)
  return root


def load_teacher(config, shardings=None):
  """(WanConfig, (high params, low params)): the diffusers root, or random tiny experts.

  shardings: one expert's NamedSharding tree (None: host arrays, placed later by jit).
  """
  from pdmd_jax.convert import wan as convert  # pylint: disable=import-outside-toplevel
  t = config.teacher
  root = _random_teacher_root(config) if t.random else t.path
  try:
    cfg = architecture(config)
    experts = tuple(convert.load_expert(os.path.join(root, sub), cfg, shardings)
                    for sub in EXPERT_DIRS)
  finally:
    if t.random:
      shutil.rmtree(root, ignore_errors=True)
  return cfg, experts


def architecture(config, *, files: bool = True):
  """Our WanConfig of the run, from teacher.path's transformer/config.json (or the tiny one);
  ``model.num_layers`` > 0 keeps only that many blocks (AOT planning). files=False: the
  published A14B architecture of teacher.task instead of the files'."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from pdmd_jax.convert import wan as convert  # pylint: disable=import-outside-toplevel
  if config.teacher.random:
    cfg = wan_config(config)
  elif not files:   # AOT planning without weights: the published A14B architecture
    from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
    arch = wan.WAN22_I2V_A14B if config.teacher.task == "i2v" else wan.WAN22_A14B
    cfg = wan_config(config, arch.to_diffusers())
  else:
    cfg = wan_config(config, convert.read_config(os.path.join(config.teacher.path, EXPERT_DIRS[0])))
  layers = config.model.get("num_layers", 0)
  return dataclasses.replace(cfg, num_layers=layers) if layers else cfg
