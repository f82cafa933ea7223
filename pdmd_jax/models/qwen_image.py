"""Qwen-Image transformer (Flax NNX), numerically equal to diffusers' QwenImageTransformer2DModel.

Velocity field v(x_t, sigma, text) of Qwen-Image (Qwen team 2025, arXiv 2508.02324), a 20B
double-stream MMDiT: the latent image is cut into 2x2 patches (64-channel tokens), the text is
Qwen2.5-VL's last hidden state (RMS-normalised, then projected), and 60 identical blocks keep
separate image and text weights that meet only in one joint attention per block:

  per stream s in {img, txt}:   (shift, scale, gate)_1,2 = s_mod(SiLU(temb))   (6 D, in order)
    x_s = LN(h_s) (1 + scale_1) + shift_1          (LN without parameters, eps 1e-6)
    q, k, v = [txt; img] (text first), per-head RMSNorm on q and k, MSRoPE on q and k,
    h_s += gate_1 * out_s(softmax(q k^T / sqrt(d)) v)        keys masked by the text mask
    h_s += gate_2 * MLP_s(LN(h_s) (1 + scale_2) + shift_2)   (GELU tanh, D -> 4D -> D)

then an AdaLN head (note: chunked (scale, shift), the opposite of the blocks) and a linear
projection of the image tokens back to 2x2 patches; the text stream is dropped.

MSRoPE ("multimodal scalable RoPE"): head_dim splits into (frame, height, width) parts
(16, 56, 56) of interleaved pairs, each rotated by position * theta^(-2k/d_axis) (theta 1e4).
Image tokens sit at frame 0 and centred rows/columns -(n - n//2) .. n//2 - 1; text token i sits
at max(h//2, w//2) + i on all three axes, i.e. on the diagonal just past the image.

Conventions:
- ``x`` is the unpacked latent [B, C, H, W] (C = 16 for Qwen-Image's VAE); the model packs
  2x2 patches into tokens with channel order (C, ph, pw), as the diffusers pipeline's
  ``_pack_latents``, and unpacks its output the same way. ``t`` is sigma in [0, 1]
  (x_t = (1 - t) x_0 + t eps); the embedding is the sinusoid of 1000 t (Timesteps(scale=1000),
  the pipeline passes sigma = timestep / 1000).
- ``context_mask`` [B, L] marks valid text tokens (any pattern; padded tokens are never
  attended to). Text RoPE positions are token indices in the padded sequence, as diffusers.
- diffusers keeps no module of this model in fp32 (no ``_keep_in_fp32_modules``), only the
  RoPE rotation and the norms' statistics; we also keep the norm outputs, the softmax
  statistics and the modulation/residual arithmetic in fp32 (cast back to ``config.dtype``
  after each); everything else runs in ``config.dtype`` with ``config.param_dtype`` params.
- Parameters carry logical axis names (``embed``, ``heads``, ``mlp``, ``layers``) and are named
  after diffusers' modules; ``diffusers_key`` / ``params_from_state_dict`` give the key map.

Deviations from diffusers (documented; none change the fp32 numbers of a Qwen-Image T2I run):
- in/out are unpacked latents (diffusers: packed tokens + ``img_shapes``); one image per sample,
  every sample the same size (diffusers uses the first sample's shape for the whole batch too).
- RoPE tables are computed for any grid and text length (diffusers precomputes 4096
  positions per sign and axis).
- reduced precision: the fp32 arithmetic listed above rounds less often than diffusers, which
  rounds every op to the compute dtype. As diffusers, sigma is rounded to the compute dtype
  before the embedding (bf16: 0.3 -> 0.30078, i.e. timestep 300.8; on the tiny test model that
  moves the output by 10% of its range, far more than any other bf16 rounding), and fp16
  activations are clipped to +-65504 after each block.
- not implemented (ValueError): ``zero_cond_t``, ``use_additional_t_cond``, ``use_layer3d_rope``
  (Qwen-Image-Edit-2511 / Layered), ``guidance_embeds`` (a dead branch in diffusers), ControlNet
  residuals.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from pdmd_jax import sharding
from pdmd_jax.models import attention
from pdmd_jax.models import lora
from pdmd_jax.models.wan import (REMAT_POLICIES, FeedForward, MLP, _layer_norm, _linear,
                                 _rms_norm, apply_rope, timestep_embedding)

F32 = jnp.float32
TIME_DIM = 256        # Timesteps(num_channels=256): fixed in diffusers, not a config key
_DIFFUSERS_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers",
                   "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                   "guidance_embeds", "axes_dims_rope", "zero_cond_t", "use_additional_t_cond",
                   "use_layer3d_rope")
_UNSUPPORTED = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


@dataclasses.dataclass(frozen=True)
class QwenImageConfig:
  """Architecture (diffusers config keys and defaults) + numerics/memory options."""
  patch_size: int = 2
  in_channels: int = 64                  # packed: latent channels * patch^2
  out_channels: int | None = 16          # latent channels of the output (None: in_channels)
  num_layers: int = 60
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 3584        # Qwen2.5-VL-7B hidden size
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
  zero_cond_t: bool = False
  use_additional_t_cond: bool = False
  use_layer3d_rope: bool = False
  dtype: Any = "float32"                 # compute dtype, e.g. "bfloat16"
  param_dtype: Any = "float32"
  scan_layers: bool = False              # stack blocks on a leading "layers" axis + lax.scan
  remat: str = "none"                    # "none" | "full" | "dots" (save weight matmuls)
  attention: str = "dense"               # models/attention.py: dense | blockwise | auto | ...

  def __post_init__(self):
    object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    if self.out_channels is None:
      object.__setattr__(self, "out_channels", self.in_channels)
    if self.attention not in attention.IMPLS:
      raise ValueError(f"attention={self.attention!r}; allowed: {list(attention.IMPLS)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; allowed: {list(REMAT_POLICIES)}")
    on = [k for k in _UNSUPPORTED if getattr(self, k)]
    if on:
      raise ValueError(f"{on}: Qwen-Image Edit/Layered/guidance variants are not implemented")
    if self.in_channels % self.patch_size**2:
      raise ValueError(f"in_channels={self.in_channels} is not latent channels x patch_size^2 "
                       f"(patch_size={self.patch_size})")
    if sum(self.axes_dims_rope) != self.attention_head_dim or any(
        a % 2 for a in self.axes_dims_rope):
      raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must be even and sum to "
                       f"attention_head_dim={self.attention_head_dim}")

  @property
  def dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def ffn_dim(self) -> int:              # FeedForward(mult=4)
    return 4 * self.dim

  @property
  def eps(self) -> float:                # every LayerNorm and RMSNorm of the model
    return 1e-6

  @property
  def latent_channels(self) -> int:
    return self.in_channels // self.patch_size**2

  @classmethod
  def from_diffusers(cls, config: dict, **overrides) -> "QwenImageConfig":
    """From a diffusers ``transformer/config.json`` dict; ``_``-keys are ignored."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_KEYS)
    if unknown:
      raise ValueError(f"unsupported QwenImageTransformer2DModel config keys: {unknown}")
    return cls(**{k: v for k, v in config.items() if k in _DIFFUSERS_KEYS}, **overrides)

  def to_diffusers(self) -> dict:
    d = {k: getattr(self, k) for k in _DIFFUSERS_KEYS}
    return {"_class_name": "QwenImageTransformer2DModel", **d,
            "axes_dims_rope": list(self.axes_dims_rope)}


