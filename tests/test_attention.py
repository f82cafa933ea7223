"""Blockwise (online-softmax) attention: dense attention's values and gradients, no [L, L]."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdmd_jax import models
from pdmd_jax.models import attention
from pdmd_jax.models import dit


def _qkv(lq, lk, dtype=jnp.float32, b=2, h=3, d=8):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(k1, (b, lq, h, d), dtype), 3 * jax.random.normal(k2, (b, lk, h, d), dtype),
          jax.random.normal(k3, (b, lk, h, d), dtype))


@pytest.mark.parametrize("lq,lk,block", [(70, 45, 16), (5, 130, 32), (33, 7, 8)])
def test_blockwise_equals_dense_values_and_gradients(lq, lk, block):
  """Lengths that are and are not multiples of the blocks (padded keys are masked, padded
  queries dropped); logits scaled by 3 so the softmax is far from uniform."""
  q, k, v = _qkv(lq, lk)
  run = lambda impl: attention.attention(q, k, v, impl=impl, block_q=block, block_k=block)
  dense, blockwise = run("dense"), run("blockwise")
  chex.assert_shape(blockwise, (2, lq, 3, 8))
  chex.assert_trees_all_close(blockwise, dense, atol=2e-6, rtol=2e-5)
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention.attention(
      q, k, v, impl=impl, block_q=block, block_k=block)))
  g_dense = jax.jit(jax.grad(loss("dense"), argnums=(0, 1, 2)))(q, k, v)
  g_block = jax.jit(jax.grad(loss("blockwise"), argnums=(0, 1, 2)))(q, k, v)
  chex.assert_trees_all_close(g_block, g_dense, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("lq,lk,block", [(9, 70, 8)])
def test_key_masks_equal_dense(lq, lk, block):
  """Ragged text / absent image tokens: a [B, Lk] key mask (row 0 keeps only keys past the
  first two blocks, so its early blocks are all masked; row 1 a random subset, odd lengths)
  gives dense attention's values and gradients."""
  q, k, v = _qkv(lq, lk)
  mask = jnp.stack([jnp.arange(lk) >= 2 * block,
                    jax.random.bernoulli(jax.random.PRNGKey(5), 0.6, (lk,)).at[lk - 1].set(True)])
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention.attention(
      q, k, v, impl=impl, key_mask=mask, block_q=block, block_k=block)))
  for impl in ("dense", "blockwise"):
    chex.assert_tree_all_finite(loss(impl)(q, k, v))
  out = {impl: attention.attention(q, k, v, impl=impl, key_mask=mask, block_q=block,
                                   block_k=block) for impl in ("dense", "blockwise")}
  chex.assert_trees_all_close(out["blockwise"], out["dense"], atol=2e-6, rtol=2e-5)
  # the mask acts: changing a masked key's value changes nothing
  v2 = v.at[0, 0].add(100.0)
  chex.assert_trees_all_close(attention.attention(q, k, v2, impl="blockwise", key_mask=mask,
                                                  block_q=block, block_k=block), out["blockwise"])
  g = {impl: jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
       for impl in ("dense", "blockwise")}
  chex.assert_trees_all_close(g["blockwise"], g["dense"], atol=2e-5, rtol=2e-4)


def test_auto_picks_the_fused_kernel_of_the_backend():
  assert attention.resolve("auto", "gpu") == "cudnn"
  assert attention.resolve("auto", "tpu") == "tpu_flash"
  assert attention.resolve("auto", "cpu") == "blockwise"
  assert attention.resolve("dense", "tpu") == "dense"
  with pytest.raises(ValueError, match="allowed"):
    attention.resolve("flash")


def test_bfloat16_inputs_keep_float32_statistics():
  q, k, v = _qkv(40, 40, jnp.bfloat16)
  out = attention.attention(q, k, v, impl="blockwise", block_q=16, block_k=16)
  assert out.dtype == jnp.bfloat16
  ref = attention.attention(*(x.astype(jnp.float32) for x in (q, k, v)), impl="dense")
  chex.assert_trees_all_close(out.astype(jnp.float32), ref, atol=2e-2)


def test_gradient_memory_is_not_quadratic():
  """Compiled temporaries of grad(sum(attention)) at L = 1024 and 2048 (H = 2, D = 64): dense
  materialises [H, L, L] float32 logits (8 and 32 MiB), so doubling L adds at least the 24 MiB
  of logits; blockwise adds less than a quarter of that (its blocks do not grow) and stays
  under a quarter of dense (measured: dense 41 -> 98 MiB, blockwise 14.5 -> 17.6 MiB)."""
  temp = {}
  for n in (1024, 2048):
    x = jax.ShapeDtypeStruct((1, n, 2, 64), jnp.float32)
    for impl in ("dense", "blockwise"):   # the two that run on CPU
      g = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(attention.attention(
          q, k, v, impl=impl)), argnums=(0, 1, 2)))
      temp[impl, n] = g.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
  logits = lambda n: 2 * n * n * 4
  quadratic = logits(2048) - logits(1024)
  assert temp["dense", 2048] - temp["dense", 1024] >= quadratic
  assert temp["blockwise", 2048] - temp["blockwise", 1024] < quadratic / 4
  assert temp["blockwise", 2048] < temp["dense", 2048] / 4


def test_dit_with_blockwise_attention_is_the_same_network():
  cfg = dit.config_for("tiny", image_size=8, patch=2, hidden=16, depth=2, heads=2, time_dim=32)
  net, params = models.build_dit(cfg, seed=0)
  params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), params)   # adaLN-Zero: non-zero
  blk, _ = models.build_dit(dit.DiTConfig(**{**cfg.__dict__, "attention": "blockwise"}), seed=0)
  x = jax.random.normal(jax.random.PRNGKey(1), (3,) + cfg.sample_shape)
  t, y = jnp.array([0.2, 0.5, 0.9]), jnp.array([0, 3, 10])
  chex.assert_trees_all_close(blk.apply(params, x, t, y), net.apply(params, x, t, y), atol=1e-5)
  with pytest.raises(ValueError, match="impl='flash'.*allowed"):
    attention.attention(x, x, x, impl="flash")
