"""Wan2.1/2.2 video transformer (Flax NNX), numerically equal to diffusers' WanTransformer3DModel.

Velocity field v(x_t, t, text[, image]) of a flow-matching video model: 3-D patch embedding,
sinusoidal time embedding -> six AdaLN modulation vectors per block, blocks of [self-attention
with 3-D RoPE and RMS-normalised q/k, cross-attention to text (+ image tokens for Wan2.1 I2V),
GELU(tanh) MLP], AdaLN output head and unpatchify.

Conventions:
- ``t`` is the flow-matching time in [0, 1] (x_t = (1 - t) x_0 + t eps); Wan's timestep is
  ``1000 t`` and the multiplication happens inside the model.
- fp32 where diffusers keeps fp32 (``_keep_in_fp32_modules``): the time embedder, the
  scale/shift tables, the LayerNorms and all modulation arithmetic; everything else runs in
  ``config.dtype`` with parameters in ``config.param_dtype``. The residual stream is kept in
  ``config.dtype`` like diffusers' (fp32 add, cast back).
- Parameters carry logical axis names (``embed``, ``heads``, ``mlp``, ``layers``) as NNX
  ``out_sharding`` metadata; ``param_specs`` returns them as a PartitionSpec tree.
- Deviations from diffusers (documented, none change the numbers of a Wan2.2 A14B run):
  text and image tokens arrive separately (diffusers concatenates them and splits off the last
  512 tokens as text, so equal when the text has 512 tokens); F/H/W must be divisible by the
  patch (diffusers' Conv3d would silently crop); RoPE tables are computed for any grid
  (diffusers precomputes ``rope_max_seq_len`` positions per axis); ``qk_norm`` must be
  "rms_norm_across_heads" (diffusers applies it whatever the value); Wan2.2 TI2V-5B per-token
  timesteps are not implemented.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdmd_jax import sharding
from pdmd_jax.models import attention
from pdmd_jax.models import lora

F32 = jnp.float32
_DIFFUSERS_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels",
                   "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers",
                   "cross_attn_norm", "qk_norm", "eps", "image_dim", "added_kv_proj_dim",
                   "rope_max_seq_len", "pos_embed_seq_len")
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """Architecture (diffusers config keys and defaults) + numerics/memory options."""
  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 40
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 13824
  num_layers: int = 40
  cross_attn_norm: bool = True
  qk_norm: str | None = "rms_norm_across_heads"
  eps: float = 1e-6
  image_dim: int | None = None            # CLIP image-token width (Wan2.1 I2V); None: no embedder
  added_kv_proj_dim: int | None = None    # image k/v projections in cross-attention
  rope_max_seq_len: int = 1024
  pos_embed_seq_len: int | None = None    # FLF2V: learned position of the 2 x 257 image tokens
  dtype: Any = "float32"                  # compute dtype, e.g. "bfloat16"
  param_dtype: Any = "float32"
  scan_layers: bool = False               # stack blocks on a leading "layers" axis + lax.scan
  remat: str = "none"                     # "none" | "full" | "dots" (save weight matmuls)
  attention: str = "dense"                # models/attention.py: dense | blockwise (no [L, L])

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    if self.attention not in attention.IMPLS:
      raise ValueError(f"attention={self.attention!r}; allowed: {list(attention.IMPLS)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; allowed: {list(REMAT_POLICIES)}")
    if self.qk_norm != "rms_norm_across_heads":
      raise ValueError(f"qk_norm={self.qk_norm!r}: only 'rms_norm_across_heads' is implemented")
    if (self.image_dim is None) != (self.added_kv_proj_dim is None):
      raise ValueError("image_dim and added_kv_proj_dim go together (image embedder + image "
                       f"k/v); got {self.image_dim} and {self.added_kv_proj_dim}")
    if self.out_channels is None:
      object.__setattr__(self, "out_channels", self.in_channels)

  @property
  def dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @classmethod
  def from_diffusers(cls, config: dict, **overrides) -> "WanConfig":
    """From a diffusers ``transformer/config.json`` dict; ``_``-keys are ignored."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_KEYS)
    if unknown:
      raise ValueError(f"unsupported WanTransformer3DModel config keys: {unknown}")
    return cls(**{k: v for k, v in config.items() if k in _DIFFUSERS_KEYS}, **overrides)

  def to_diffusers(self) -> dict:
    d = {k: getattr(self, k) for k in _DIFFUSERS_KEYS}
    return {"_class_name": "WanTransformer3DModel", **d, "patch_size": list(self.patch_size)}


