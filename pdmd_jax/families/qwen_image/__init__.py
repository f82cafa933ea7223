"""Qwen-Image (20B MMDiT, T2I) in the diffusers layout: the paper's image teacher.

configs/qwen_image.py runs it; docs/qwen_image.md is the guide.

- teacher: the one transformer (``<root>/transformer``) with diffusers' "true CFG" against a
  negative-prompt embedding, v_u + w (v_c - v_u), then QwenImagePipeline's per-token norm
  rescale v_g ||v_c|| / ||v_g|| over each packed token's 16 channels x 2 x 2 patch
  (``teacher.cfg_norm = "token"``; "sample" / "none" are the other choices).
- generator experts: one LoRA per phase on the ONE shared backbone, the frozen teacher (a
  non-MoE teacher: spec §3.7 "both experts share the single teacher backbone with two LoRAs";
  the distilled model is still a 2-expert MoE at inference). ``generator.lora_rank = 0``:
  full copies.
- fakes: full-parameter copies of the teacher, re-initialised from it at each phase (the
  paper); shared-backbone option ``fake.lora_rank > 0``: a LoRA tree on the frozen teacher.
- conditioning: precomputed Qwen2.5-VL last hidden states [L <= 1024, 3584] with their token
  masks (``pdmd_jax.families.prompts``: ``data.embeddings``, or a seeded random stand-in for
  the tiny model); the text attention masks the padding, so prompts keep ragged lengths.
- sharding: every parameter carries logical axes (``models.qwen_image.param_specs``); real
  weights are read leaf by leaf onto the run's shardings. Blocks are scanned and their LoRA
  kernels merged per layer inside the scan (no merged copy of the 60 blocks).
- evaluation: ``latent_eval`` (latents against the teacher's Euler sampler with the same CFG);
  RGB images with ``eval.vae_path`` (diffusers AutoencoderKLQwenImage) and ``eval.decode``.
"""

from __future__ import annotations

import dataclasses
import os
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pdmd_jax import families
from pdmd_jax import sharding as sh
from pdmd_jax import teachers
from pdmd_jax import validation as V
from pdmd_jax.families import common
from pdmd_jax.families import prompts
from pdmd_jax.families.qwen_image import weights as W
from pdmd_jax.models import attention

NEEDED = ("teacher.path", "teacher.random", "teacher.seed", "teacher.cfg_norm", "model.dtype",
          "model.param_dtype", "model.teacher_dtype", "model.scan_layers", "model.remat",
          "model.attention", "model.num_layers", "generator.lora_rank", "generator.lora_alpha",
          "generator.lora_targets", "fake.lora_rank", "data.embeddings", "data.height",
          "data.width", "data.text_len", "data.random_prompts", "data.random_length",
          "data.max_table_gb", "eval.batch_size", "eval.vae_path", "eval.decode")
# LoRA kernels inside the transformer blocks are merged per layer inside the layer scan.
BLOCKS = r"transformer_blocks\..*"


# ============================================================================================
# Validation
# ============================================================================================

def validate(config, plan, *, files: bool = True):  # pylint: disable=unused-argument
  """Every Qwen-Image field; then (``files``) the weights and embeddings exist and fit."""
  from pdmd_jax.models import qwen_image as qi  # pylint: disable=import-outside-toplevel
  missing = [f for f in NEEDED if not V.has(config, f)]
  if missing:
    V.fail("teacher.type", "qwen_image",
           f"a config with every field of configs/qwen_image.py; missing {missing}")
  t, d = config.teacher, config.data
  for f in ("teacher.random", "model.scan_layers"):
    if not isinstance(V.get(config, f), bool):
      V.fail(f, V.get(config, f), [True, False])
  V.choice(config, "teacher.cfg_norm", teachers.CFG_NORMS)
  V.positive(config, "teacher.seed", integer=True, minimum=0)
  V.choice(config, "model.remat", tuple(qi.REMAT_POLICIES))
  for f in ("model.dtype", "model.param_dtype"):
    V.choice(config, f, ("float32", "bfloat16"))
  V.choice(config, "model.teacher_dtype", ("", "float32", "bfloat16"))
  V.choice(config, "model.attention", attention.IMPLS)
  V.positive(config, "model.num_layers", integer=True, minimum=0)
  common.validate_lora(config)
  for f in ("data.height", "data.width", "data.text_len", "data.random_prompts",
            "data.random_length", "eval.batch_size"):
    V.positive(config, f, integer=True)
  V.positive(config, "eval.decode", integer=True, minimum=0)
  V.positive(config, "data.max_table_gb")
  prompts.check_stream(config)
  for f in ("data.height", "data.width"):
    if V.get(config, f) % (2 * W.VAE_STRIDE):
      V.fail(f, V.get(config, f), f"a multiple of {2 * W.VAE_STRIDE} (VAE stride "
             f"{W.VAE_STRIDE} x patch 2), e.g. 1328 (1:1) or 1664 x 928 (16:9)")
  if d.text_len > W.MAX_TEXT_LEN:
    V.fail("data.text_len", d.text_len, f"at most {W.MAX_TEXT_LEN} (QwenImagePipeline's "
           "max_sequence_length)")
  if d.random_length > d.text_len:
    V.fail("data.random_length", d.random_length, f"at most data.text_len={d.text_len}")
  if not isinstance(config.eval.vae_path, str):
    V.fail("eval.vae_path", config.eval.vae_path, "'' or a diffusers AutoencoderKLQwenImage "
           "folder (<root>/vae)")
  if files and not t.random and not d.embeddings:
    V.fail("data.embeddings", d.embeddings, "a prompt-embedding file (scripts/"
           "write_qwen_image_embeddings.py); '' (random stand-in) only with teacher.random=True "
           "(:tiny)")
  if files:
    _check_files(config)               # last: every field is fine, files missing?


