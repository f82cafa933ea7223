"""Diffusion Transformer (DiT, Peebles & Xie 2023) for images and videos, in Flax NNX.

psi(x_t, t, y) -> velocity, with x_t [B, H, W, C] (images) or [B, F, H, W, C] (videos):
patchify (space-time patches of ``patch`` x ``patch`` pixels and ``temporal_patch`` frames) ->
+ fixed sin-cos positional encoding (2-D or 3-D) -> ``depth`` adaLN-Zero blocks conditioned on
c = emb(1000 t) + emb(y) -> adaLN final layer -> unpatchify. y == num_classes is the null
label of classifier-free guidance. Every parameter carries logical axis names (embed, heads,
mlp, vocab, layers) for the sharding rules. ``scan_layers`` stacks the blocks on a leading
"layers" axis and runs them with ``nnx.scan``; ``remat`` recomputes block activations in the
backward pass.
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdmd_jax import noise
from pdmd_jax import sharding
from pdmd_jax.models import attention
from pdmd_jax.models.mlp import timestep_embedding


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Architecture of a DiT; ``frames`` > 1 makes it a video DiT (one model family)."""
  image_size: int = 32
  channels: int = 1
  patch: int = 4
  frames: int = 1
  temporal_patch: int = 1
  hidden: int = 128
  depth: int = 6
  heads: int = 4
  mlp_ratio: int = 4
  num_classes: int = 10
  time_dim: int = 256            # width of the sinusoidal embedding of 1000 t
  scan_layers: bool = False
  remat: bool = False
  dtype: str = "float32"         # compute dtype; parameters stay float32
  attention: str = "dense"       # models/attention.py: dense | blockwise (no [L, L] logits)
  # Video token mixing: "joint" (one attention over all frames' tokens) or "divided" (attention
  # within each frame, then a temporal attention across frames at each position; the temporal
  # branch's output projection starts at zero, so an inflated image DiT is exactly the image
  # model frame by frame on any clip).
  layout: str = "joint"
  # With layout="divided": the last ``joint_blocks`` blocks add a third branch, one attention over
  # every frame's tokens (output projection zero at init), so a token can find its content in
  # frames where it has moved by several patches; a trained divided DiT extends exactly (``extend``).
  joint_blocks: int = 0
  # With layout="divided": the temporal branch gets its own adaLN modulation from the conditioning
  # (t, class): shift and scale of its input, (1 + gate) on its output, all zero at init, so the
  # cross-frame mixing can change with the noise level and a trained DiT extends exactly.
  temporal_ada: bool = False
  # The prior the network is trained under: noise correlated across frames with this coefficient
  # (``pdmd_jax/noise.py``, PYoCo's mixed noise); 0: i.i.d. frames. Not an architecture field:
  # it rides here so that the teacher's card carries it to sampling and distillation.
  noise_frame_corr: float = 0.0
  # Width of the fixed sin-cos position encoding, repeated to ``hidden`` (0: hidden). A DiT
  # widened k-fold from a trained one (``widen``) keeps the trained one's encoding, repeated.
  pos_dim: int = 0

  @property
  def video(self) -> bool:
    return self.frames > 1

  @property
  def grid(self) -> tuple[int, ...]:
    s = self.image_size // self.patch
    return ((self.frames // self.temporal_patch,) if self.video else ()) + (s, s)

  @property
  def sample_shape(self) -> tuple[int, ...]:
    s = (self.image_size, self.image_size, self.channels)
    return ((self.frames,) + s) if self.video else s


LAYOUTS = ("joint", "divided")

VARIANTS = {
    # name: (hidden, depth, heads)
    "tiny": (32, 2, 2),
    "small": (128, 4, 4),
    "base": (256, 8, 8),
}


def config_for(variant: str, **overrides) -> DiTConfig:
  """DiTConfig of a named size (tiny for tests, small for the shipped MNIST teacher)."""
  if variant not in VARIANTS:
    raise ValueError(f"model.variant={variant!r} is unknown; allowed: {sorted(VARIANTS)}")
  hidden, depth, heads = VARIANTS[variant]
  return DiTConfig(**{"hidden": hidden, "depth": depth, "heads": heads, **overrides})


def sincos_pos_embed(grid: tuple[int, ...], dim: int) -> np.ndarray:
  """Fixed sin-cos encoding over an n-D token grid: [prod(grid), dim].

  Each axis gets an equal, even share of the channels (the last axis takes the remainder);
  2-D is DiT's/MAE's encoding, 3-D its space-time extension.
  """
  n = len(grid)
  share = (dim // n) // 2 * 2
  sizes = [share] * (n - 1) + [dim - share * (n - 1)]
  coords = np.stack(np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij"), -1)
  coords = coords.reshape(-1, n)
  parts = []
  for axis, d in enumerate(sizes):
    omega = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
    out = coords[:, axis:axis + 1] * omega[None]
    parts += [np.sin(out), np.cos(out)]
  return np.concatenate(parts, -1).astype(np.float32)


def logical(init, axes):
  """Annotates an initializer with logical axis names (sharding is applied by jit, not here)."""
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def _dense(din, dout, axes, rngs, zero=False):
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
  return nnx.Linear(din, dout, rngs=rngs, kernel_init=logical(init, axes),
                    bias_init=logical(nnx.initializers.zeros_init(), (axes[1],)))


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class Block(nnx.Module):
  """adaLN-Zero block: gated self-attention and MLP, both modulated by the conditioning c."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, joint: bool = False):
    d = cfg.hidden
    self.heads = cfg.heads
    self.impl = cfg.attention
    self.dtype = jnp.dtype(cfg.dtype)
    self.norm1 = nnx.LayerNorm(d, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
    self.qkv = _dense(d, 3 * d, ("embed", "heads"), rngs)
    self.proj = _dense(d, d, ("heads", "embed"), rngs)
    self.norm2 = nnx.LayerNorm(d, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
    self.fc1 = _dense(d, cfg.mlp_ratio * d, ("embed", "mlp"), rngs)
    self.fc2 = _dense(cfg.mlp_ratio * d, d, ("mlp", "embed"), rngs)
    self.ada = _dense(d, 6 * d, ("embed", "mlp"), rngs, zero=True)   # adaLN-Zero: gates start at 0
    # divided layout: frames in the token axis, and the temporal branch (zero output at init)
    self.frames = cfg.grid[0] if cfg.video and cfg.layout == "divided" else 0
    if self.frames:
      self.norm_t = nnx.LayerNorm(d, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
      self.qkv_t = _dense(d, 3 * d, ("embed", "heads"), rngs)
      self.proj_t = _dense(d, d, ("heads", "embed"), rngs, zero=True)
      if cfg.temporal_ada:
        self.ada_t = _dense(d, 3 * d, ("embed", "mlp"), rngs, zero=True)
    self.temporal_ada = bool(self.frames and cfg.temporal_ada)
    self.joint = bool(self.frames and joint)
    if self.joint:       # space-time branch over all frames' tokens (zero output at init)
      self.norm_j = nnx.LayerNorm(d, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
      self.qkv_j = _dense(d, 3 * d, ("embed", "heads"), rngs)
      self.proj_j = _dense(d, d, ("heads", "embed"), rngs, zero=True)

  def _attend(self, qkv, group):
    """Multi-head attention of [B, N, 3 D] projections within ``group`` (einops pattern of the
    token axis: "(f n)" for a frame's tokens, "(n f)"-style for a position's frames)."""
    pattern, axes = group
    f = {"f": self.frames} if "f" in pattern else {}
    q, k, v = einops.rearrange(qkv, f"b {pattern} (three h d) -> three {axes} h d", three=3,
                               h=self.heads, **f)
    a = attention.attention(q, k, v, impl=self.impl)
    return einops.rearrange(a, f"{axes} h d -> b {pattern} (h d)", b=qkv.shape[0], **f)

  def __call__(self, h, c):
    h = sharding.shard_tokens(h)   # batch over (data, fsdp), tokens over context; see sharding.py
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(jax.nn.silu(c)), 6, -1)
    x = modulate(self.norm1(h), shift1, scale1).astype(self.dtype)
    if self.frames:     # divided: attention within each frame, then across frames per position
      a = self._attend(self.qkv(x), ("(f n)", "(b f) n"))
      h = h + gate1[:, None] * self.proj(a).astype(h.dtype)
      x = self.norm_t(h)
      if self.temporal_ada:
        shift_t, scale_t, gate_t = jnp.split(self.ada_t(jax.nn.silu(c)), 3, -1)
        x = modulate(x, shift_t, scale_t)
      a = self._attend(self.qkv_t(x.astype(self.dtype)), ("(f n)", "(b n) f"))
      a = self.proj_t(a).astype(h.dtype)
      h = h + (a * (1 + gate_t[:, None]) if self.temporal_ada else a)
      if self.joint:
        a = self._attend(self.qkv_j(self.norm_j(h).astype(self.dtype)), ("n", "b n"))
        h = h + self.proj_j(a).astype(h.dtype)
    else:
      a = self._attend(self.qkv(x), ("n", "b n"))
      h = h + gate1[:, None] * self.proj(a).astype(h.dtype)
    x = modulate(self.norm2(h), shift2, scale2).astype(self.dtype)
    x = self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))
    return sharding.shard_tokens(h + gate2[:, None] * x.astype(h.dtype))


class DiT(nnx.Module):
  """psi: (x [B, *sample_shape], t [B] in [0, 1], y [B] int in [0, num_classes]) -> velocity."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    if cfg.image_size % cfg.patch or cfg.frames % cfg.temporal_patch:
      raise ValueError(f"model.patch={cfg.patch} must divide image_size={cfg.image_size} and "
                       f"temporal_patch={cfg.temporal_patch} must divide frames={cfg.frames}")
    if cfg.hidden % cfg.heads:
      raise ValueError(f"model.heads={cfg.heads} must divide model.hidden={cfg.hidden}")
    if cfg.pos_dim < 0 or (cfg.pos_dim and cfg.hidden % cfg.pos_dim):
      raise ValueError(f"model.pos_dim={cfg.pos_dim} must be 0 (= hidden) or divide "
                       f"model.hidden={cfg.hidden}")
    if cfg.layout not in LAYOUTS:
      raise ValueError(f"model.layout={cfg.layout!r} is unknown; allowed: {list(LAYOUTS)}")
    if cfg.joint_blocks and not (cfg.video and cfg.layout == "divided"
                                 and 0 < cfg.joint_blocks <= cfg.depth and not cfg.scan_layers):
      raise ValueError(f"model.joint_blocks={cfg.joint_blocks} needs a video DiT with "
                       f"layout='divided' (got {cfg.layout!r}), unscanned blocks and a count in "
                       f"[0, depth={cfg.depth}]")
    if cfg.temporal_ada and not (cfg.video and cfg.layout == "divided"):
      raise ValueError(f"model.temporal_ada=True needs a video DiT with layout='divided' (got "
                       f"frames={cfg.frames}, layout={cfg.layout!r})")
    noise.check(cfg.noise_frame_corr, cfg.frames)
    self.cfg = cfg
    d = cfg.hidden
    self.patch_dim = cfg.patch**2 * cfg.channels * (cfg.temporal_patch if cfg.video else 1)
    self.embed = _dense(self.patch_dim, d, (None, "embed"), rngs)
    self.t1 = _dense(cfg.time_dim, d, (None, "embed"), rngs)
    self.t2 = _dense(d, d, (None, "embed"), rngs)
    self.y_embed = nnx.Embed(cfg.num_classes + 1, d, rngs=rngs, embedding_init=logical(
        nnx.initializers.normal(0.02), ("vocab", "embed")))
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.depth)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make(r):
        return Block(cfg, rngs=r)
      self.blocks = make(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs, joint=i >= cfg.depth - cfg.joint_blocks)
                              for i in range(cfg.depth)])
    if cfg.video:   # learned per-frame encoding, zero at init (see ``pos_embed`` and ``inflate``)
      self.frame_pos = nnx.Param(logical(nnx.initializers.zeros_init(), (None, "embed"))(
          rngs.params(), (cfg.grid[0], d)))
    self.norm_out = nnx.LayerNorm(d, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
    self.ada_out = _dense(d, 2 * d, ("embed", "mlp"), rngs, zero=True)
    self.out = _dense(d, self.patch_dim, ("embed", None), rngs, zero=True)

  def _patchify(self, x):
    c = self.cfg
    if c.video:
      return einops.rearrange(x, "b (f q) (h p) (w r) c -> b (f h w) (q p r c)",
                              q=c.temporal_patch, p=c.patch, r=c.patch)
    return einops.rearrange(x, "b (h p) (w r) c -> b (h w) (p r c)", p=c.patch, r=c.patch)

  def _unpatchify(self, x):
    c = self.cfg
    g = c.grid
    if c.video:
      return einops.rearrange(x, "b (f h w) (q p r c) -> b (f q) (h p) (w r) c", f=g[0], h=g[1],
                              w=g[2], q=c.temporal_patch, p=c.patch, r=c.patch, c=c.channels)
    return einops.rearrange(x, "b (h w) (p r c) -> b (h p) (w r) c", h=g[0], w=g[1], p=c.patch,
                            r=c.patch, c=c.channels)

  def pos_embed(self):
    """[tokens, hidden] position encoding: the image DiT's 2-D sin-cos on every frame, plus (video)
    a learned per-frame vector. Factorised so that an image DiT inflates into a video DiT that
    computes the same function on static clips (``inflate``); the learned frame term, zero at
    init, gives the model the frame order."""
    cfg = self.cfg
    pd = cfg.pos_dim or cfg.hidden
    pos = jnp.asarray(np.tile(sincos_pos_embed(cfg.grid[-2:], pd), (1, cfg.hidden // pd)))
    if not cfg.video:
      return pos
    return (self.frame_pos[...][:, None, :] + pos[None]).reshape(-1, cfg.hidden)

  def __call__(self, x, t, y, features_at: int | None = None):
    """The velocity; with ``features_at`` = i also the tokens after block i (0: the embedded
    patches), on their grid [B, *grid, hidden] (the GAN head's input; unscanned blocks only)."""
    cfg = self.cfg
    x = sharding.shard_batch(x)
    c = self.t2(jax.nn.silu(self.t1(timestep_embedding(t, cfg.time_dim)))) + self.y_embed(y)
    h = self.embed(self._patchify(x.astype(jnp.float32))) + self.pos_embed()[None]
    block_fn = (lambda blk, h, c: blk(h, c))
    if cfg.remat:
      block_fn = nnx.remat(block_fn)
    feats = h
    if cfg.scan_layers:
      if features_at is not None:
        raise ValueError("DiT features_at needs unscanned blocks (model.scan_layers=False)")

      @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
      def run(blk, h, c):
        return block_fn(blk, h, c)
      h = run(self.blocks, h, c)
    else:
      for i, blk in enumerate(self.blocks):
        h = block_fn(blk, h, c)
        feats = h if i + 1 == features_at else feats
    shift, scale = jnp.split(self.ada_out(jax.nn.silu(c)), 2, -1)
    out = self.out(modulate(self.norm_out(h), shift, scale))
    v = sharding.shard_batch(self._unpatchify(out).astype(x.dtype))
    if features_at is None:
      return v
    return v, feats.reshape((feats.shape[0],) + cfg.grid + (cfg.hidden,))


def inflate(image_params, cfg: DiTConfig, video_params):
  """Video DiT parameters initialised from an image DiT's (image-to-video inflation).

  Every block, embedding and head weight is copied; the patch embedding of a ``q``-frame
  space-time patch is the image kernel divided by q on each frame (it sees the frames' mean)
  and the output head repeats the image prediction on each of the q frames; the per-frame
  position term stays zero. On a static clip (the same noisy frame repeated) the inflated
  model equals the image model frame by frame: attention over repeated keys is unchanged by the
  repetition. With ``layout="divided"`` it does on any clip: the spatial attention sees one
  frame and the temporal branch's output projection is zero. ``video_params`` supplies the tree
  (e.g. a fresh ``build_dit(cfg)``).
  """
  q = cfg.temporal_patch
  flat_img = dict(jax.tree_util.tree_flatten_with_path(image_params)[0])
  leaves, treedef = jax.tree_util.tree_flatten_with_path(video_params)
  out = []
  for path, v in leaves:
    name = jax.tree_util.keystr(path)
    if any(k in name for k in ("frame_pos", "['proj_t']", "['ada_t']")):
      out.append(jnp.zeros_like(v))
      continue
    if "['qkv_t']" in name:      # the temporal branch is new: its own init (its output is zero)
      out.append(v)
      continue
    if path not in flat_img:
      raise ValueError(f"inflate: the image DiT has no parameter {name}")
    w = jnp.asarray(flat_img[path])
    if "['embed']['kernel']" in name:
      w = jnp.concatenate([w / q] * q, axis=0)
    elif "['out']" in name:
      w = jnp.concatenate([w] * q, axis=-1)
    if w.shape != v.shape:
      raise ValueError(f"inflate: {name} has shape {w.shape} in the image DiT, {v.shape} in the "
                       "video DiT (hidden, depth, heads, patch and image_size must match)")
    out.append(w.astype(v.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def extend(params, cfg: DiTConfig, new_params):
  """A video DiT's parameters initialised from a trained one, plus new parts that start as the
  identity: new space-time branches (``joint_blocks``; their output projections are zero), a
  new modulation of the temporal branch (``temporal_ada``; zero) and new blocks appended after
  the trained ones (``depth``; adaLN-Zero: their modulation, hence both gates, and their
  temporal output projection are zero). Every parameter of ``params`` is copied, so the
  extended model computes exactly the trained one. ``new_params`` supplies the tree
  (``build_dit(cfg)``)."""
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  trained_depth = len(params["blocks"])   # unscanned: {index: block}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(new_params)
  out, used = [], set()
  for path, v in leaves:
    name = jax.tree_util.keystr(path)
    if path not in flat:
      if path[0].key == "blocks" and isinstance(path[1].key, int) and path[1].key >= trained_depth:
        zero = any(f"['{k}']" in name for k in ("ada", "proj_t", "proj_j"))
      elif any(f"['{k}']" in name for k in ("norm_j", "qkv_j", "proj_j", "ada_t")):
        zero = "['proj_j']" in name or "['ada_t']" in name
      else:
        raise ValueError(f"extend: the trained DiT has no parameter {name}")
      out.append(jnp.zeros_like(v) if zero else v)
      continue
    w = jnp.asarray(flat[path])
    if w.shape != v.shape:
      raise ValueError(f"extend: {name} has shape {w.shape} in the trained DiT, {v.shape} in "
                       f"the new one ({cfg})")
    out.append(w.astype(v.dtype))
    used.add(path)
  dropped = [jax.tree_util.keystr(p) for p in flat if p not in used]
  if dropped:
    raise ValueError(f"extend: the new DiT has no place for {dropped[:3]} ...")
  return jax.tree_util.tree_unflatten(treedef, out)


# ``widen``'s rule per Linear: (input split among the k copies, number of equal output chunks
# each repeated k times: 3 for q, k, v; 6 / 3 / 2 for adaLN's modulations; 0: output kept).
_WIDEN = {"embed": (False, 1), "t1": (False, 1), "t2": (True, 1), "qkv": (True, 3),
          "proj": (True, 1), "fc1": (True, 1), "fc2": (True, 1), "ada": (True, 6),
          "qkv_t": (True, 3), "proj_t": (True, 1), "ada_t": (True, 3), "qkv_j": (True, 3),
          "proj_j": (True, 1), "ada_out": (True, 2), "out": (True, 0)}


def widen(params, k: int, *, seed: int = 0, noise: float = 0.1):
  """A trained DiT's parameters k times wider (hidden, heads and MLP width x k) computing the
  same function (Net2Net's function-preserving widening, exact with LayerNorm).

  Every residual channel, head and MLP unit is repeated k times, so each LayerNorm sees its
  statistics unchanged and each attention head has k identical copies; a Linear reading a
  repeated width gives each copy 1/k of the weight plus noise that sums to zero over the
  copies (``noise`` x the copy's std), so the output is exact while the copies' outgoing
  weights differ and training can pull them apart (identical copies would get identical
  gradients forever). The widened config needs heads x k and ``pos_dim`` = the trained
  config's encoding width (its pos_dim, or its hidden). Blocks may be scanned (a leading layer
  axis); dtypes are kept.
  """
  if k < 1 or int(k) != k:
    raise ValueError(f"widen: k={k} must be a positive integer")
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, w in flat:
    w, dtype = np.asarray(w), w.dtype
    names = [p.key for p in path if hasattr(p, "key")]
    name = next((n for n in reversed(names) if n in _WIDEN), None)
    if names[0] in ("y_embed", "frame_pos"):    # [rows, hidden]: repeat the channels
      out.append(jnp.asarray(np.tile(w, (1,) * (w.ndim - 1) + (k,))))
      continue
    if name is None:
      raise ValueError(f"widen: no rule for {jax.tree_util.keystr(path)}")
    split_in, chunks = _WIDEN[name]
    if chunks:   # repeat each output chunk k times: [..., c * d] -> [..., c * k * d]
      w = w.reshape(w.shape[:-1] + (chunks, w.shape[-1] // chunks))
      w = np.tile(w, (1,) * (w.ndim - 1) + (k,)).reshape(w.shape[:-2] + (-1,))
    if split_in and names[-1] == "kernel":
      eps = noise * np.std(w / k) * rng.standard_normal((k,) + w.shape)
      eps = eps - eps.mean(0)                   # sums to zero over the copies: output exact
      w = np.concatenate(list(w / k + eps), axis=-2)   # [(layers,) k din, dout]
    out.append(jnp.asarray(w, dtype=dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def temporal_skipped(params):
  """The same DiT with its temporal branches off (each block's ``proj_t`` zero)."""
  if not any("proj_t" in jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]):
    raise ValueError("skip guidance needs a video DiT with layout='divided' (no proj_t found)")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "proj_t" in jax.tree_util.keystr(p) else x, params)