# Wan2.2 T2V-A14B: each of the two experts (high-noise `transformer`, low-noise `transformer_2`).
WAN22_A14B = WanConfig()
# Wan2.2 I2V-A14B (diffusers' published config): no CLIP image embedder (image_dim and
# added_kv_proj_dim are None); the reference frame enters by channel concat: 16 noisy latent +
# 4 mask + 16 image-latent channels = 36 in, 16 out.
WAN22_I2V_A14B = WanConfig(in_channels=36)


def tiny(**overrides) -> WanConfig:
  """A 2-layer, 2 x 16-head model for tests."""
  kw = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
  return WanConfig(**{**kw, **overrides})


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(timestep, dim: int, max_period: float = 10_000.0, scale: float = 1.0,
                       torch_freqs: bool = False):
  """diffusers Timesteps(flip_sin_to_cos=True, shift=0): [cos(s w), sin(s w)], w_k = P^(-k/half).

  The frequencies are fp64-computed constants rounded to fp32 (they match torch's fp32 exp
  more often than XLA's exp, which matters: an ulp of w is 6e-5 in the phase at s = 1000).
  torch_freqs: round the exponent -log(P) k / half in fp32 as torch does before the
  (correctly rounded) exp: 126 of the 128 frequencies of a 256-channel embedding then equal
  torch's, against 43 for the fp64 constants (Qwen-Image; False keeps Wan's numbers).
  ``scale`` is Timesteps(scale=...): the phase is (s w) * scale in that order, as diffusers
  rounds it (Qwen-Image embeds sigma with scale 1000).
  """
  half = dim // 2
  if torch_freqs:
    expo = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(expo.astype(np.float64))
  else:
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)
  args = timestep.astype(F32)[:, None] * jnp.asarray(freqs, F32)[None]
  if scale != 1.0:
    args = scale * args
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