def _check_files(config):
  """The weights under teacher.path and the embeddings file exist (FileNotFoundError
  otherwise, naming what was looked for and how to get it); then their shapes fit."""
  t, d = config.teacher, config.data
  problems = []
  if not t.random:
    missing = W.missing_weights(t.path)
    if missing:
      problems.append(W.weights_message(t.path, missing))
  if d.embeddings and not os.path.isfile(d.embeddings):
    problems.append(W.embeddings_message(d.embeddings))
  if problems:
    raise FileNotFoundError("\n\n".join(problems))
  _check_inputs(config)   # embeddings vs config.json: shapes only, nothing loaded


def _check_inputs(config):
  """The embeddings fit the model and the config (ValueError naming the field); reads only
  transformer/config.json and the embeddings' headers."""
  d = config.data
  cfg = W.architecture(config)
  if d.embeddings:
    shapes, nbytes = prompts.embedding_shapes(d.embeddings), os.path.getsize(d.embeddings)
    where = f"config.data.embeddings={d.embeddings!r}"
  else:
    emb = embeddings(config, cfg)
    shapes = {"context": emb.context.shape, "mask": emb.mask.shape,
              "negative": None if emb.negative is None else emb.negative.shape,
              "negative_mask": None if emb.negative_mask is None else emb.negative_mask.shape}
    nbytes, where = emb.nbytes, "the random stand-in embeddings"
  ctx, neg, dim = shapes["context"], shapes["negative"], cfg.joint_attention_dim
  if len(ctx) != 3 or ctx[-1] != dim:
    raise ValueError(f"{where}: context shape {ctx} is not [N, L, joint_attention_dim={dim}] "
                     "(Qwen2.5-VL-7B: 3584)")
  if neg is not None and (len(neg) != 2 or neg[-1] != dim):
    raise ValueError(f"{where}: negative shape {neg} is not [L, {dim}]")
  for name, want in (("mask", tuple(ctx[:2])), ("negative_mask", None if neg is None else neg[:1])):
    got = shapes.get(name)
    if got is not None and (want is None or tuple(got) not in (tuple(want), (1,) + tuple(want))):
      raise ValueError(f"{where}: {name} shape {tuple(got)} does not match its embedding "
                       f"({want}: one 0/1 entry per token)")
  longest = max(ctx[1], 0 if neg is None else neg[0])
  if longest > d.text_len:
    raise ValueError(f"{where}: {longest} tokens > config.data.text_len={d.text_len}")
  if uses_cfg(config) and neg is None:
    raise ValueError(f"{where}: no 'negative' embedding, but teacher.guidance_scale != 1 needs "
                     f"one for true CFG (write it with --negative_prompt, {W.NEGATIVE_PROMPT!r} "
                     "by default)")
  held, what = nbytes, "the random stand-in is held on every device"
  if d.embeddings:
    held, what = prompts.table_bytes(d, shapes, nbytes)
  if held > d.max_table_gb * 2**30:
    raise ValueError(f"{where}: {held / 2**30:.1f} GB of embeddings > "
                     f"config.data.max_table_gb={d.max_table_gb}: {what}")


def uses_cfg(config) -> bool:
  return config.teacher.guidance_scale != 1.0


def teacher_dtype(config):
  """model.teacher_dtype, or "" = the compute dtype (model.dtype)."""
  return jnp.dtype(config.model.teacher_dtype or config.model.dtype)


