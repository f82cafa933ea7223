"""Attention for every model: dense, or blockwise with an online softmax (flash-style, plain JAX).

  out = softmax(q k^T / sqrt(D)) v,   q [B, Lq, H, D], k, v [B, Lk, H, D] -> [B, Lq, H, D]

"dense" is ``jax.nn.dot_product_attention`` (XLA materialises the [B, H, Lq, Lk] logits: at
Wan2.2's 480p, 32,760 tokens, 160 GiB per layer and sample in fp32). "blockwise" never does,
forward or backward: queries are processed in blocks of ``block_q`` (``lax.map``), each
against key/value blocks of ``block_k`` (``lax.scan``) keeping the running max m, the running
normaliser l and the unnormalised output o (Milakov & Gimelshein 2018; FlashAttention):

  m' = max(m, rowmax(s_j)),  l' = l e^{m - m'} + rowsum(e^{s_j - m'}),
  o' = o e^{m - m'} + e^{s_j - m'} v_j,          out = o / l.

The gradient rematerialises instead of storing: each query block's function and each key-block
step are ``jax.checkpoint``-ed, so the backward pass keeps per query block only the running
(m, l, o) of its key steps, O(B H Lq D) in all, never an [Lq, Lk] array. Logits and softmax
statistics are float32 whatever the input dtype. Padded keys (Lk not a multiple of block_k)
and keys outside ``key_mask`` get a logit of -1e30 (finite: a block with no valid key before
the first valid one contributes e^{-1e30 - m} = 0 once a valid key sets m); padded queries are
dropped. Every row needs at least one valid key.

``impl="auto"`` picks by backend: cuDNN's fused attention on GPU
(``jax.nn.dot_product_attention(implementation="cudnn")``), the Pallas TPU flash-attention
kernel on TPU (key mask as segment ids), blockwise elsewhere (CPU, and the fallback). Only
dense and blockwise run on this project's CPU test machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("dense", "blockwise", "auto", "cudnn", "tpu_flash")
F32 = jnp.float32
NEG = -1e30   # the logit of a masked key


def resolve(impl: str, backend: str | None = None) -> str:
  """The implementation ``impl`` runs as on ``backend`` (default: JAX's default backend)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r} is unknown; allowed: {list(IMPLS)}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "tpu_flash"}.get(backend, "blockwise")


def attention(q, k, v, *, impl: str = "dense", key_mask=None, block_q: int = 512,
              block_k: int = 512):
  """softmax(q k^T / sqrt(D)) v with [B, L, H, D] inputs (see the module docstring).

  key_mask: None or bool [B, Lk], True where a key may be attended (ragged text, absent image
  tokens).
  """
  impl = resolve(impl)
  mask4 = None if key_mask is None else key_mask[:, None, None, :]
  if impl == "dense":
    return jax.nn.dot_product_attention(q, k, v, mask=mask4)
  if impl == "blockwise":
    return blockwise(q, k, v, key_mask=key_mask, block_q=block_q, block_k=block_k)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask4, implementation="cudnn")
  return _tpu_flash(q, k, v, key_mask)


def _tpu_flash(q, k, v, key_mask):
  """The Pallas TPU flash-attention kernel ([B, H, L, D] layout; key mask as segment ids)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=import-outside-toplevel
  t = lambda x: jnp.swapaxes(x, 1, 2)
  seg = None
  if key_mask is not None:
    seg = fa.SegmentIds(q=jnp.ones(q.shape[:2], jnp.int32), kv=key_mask.astype(jnp.int32))
  out = fa.flash_attention(t(q), t(k), t(v), segment_ids=seg,
                           sm_scale=1.0 / float(q.shape[-1]) ** 0.5)
  return t(out)


def _blocks(x, size: int):
  """[B, L, H, D] -> [n, B, size, H, D], zero-padded to n * size tokens."""
  b, length, h, d = x.shape
  n = -(-length // size)
  x = jnp.pad(x, ((0, 0), (0, n * size - length), (0, 0), (0, 0)))
  return x.reshape(b, n, size, h, d).swapaxes(0, 1)


def blockwise(q, k, v, *, key_mask=None, block_q: int = 512, block_k: int = 512):
  b, lq, h, d = q.shape
  lk = k.shape[1]
  bq, bk = min(block_q, lq), min(block_k, lk)
  kb, vb = _blocks(k, bk), _blocks(v, bk)
  key_mask = jnp.ones((b, lk), bool) if key_mask is None else key_mask
  n = kb.shape[0]
  valid = jnp.pad(key_mask, ((0, 0), (0, n * bk - lk))).reshape(b, n, bk).swapaxes(0, 1)
  scale = 1.0 / float(d) ** 0.5

  def one_query_block(qi):                                     # qi [B, bq, H, D]
    @jax.checkpoint
    def step(carry, kv):
      m, l, o = carry                                          # [B, H, bq], [B, H, bq], [B, bq, H, D]
      kj, vj, ok = kv
      s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=F32) * scale
      s = jnp.where(ok[:, None, None, :], s, NEG)                # ok [B, bk]
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(vj.dtype), vj, preferred_element_type=F32)
      o = o * jnp.swapaxes(corr, 1, 2)[..., None] + pv
      return (m_new, l, o), None

    init = (jnp.full((b, h, bq), -jnp.inf, F32), jnp.zeros((b, h, bq), F32),
            jnp.zeros((b, bq, h, d), F32))
    (_, l, o), _ = jax.lax.scan(step, init, (kb, vb, valid))
    return (o / jnp.swapaxes(l, 1, 2)[..., None]).astype(q.dtype)

  out = jax.lax.map(jax.checkpoint(one_query_block), _blocks(q, bq))   # [nq, B, bq, H, D]
  return out.swapaxes(0, 1).reshape(b, -1, h, d)[:, :lq]