# Qwen-Image (20B, T2I), diffusers' published transformer/config.json.
QWEN_IMAGE_20B = QwenImageConfig()


def tiny(**overrides) -> QwenImageConfig:
  """A 2-layer, 2 x 16-head model (4 latent channels, 24-wide text) for tests."""
  kw = dict(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
  return QwenImageConfig(**{**kw, **overrides})


# ----------------------------------------------------------------------------- MSRoPE


def _rope_angles(dim: int, pos: np.ndarray, theta: float = 10_000.0) -> np.ndarray:
  """[n, dim/2] fp32 angles pos * theta^(-2k/dim), each step rounded to fp32 as diffusers'
  ``rope_params`` (fp32, unlike Wan's fp64 tables: a rounding of the angle is ~6e-5 at 1000)."""
  expo = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  inv = (1.0 / np.power(theta, expo.astype(np.float64)).astype(np.float32)).astype(np.float32)
  return (pos.astype(np.float64)[:, None] * inv.astype(np.float64)[None]).astype(np.float32)


@functools.lru_cache(maxsize=64)
def msrope_tables(axes_dims: tuple[int, int, int], grid: tuple[int, int], text_len: int):
  """cos, sin [text_len + h*w, head_dim/2] (numpy fp32) for the joint sequence [text, image].

  Image token (r, c) of the h x w grid: (frame, row, col) = (0, r - (h - h//2), c - (w - w//2));
  text token i: max(h//2, w//2) + i on all three axes.
  """
  h, w = grid
  txt = max(h // 2, w // 2) + np.arange(text_len)
  rows, cols = np.arange(h) - (h - h // 2), np.arange(w) - (w - w // 2)
  img = (np.zeros(h * w, np.int64), np.repeat(rows, w), np.tile(cols, h))
  ang = np.concatenate([_rope_angles(d, np.concatenate([txt, p]))
                        for d, p in zip(axes_dims, img)], axis=-1).astype(np.float64)
  return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


# ----------------------------------------------------------------------------- layers


class TimestepProjEmbeddings(nnx.Module):
  """time_text_embed: sinusoid of 1000 sigma (256 channels) -> linear_1, SiLU, linear_2."""

  def __init__(self, cfg: QwenImageConfig, rngs):
    self.timestep_embedder = MLP(TIME_DIM, cfg.dim, [(None, "embed"), (None, "embed")], "silu",
                                 cfg, rngs)

  def __call__(self, t, dtype):
    emb = timestep_embedding(t, TIME_DIM, scale=1000.0, torch_freqs=True)
    return self.timestep_embedder(emb.astype(dtype))


class JointAttention(nnx.Module):
  """One attention over [text, image] tokens with per-stream q/k/v/out weights."""

  def __init__(self, cfg: QwenImageConfig, rngs):
    d, hd = cfg.dim, cfg.attention_head_dim
    self.heads, self.impl = cfg.num_attention_heads, cfg.attention
    proj = lambda: _linear(d, d, ("embed", "heads"), cfg, rngs)  # noqa: E731
    self.to_q, self.to_k, self.to_v = proj(), proj(), proj()                   # image stream
    self.add_q_proj, self.add_k_proj, self.add_v_proj = proj(), proj(), proj()  # text stream
    self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (
        _rms_norm(hd, cfg, rngs, name=None) for _ in range(4))               # per head, [hd]
    self.to_out = _linear(d, d, ("heads", "embed"), cfg, rngs)
    self.to_add_out = _linear(d, d, ("heads", "embed"), cfg, rngs)

  def _heads(self, x):
    return x.reshape(*x.shape[:2], self.heads, -1)

  def __call__(self, x, y, key_mask, rope):
    """x: image [B, N, D], y: text [B, L, D] -> (image out [B, N, D], text out [B, L, D])."""
    dt, n_txt = x.dtype, y.shape[1]
    qk = lambda norm, lin, z: norm(self._heads(lin(z))).astype(dt)  # noqa: E731
    q = jnp.concatenate([qk(self.norm_added_q, self.add_q_proj, y),
                         qk(self.norm_q, self.to_q, x)], axis=1)
    k = jnp.concatenate([qk(self.norm_added_k, self.add_k_proj, y),
                         qk(self.norm_k, self.to_k, x)], axis=1)
    v = jnp.concatenate([self._heads(self.add_v_proj(y)), self._heads(self.to_v(x))], axis=1)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = attention.attention(q, k, v, impl=self.impl, key_mask=key_mask)
    out = out.reshape(*out.shape[:2], -1)
    return self.to_out(out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


def _modulate(norm, h, shift, scale):
  return (norm(h.astype(F32)) * (1 + scale) + shift).astype(h.dtype)


def _residual(h, gate, out):
  return (h.astype(F32) + gate * out.astype(F32)).astype(h.dtype)


class Block(nnx.Module):
  """Double-stream block: per-stream AdaLN (6 vectors each), joint attention, per-stream MLP."""

  def __init__(self, cfg: QwenImageConfig, *, rngs: nnx.Rngs):
    self.img_mod = _linear(cfg.dim, 6 * cfg.dim, ("embed", "mlp"), cfg, rngs)
    self.txt_mod = _linear(cfg.dim, 6 * cfg.dim, ("embed", "mlp"), cfg, rngs)
    self.norm = _layer_norm(cfg.dim, cfg.eps, rngs)   # diffusers' 4 parameter-free LayerNorms
    self.attn = JointAttention(cfg, rngs)
    self.img_mlp = FeedForward(cfg, rngs)
    self.txt_mlp = FeedForward(cfg, rngs)

  def __call__(self, h, c, temb, key_mask, rope):
    """h: image [B, N, D], c: text [B, L, D], temb [B, D] -> (h, c)."""
    h, c = sharding.shard_tokens(h), sharding.shard_tokens(c)
    e = jax.nn.silu(temb)
    # (shift, scale, gate) for the attention half, then for the MLP half; each [B, 1, D].
    im = jnp.split(self.img_mod(e).astype(F32)[:, None], 6, axis=-1)
    tm = jnp.split(self.txt_mod(e).astype(F32)[:, None], 6, axis=-1)
    a_img, a_txt = self.attn(_modulate(self.norm, h, im[0], im[1]),
                             _modulate(self.norm, c, tm[0], tm[1]), key_mask, rope)
    h, c = _residual(h, im[2], a_img), _residual(c, tm[2], a_txt)
    h = _residual(h, im[5], self.img_mlp(_modulate(self.norm, h, im[3], im[4])))
    c = _residual(c, tm[5], self.txt_mlp(_modulate(self.norm, c, tm[3], tm[4])))
    if h.dtype == jnp.float16:   # diffusers' overflow guard (inf -> 65504)
      h, c = jnp.clip(h, -65504, 65504), jnp.clip(c, -65504, 65504)
    return sharding.shard_tokens(h), sharding.shard_tokens(c)


class NormOut(nnx.Module):
  """AdaLayerNormContinuous: LN(x) (1 + scale) + shift with (scale, shift) = linear(SiLU(temb))."""

  def __init__(self, cfg: QwenImageConfig, rngs):
    self.linear = _linear(cfg.dim, 2 * cfg.dim, ("embed", "mlp"), cfg, rngs)
    self.norm = _layer_norm(cfg.dim, cfg.eps, rngs)

  def __call__(self, h, temb):
    scale, shift = jnp.split(self.linear(jax.nn.silu(temb)).astype(F32)[:, None], 2, axis=-1)
    return _modulate(self.norm, h, shift, scale)


# ----------------------------------------------------------------------------- model


class QwenImageTransformer(nnx.Module):
  """The Qwen-Image velocity field ``v = model(x, t, context, context_mask=None)``.

  Args (of ``__call__``):
    x: [B, C, H, W] latents (C = in_channels / patch^2); H, W divisible by the patch.
    t: [B] sigma in [0, 1]; the model embeds 1000 t.
    context: [B, L, joint_attention_dim] text-encoder states (Qwen2.5-VL, last hidden layer).
    context_mask: optional [B, L] bool (or 0/1), True at valid text tokens; None: all valid.

  Returns:
    [B, out_channels, H, W] velocity in ``config.dtype``.
  """

  def __init__(self, config: QwenImageConfig, *, rngs: nnx.Rngs):
    cfg = self.config = config
    d = cfg.dim
    self.img_in = _linear(cfg.in_channels, d, (None, "embed"), cfg, rngs)
    self.txt_norm = _rms_norm(cfg.joint_attention_dim, cfg, rngs, name=None)
    self.txt_in = _linear(cfg.joint_attention_dim, d, (None, "embed"), cfg, rngs)
    self.time_text_embed = TimestepProjEmbeddings(cfg, rngs)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(r):
        return Block(cfg, rngs=r)
      self.transformer_blocks = stacked(rngs)
    else:
      # One nested (cached) trace per block: see WanTransformer (O(L^2) tracing otherwise).
      make = nnx.jit(lambda r: Block(cfg, rngs=r))
      self.transformer_blocks = nnx.List([make(rngs) for _ in range(cfg.num_layers)])
    self.norm_out = NormOut(cfg, rngs)
    self.proj_out = _linear(d, cfg.patch_size**2 * cfg.out_channels, ("embed", None), cfg, rngs)

  def _run_blocks(self, h, c, temb, key_mask, rope):
    """Blocks as pure functions of their params: one lax.scan (stacked) or a loop, remat-able."""
    policy = REMAT_POLICIES[self.config.remat]

    def make(graphdef):
      def body(state, hc, temb, key_mask):   # LoRA kernels (lora.Deferred) merged per layer
        return nnx.merge(graphdef, lora.materialize(state))(*hc, temb, key_mask, rope)
      return body if self.config.remat == "none" else jax.checkpoint(body, policy=policy)

    if self.config.scan_layers:
      graphdef, state = nnx.split(self.transformer_blocks)
      body = make(graphdef)
      (h, c), _ = jax.lax.scan(lambda hc, s: (body(s, hc, temb, key_mask), None), (h, c), state)
      return h
    for block in self.transformer_blocks:
      graphdef, state = nnx.split(block)
      h, c = make(graphdef)(state, (h, c), temb, key_mask)
    return h

  def __call__(self, x, t, context, context_mask=None):
    cfg, dt, p = self.config, self.config.dtype, self.config.patch_size
    x = sharding.shard_batch(x)
    b, ch, nh, nw = x.shape
    if ch != cfg.latent_channels:
      raise ValueError(f"x has {ch} channels; the config packs {cfg.latent_channels} "
                       f"(in_channels={cfg.in_channels} / patch_size^2)")
    if nh % p or nw % p:
      raise ValueError(f"(H, W)={(nh, nw)} is not divisible by patch {p}")
    gh, gw = nh // p, nw // p
    # diffusers' _pack_latents: token (row, col), channels (C, ph, pw).
    tokens = x.reshape(b, ch, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
    h = self.img_in(tokens.reshape(b, gh * gw, -1).astype(dt))
    # diffusers rounds sigma to the compute dtype before embedding it (timestep.to(dtype)).
    temb = self.time_text_embed(t.astype(dt), dt)
    c = self.txt_in(self.txt_norm(context).astype(dt))

    key_mask = None
    if context_mask is not None:
      key_mask = jnp.concatenate([context_mask.astype(bool), jnp.ones((b, gh * gw), bool)], 1)
    rope = tuple(jnp.asarray(a) for a in msrope_tables(cfg.axes_dims_rope, (gh, gw),
                                                       context.shape[1]))
    h = self._run_blocks(h, c, temb, key_mask, rope)

    out = self.proj_out(self.norm_out(h, temb))
    # diffusers' _unpack_latents: channels (C, ph, pw) back onto the grid.
    out = out.reshape(b, gh, gw, -1, p, p).transpose(0, 3, 1, 4, 2, 5)
    return sharding.shard_batch(out.reshape(b, -1, nh, nw))


# ----------------------------------------------------------------------------- parameter trees


def abstract_model(config: QwenImageConfig) -> QwenImageTransformer:
  return nnx.eval_shape(lambda: QwenImageTransformer(config, rngs=nnx.Rngs(0)))


def abstract_params(config: QwenImageConfig):
  """Pure-dict tree of ShapeDtypeStructs of the parameters (no allocation)."""
  return nnx.state(abstract_model(config), nnx.Param).to_pure_dict()


def param_specs(config: QwenImageConfig):
  """Pure-dict tree of logical PartitionSpecs, e.g. P('layers', 'embed', 'heads')."""
  return nnx.get_partition_spec(nnx.state(abstract_model(config), nnx.Param)).to_pure_dict()


def param_count(config: QwenImageConfig) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))


# Our module names -> diffusers' (applied in order to the '.'-joined unstacked param path).
_RENAMES = (
    (r"\.(img_mod|txt_mod)\.", r".\1.1."),                 # Sequential(SiLU, Linear)
    (r"\.(img_mlp|txt_mlp)\.fc1\.", r".\1.net.0.proj."),   # FeedForward: GELU(proj), -, Linear
    (r"\.(img_mlp|txt_mlp)\.fc2\.", r".\1.net.2."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.(kernel|scale)$", ".weight"),
)


def diffusers_key(path) -> str:
  """Our unstacked leaf path, e.g. ('transformer_blocks', 0, 'img_mlp', 'fc1', 'kernel') ->
  'transformer_blocks.0.img_mlp.net.0.proj.weight'."""
  key = ".".join(str(k) for k in path)
  for pattern, repl in _RENAMES:
    key = re.sub(pattern, repl, key)
  return key


def params_from_state_dict(state_dict: Mapping[str, Any], config: QwenImageConfig):
  """Our params (pure dict) from a diffusers state dict {key: array-like} (torch [out, in]
  Linear weights are transposed to [in, out] kernels; cast to the leaf's dtype; blocks stacked
  on a leading axis if ``config.scan_layers``). Every missing, unexpected or mis-shaped key is
  listed in one ValueError."""
  flat = traverse_util.flatten_dict(abstract_params(dataclasses.replace(config,
                                                                        scan_layers=False)))
  expected = {diffusers_key(path): (path, leaf) for path, leaf in flat.items()}
  errors = []
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  if missing:
    errors.append(f"missing keys {missing}")
  if unexpected:
    errors.append(f"unexpected keys {unexpected}")
  out = {}
  for key, (path, leaf) in expected.items():
    if key not in state_dict:
      continue
    v = np.asarray(state_dict[key])
    want = tuple(leaf.shape[::-1])   # Linear [out, in]; 1-D leaves unchanged
    if v.shape != want:
      errors.append(f"{key}: checkpoint shape {v.shape} != expected shape {want}")
      continue
    out[path] = jnp.asarray(v.T, leaf.dtype)
  if errors:
    raise ValueError("Qwen-Image state dict does not match the config: " + "; ".join(errors))
  params = traverse_util.unflatten_dict(out)
  if config.scan_layers:
    blocks = params["transformer_blocks"]
    params["transformer_blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                                *[blocks[i] for i in range(config.num_layers)])
  return params