def image_tokens(cfg, data) -> int:
  """Image tokens of one sample: latent (h, w) over the 2 x 2 patch (1328 x 1328: 6,889)."""
  _, h, w = W.latent_shape(cfg.latent_channels, data.height, data.width)
  return (h // cfg.patch_size) * (w // cfg.patch_size)


# ============================================================================================
# Build
# ============================================================================================

@dataclasses.dataclass(frozen=True, eq=False)
class QwenNet:
  """apply(params, x [B, C, h, w], t [B], y) of the Qwen-Image transformer; hashable by identity.

  y["context"] [B, L, 3584] with y["mask"] [B, L] (True: a valid token); the padding is never
  attended to, so any L >= the longest prompt gives the same velocity.
  """
  graphdef: Any

  def apply(self, params, x, t, y):
    model = nnx.merge(self.graphdef, nnx.State(params))
    return model(x, t, y["context"], y.get("mask")).astype(x.dtype)


def embeddings(config, cfg) -> prompts.Embeddings:
  """The configured embeddings file, or the seeded random stand-in (data.embeddings == "")."""
  d = config.data
  if d.embeddings:
    return prompts.load_embeddings(d.embeddings)
  return prompts.random_embeddings(d.random_prompts, d.random_length, cfg.joint_attention_dim,
                                   seed=config.seed + 11)


def _abstract_cond(config, cfg):
  """Conditioning of the run's shapes without loading an embeddings file (AOT planning): the
  file's token count and dtype if it exists (headers only), else data.text_len tokens in the
  compute dtype; the random stand-in itself (it is small) for data.embeddings == ""."""
  d = config.data
  if not d.embeddings:
    return prompts.make_cond_fn(embeddings(config, cfg), uses_cfg(config), masks=True)
  dtype, length = jnp.dtype(config.model.dtype), d.text_len
  if os.path.isfile(d.embeddings):
    shapes = prompts.embedding_shapes(d.embeddings)
    neg = shapes["negative"]
    length = max(shapes["context"][1], neg[0] if neg is not None and uses_cfg(config) else 0)
    dtype = jnp.dtype(shapes["dtype"])

  def sample_cond(key, shape):
    k1, k2 = jax.random.split(key)
    txt = (*shape, length, cfg.joint_attention_dim)
    y = {"index": jax.random.randint(k1, shape, 0, 1000),
         "context": jax.random.normal(k2, txt, dtype), "mask": jnp.ones(txt[:-1], bool)}
    if uses_cfg(config):
      y["negative"], y["negative_mask"] = jnp.zeros(txt, dtype), jnp.ones(txt[:-1], bool)
    return y
  return sample_cond


def build(config, plan, mesh, *, abstract: bool = False, workdir: str | None = None):  # pylint: disable=unused-argument
  """The CFG teacher, LoRA experts on it and per-phase fakes (see the module docstring)."""
  from pdmd_jax.models import qwen_image as qi  # pylint: disable=import-outside-toplevel
  t, d = config.teacher, config.data
  files = not abstract or t.random or W.missing_weights(t.path) == []
  cfg = W.architecture(config, files=files)
  axes = jax.tree.map(tuple, qi.param_specs(cfg),
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  params = qi.abstract_params(cfg)
  if abstract:
    sample_cond, cond_data = _abstract_cond(config, cfg), None
  else:
    shardings = sh.logical_shardings(mesh, params, axes) if not t.random else None
    cfg, params = W.load_teacher(config, shardings)
    sample_cond, cond_data = prompts.conditioning(d, lambda: embeddings(config, cfg),
                                                  uses_cfg(config), masks=True)
  # The frozen teacher's block weights (also the LoRA experts' backbone) in the compute dtype;
  # trainable copies (full fakes) and their moments stay in model.param_dtype.
  teacher_params = common.cast_linears(params, teacher_dtype(config), "transformer_blocks")
  net = QwenNet(nnx.split(qi.abstract_model(cfg), nnx.Param)[0])
  p = cfg.patch_size
  teacher = teachers.network_teacher(
      net.apply, 0, t.guidance_scale, t.cfg_norm, token_block=(cfg.out_channels, p, p),
      null_cond=prompts.negative_cond)
  return families.Family(
      name="qwen_image", teacher=teacher, teacher_params=teacher_params, teacher_axes=axes,
      apply=net.apply, sample_shape=W.latent_shape(cfg.out_channels, d.height, d.width),
      attention_shape=(image_tokens(cfg, d) + d.text_len, cfg.num_attention_heads),
      sample_cond=sample_cond, cond_data=cond_data, evaluator="latent_eval",
      extras=MappingProxyType({"qwen_config": cfg, "net": net, "decode": ("images", W.decode)}),
      **common.adapters(config, net.apply, params, axes, abstract=abstract, defer=BLOCKS))
