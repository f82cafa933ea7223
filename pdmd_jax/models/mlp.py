"""Time- and class-conditioned residual MLP velocity field psi(x_t, t, y) (Flax NNX).

Used for the Gaussian-mixture problems: as the teacher fit that initialises every generator
expert and fake score, and as the experts themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
  """Sinusoidal embedding of the model timestep 1000 t (spec §1.2), [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Block(nnx.Module):
  """h + W2 silu(W1 LN(h) + Wc c): a pre-norm residual block with additive conditioning."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, 2 * width, rngs=rngs)
    self.cond = nnx.Linear(width, 2 * width, rngs=rngs)
    self.fc2 = nnx.Linear(2 * width, width, rngs=rngs)

  def __call__(self, h, c):
    return h + self.fc2(jax.nn.silu(self.fc1(self.norm(h)) + self.cond(c)))


class VelocityMLP(nnx.Module):
  """psi: (x [B, D], t [B], y [B] int in [0, num_classes]) -> velocity [B, D].

  y == num_classes is the null (unconditional) label used by classifier-free guidance.
  """

  def __init__(self, dim: int, num_classes: int, *, width: int = 256, depth: int = 3,
               time_dim: int = 64, rngs: nnx.Rngs):
    self.time_dim = time_dim
    self.depth = depth
    self.inp = nnx.Linear(dim, width, rngs=rngs)
    self.t1 = nnx.Linear(time_dim, width, rngs=rngs)
    self.t2 = nnx.Linear(width, width, rngs=rngs)
    self.y_embed = nnx.Embed(num_classes + 1, width, rngs=rngs)
    for i in range(depth):
      setattr(self, f"block_{i}", Block(width, rngs=rngs))
    self.out_norm = nnx.LayerNorm(width, rngs=rngs)
    self.out = nnx.Linear(width, dim, rngs=rngs)

  def __call__(self, x, t, y):
    c = self.t2(jax.nn.silu(self.t1(timestep_embedding(t, self.time_dim)))) + self.y_embed(y)
    c = jax.nn.silu(c)
    h = self.inp(x)
    for i in range(self.depth):
      h = getattr(self, f"block_{i}")(h, c)
    return self.out(jax.nn.silu(self.out_norm(h)))