@functools.lru_cache(maxsize=64)
def _rope_1d(dim: int, n: int, theta: float = 10_000.0):
  """cos/sin [n, dim/2] of positions 0..n-1 (fp64 -> fp32, as diffusers)."""
  ang = np.outer(np.arange(n, dtype=np.float64), 1.0 / theta ** (np.arange(0, dim, 2) / dim))
  return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope_tables(head_dim: int, grid: tuple[int, int, int]):
  """3-D RoPE: the head's rotation pairs split (t, h, w) = (d - 4(d//6), 2(d//6), 2(d//6)) dims.

  Returns cos, sin: [F*H*W, head_dim/2] for the token order (f, h, w).
  """
  hw = 2 * (head_dim // 6)
  dims = (head_dim - 2 * hw, hw, hw)
  out = []
  for part in (0, 1):
    tabs = []
    for ax, (d, n) in enumerate(zip(dims, grid)):
      shape = [1, 1, 1, d // 2]
      shape[ax] = n
      tabs.append(jnp.broadcast_to(jnp.asarray(_rope_1d(d, n)[part]).reshape(shape),
                                   (*grid, d // 2)))
    out.append(jnp.concatenate(tabs, -1).reshape(-1, head_dim // 2))
  return tuple(out)


def apply_rope(x, cos, sin):
  """Rotate interleaved pairs (x_2i, x_2i+1) of x [B, S, N, D] by the angles of cos/sin [S, D/2]."""
  xf = x.astype(F32).reshape(*x.shape[:-1], -1, 2)
  x1, x2 = xf[..., 0], xf[..., 1]
  c, s = cos[None, :, None], sin[None, :, None]
  return jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------- layers


def _init(init, names):
  """Logical-axis metadata only (no eager sharding: logical names are not mesh axes)."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def _linear(din, dout, names, cfg, rngs, fp32=False):
  return nnx.Linear(din, dout, dtype=F32 if fp32 else cfg.dtype,
                    param_dtype=F32 if fp32 else cfg.param_dtype,
                    kernel_init=_init(nnx.initializers.lecun_normal(), names),
                    bias_init=_init(nnx.initializers.zeros_init(), names[1:]), rngs=rngs)


def _layer_norm(dim, eps, rngs, affine=False, name="embed"):
  """fp32 LayerNorm (two-pass variance, as torch)."""
  return nnx.LayerNorm(dim, epsilon=eps, dtype=F32, param_dtype=F32, use_scale=affine,
                       use_bias=affine, use_fast_variance=False,
                       scale_init=_init(nnx.initializers.ones_init(), (name,)),
                       bias_init=_init(nnx.initializers.zeros_init(), (name,)), rngs=rngs)


def _rms_norm(dim, cfg, rngs, name="heads"):
  """RMS norm over the last axis computed in fp32 (Wan: over all heads at once,
  qk_norm="rms_norm_across_heads"); ``name``: the logical axis of its weight."""
  return nnx.RMSNorm(dim, epsilon=cfg.eps, dtype=F32, param_dtype=cfg.param_dtype,
                     scale_init=_init(nnx.initializers.ones_init(), (name,)), rngs=rngs)


def _table(n, dim, rngs):
  """AdaLN scale/shift table [1, n, dim] (fp32; diffusers init randn / sqrt(dim))."""
  init = _init(nnx.initializers.normal(dim**-0.5), (None, None, "embed"))
  return nnx.Param(init(rngs.params(), (1, n, dim), F32))


_ACTS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nnx.Module):
  """linear_2(act(linear_1(x))): time embedder (SiLU), text embedder (GELU tanh)."""

  def __init__(self, din, dout, names, act: str, cfg, rngs, fp32=False):
    self.act = act
    self.linear_1 = _linear(din, dout, names[0], cfg, rngs, fp32)
    self.linear_2 = _linear(dout, dout, names[1], cfg, rngs, fp32)

  def __call__(self, x):
    return self.linear_2(_ACTS[self.act](self.linear_1(x)))


class ImageEmbedder(nnx.Module):
  """Wan2.1 I2V/FLF2V CLIP tokens -> model width: LN, GELU MLP, LN (LayerNorm eps 1e-5)."""

  def __init__(self, cfg: WanConfig, rngs):
    d_img = cfg.image_dim
    self.norm1 = _layer_norm(d_img, 1e-5, rngs, affine=True, name=None)
    self.fc1 = _linear(d_img, d_img, (None, None), cfg, rngs)
    self.fc2 = _linear(d_img, cfg.dim, (None, "embed"), cfg, rngs)
    self.norm2 = _layer_norm(cfg.dim, 1e-5, rngs, affine=True)
    self.pos_embed = None if cfg.pos_embed_seq_len is None else nnx.Param(
        jnp.zeros((1, cfg.pos_embed_seq_len, d_img), cfg.param_dtype),
        out_sharding=(None, None, None), eager_sharding=False)

  def __call__(self, img):
    if self.pos_embed is not None:  # FLF2V: two frames' tokens of one sample side by side
      img = img.reshape(-1, self.pos_embed.shape[1], img.shape[-1]) + self.pos_embed[...]
    h = self.norm1(img).astype(img.dtype)
    h = self.fc2(jax.nn.gelu(self.fc1(h), approximate=False))
    return self.norm2(h).astype(img.dtype)


class Attention(nnx.Module):
  """Multi-head attention with RMS-normalised q/k (+ RoPE, + a second image-token attention)."""

  def __init__(self, cfg: WanConfig, rngs, image_kv: bool = False):
    d, self.heads = cfg.dim, cfg.num_attention_heads
    self.to_q, self.to_k, self.to_v = (_linear(d, d, ("embed", "heads"), cfg, rngs)
                                       for _ in range(3))
    self.to_out = _linear(d, d, ("heads", "embed"), cfg, rngs)
    self.impl = cfg.attention
    self.norm_q, self.norm_k = _rms_norm(d, cfg, rngs), _rms_norm(d, cfg, rngs)
    if image_kv:
      self.add_k_proj = _linear(cfg.added_kv_proj_dim, d, (None, "heads"), cfg, rngs)
      self.add_v_proj = _linear(cfg.added_kv_proj_dim, d, (None, "heads"), cfg, rngs)
      self.norm_added_k = _rms_norm(d, cfg, rngs)

  def _heads(self, x):
    return x.reshape(*x.shape[:2], self.heads, -1)

  def __call__(self, x, ctx, rope=None, img=None):
    dt = x.dtype
    q = self._heads(self.norm_q(self.to_q(x)).astype(dt))
    k = self._heads(self.norm_k(self.to_k(ctx)).astype(dt))
    v = self._heads(self.to_v(ctx))
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = attention.attention(q, k, v, impl=self.impl)
    if img is not None:  # I2V: attend to image tokens separately, add
      ki = self._heads(self.norm_added_k(self.add_k_proj(img)).astype(dt))
      out = out + attention.attention(q, ki, self._heads(self.add_v_proj(img)), impl=self.impl)
    return self.to_out(out.reshape(*x.shape[:2], -1))


class FeedForward(nnx.Module):
  def __init__(self, cfg: WanConfig, rngs):
    self.fc1 = _linear(cfg.dim, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs)
    self.fc2 = _linear(cfg.ffn_dim, cfg.dim, ("mlp", "embed"), cfg, rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class Block(nnx.Module):
  """AdaLN-modulated self-attn -> (LN) cross-attn -> MLP, residual stream in config.dtype."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(cfg.dim, cfg.eps, rngs)
    self.attn1 = Attention(cfg, rngs)
    self.attn2 = Attention(cfg, rngs, image_kv=cfg.added_kv_proj_dim is not None)
    self.norm2 = _layer_norm(cfg.dim, cfg.eps, rngs, affine=True) if cfg.cross_attn_norm else None
    self.ffn = FeedForward(cfg, rngs)
    self.norm3 = _layer_norm(cfg.dim, cfg.eps, rngs)
    self.scale_shift_table = _table(6, cfg.dim, rngs)

  def __call__(self, h, ctx, img, e6, rope):
    h = sharding.shard_tokens(h)   # batch over (data, fsdp), tokens over context; see sharding.py
    dt = h.dtype
    mod = self.scale_shift_table[...] + e6.astype(F32)                     # [B, 6, D]
    shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(mod, 6, axis=1)
    x = (self.norm1(h.astype(F32)) * (1 + scale) + shift).astype(dt)
    h = (h.astype(F32) + self.attn1(x, x, rope) * gate).astype(dt)
    x = h if self.norm2 is None else self.norm2(h.astype(F32)).astype(dt)
    h = h + self.attn2(x, ctx, img=img)
    x = (self.norm3(h.astype(F32)) * (1 + c_scale) + c_shift).astype(dt)
    return sharding.shard_tokens((h.astype(F32) + self.ffn(x).astype(F32) * c_gate).astype(dt))


# ----------------------------------------------------------------------------- model


class WanTransformer(nnx.Module):
  """The Wan velocity field ``v = model(x, t, context, image_context=None)``.

  Args (of ``__call__``):
    x: [B, C_in, F, H, W] latents (diffusers layout); F, H, W divisible by the patch.
    t: [B] flow-matching time in [0, 1]; the model embeds the Wan timestep 1000 t.
    context: [B, L, text_dim] text-encoder states (umT5, L = 512 in Wan pipelines).
    image_context: optional [B, L_img, image_dim] CLIP tokens (Wan2.1 I2V/FLF2V configs only;
      Wan2.2 I2V-A14B conditions through the 36 input channels instead).

  Returns:
    [B, C_out, F, H, W] velocity in ``config.dtype``.
  """

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    cfg = self.config = config
    d, p = cfg.dim, math.prod(cfg.patch_size)
    # Conv3d with stride = kernel = patch is a Linear on (C, pt, ph, pw)-flattened patches.
    self.patch_embedding = _linear(cfg.in_channels * p, d, (None, "embed"), cfg, rngs)
    self.time_embedder = MLP(cfg.freq_dim, d, [(None, "embed"), (None, "embed")], "silu",
                             cfg, rngs, fp32=True)
    self.time_proj = _linear(d, 6 * d, ("embed", "mlp"), cfg, rngs)
    self.text_embedder = MLP(cfg.text_dim, d, [(None, "embed"), (None, "embed")],
                             "gelu_tanh", cfg, rngs)
    self.image_embedder = ImageEmbedder(cfg, rngs) if cfg.image_dim is not None else None
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(r):
        return Block(cfg, rngs=r)
      self.blocks = stacked(rngs)
    else:
      # Each block is built in its own (nested, cached) trace: flax 0.12's rng-count update
      # probes tracer.sharding, whose error message walks the whole enclosing jaxpr, so
      # tracing 40 blocks in one frame (eval_shape / jitted init) would be O(L^2).
      make = nnx.jit(lambda r: Block(cfg, rngs=r))
      self.blocks = nnx.List([make(rngs) for _ in range(cfg.num_layers)])
    self.norm_out = _layer_norm(d, cfg.eps, rngs)
    self.proj_out = _linear(d, cfg.out_channels * p, ("embed", None), cfg, rngs)
    self.scale_shift_table = _table(2, d, rngs)

  def _run_blocks(self, h, ctx, img, e6, rope):
    """Blocks as pure functions of their params: one lax.scan (stacked) or a loop, remat-able."""
    policy = REMAT_POLICIES[self.config.remat]

    def make(graphdef):
      def body(state, h, ctx, img, e6):   # LoRA kernels (lora.Deferred) merged per layer here
        return nnx.merge(graphdef, lora.materialize(state))(h, ctx, img, e6, rope)
      return body if self.config.remat == "none" else jax.checkpoint(body, policy=policy)

    if self.config.scan_layers:
      graphdef, state = nnx.split(self.blocks)
      body = make(graphdef)
      h, _ = jax.lax.scan(lambda h, s: (body(s, h, ctx, img, e6), None), h, state)
      return h
    for block in self.blocks:
      graphdef, state = nnx.split(block)
      h = make(graphdef)(state, h, ctx, img, e6)
    return h

  def __call__(self, x, t, context, image_context=None):
    cfg, dt = self.config, self.config.dtype
    x = sharding.shard_batch(x)
    b, c, nf, nh, nw = x.shape
    pt, ph, pw = cfg.patch_size
    if nf % pt or nh % ph or nw % pw:
      raise ValueError(f"(F, H, W)={(nf, nh, nw)} is not divisible by patch {cfg.patch_size}")
    f, h, w = nf // pt, nh // ph, nw // pw
    tokens = x.reshape(b, c, f, pt, h, ph, w, pw).transpose(0, 2, 4, 6, 1, 3, 5, 7)
    hs = self.patch_embedding(tokens.reshape(b, f * h * w, -1).astype(dt))

    # Wan's timestep is 1000 t; the time embedder runs in fp32, its output in dtype (diffusers).
    temb = self.time_embedder(timestep_embedding(1000.0 * t.astype(F32), cfg.freq_dim))
    temb = temb.astype(dt)
    e6 = self.time_proj(jax.nn.silu(temb)).reshape(b, 6, cfg.dim)
    ctx = self.text_embedder(context.astype(dt))
    img = None
    if image_context is not None:
      if self.image_embedder is None:
        raise ValueError("image_context given but the config has no image_dim")
      img = self.image_embedder(image_context.astype(dt))

    rope = rope_tables(cfg.attention_head_dim, (f, h, w))
    hs = self._run_blocks(hs, ctx, img, e6, rope)

    shift, scale = jnp.split(self.scale_shift_table[...] + temb[:, None].astype(F32), 2, axis=1)
    hs = self.proj_out((self.norm_out(hs.astype(F32)) * (1 + scale) + shift).astype(dt))
    out = hs.reshape(b, f, h, w, pt, ph, pw, -1).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return sharding.shard_batch(out.reshape(b, -1, nf, nh, nw))


# ----------------------------------------------------------------------------- abstract trees


def abstract_model(config: WanConfig) -> WanTransformer:
  return nnx.eval_shape(lambda: WanTransformer(config, rngs=nnx.Rngs(0)))


def abstract_params(config: WanConfig):
  """Pure-dict tree of ShapeDtypeStructs of the parameters (no allocation)."""
  return nnx.state(abstract_model(config), nnx.Param).to_pure_dict()


def param_specs(config: WanConfig):
  """Pure-dict tree of logical PartitionSpecs, e.g. P('layers', 'embed', 'heads')."""
  return nnx.get_partition_spec(nnx.state(abstract_model(config), nnx.Param)).to_pure_dict()


def param_count(config: WanConfig) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
