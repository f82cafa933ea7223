"""DMD2's discriminator head: a small conv pyramid on a score network's middle-block tokens.

features [B, *grid, D] (image grid [H', W'], video [T', H', W']) -> one logit per sample:
4x4 stride-2 convs (video: 3x4x4, stride 1 in time) while the spatial side exceeds 4, a conv
over the remaining spatial extent (DMD2's last 4x4/stride-4 layer: side -> 1), each followed by
GroupNorm and SiLU (the last conv: SiLU only, a norm over a 1 x 1 map of a narrow head would
zero it), a mean over what is left (frames), and a linear layer to the logit (DMD2's
``cls_pred_branch``, sd_guidance.py: 32 -> 16 -> 8 -> 4 -> 1, then a 1x1 conv).

The convolutions are computed as strided slices and one matmul (``conv``; the same numbers as
``nnx.Conv``, whose parameters they use): XLA:CPU runs a convolution's gradient inside a while
loop -- the step's TTUR loop -- 20-25x slower than outside one, which made the GAN step 2.9x
the plain step's time on the MNIST DiT (benchmarks/recipe_cost.py).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from pdmd_jax import models


def _groups(width: int) -> int:
  """Up to 32 groups of at least 4 channels."""
  return next(g for g in (32, 16, 8, 4, 2, 1) if width % g == 0 and width // g >= 4 or g == 1)


def conv(x, kernel, bias, strides, padding):
  """A channels-last convolution ([B, *spatial, Cin] with kernel [*k, Cin, Cout], ``padding``
  one (low, high) pair per spatial axis) as strided slices stacked and one matmul."""
  k = kernel.shape[:-2]
  x = jnp.pad(x, [(0, 0), *padding, (0, 0)])
  out = [(x.shape[1 + d] - k[d]) // strides[d] + 1 for d in range(len(k))]
  taps = [x[(slice(None),) + tuple(slice(o, o + s * (n - 1) + 1, s)
                                   for o, s, n in zip(off, strides, out))]
          for off in itertools.product(*(range(n) for n in k))]
  w = kernel.reshape(-1, *kernel.shape[-2:])
  return jnp.einsum("...kc,kcd->...d", jnp.stack(taps, axis=-2), w) + bias


class GanHead(nnx.Module):
  """features [B, *grid, dim] -> logits [B]."""

  def __init__(self, grid: tuple[int, ...], dim: int, width: int, *, rngs: nnx.Rngs):
    if len(grid) not in (2, 3) or grid[-1] != grid[-2]:
      raise ValueError(f"GanHead: grid {grid} must be [H', W'] or [T', H', W'] with H' = W'")
    video = len(grid) == 3
    side, cin, layers = grid[-1], dim, []
    specs = []     # (strides, padding) of each conv
    while side > 4:
      layers.append(nnx.Conv(cin, width, (3, 4, 4) if video else (4, 4),
                             strides=(1, 2, 2) if video else (2, 2),
                             padding=((1, 1),) * (3 if video else 2), rngs=rngs))
      specs.append(((1, 2, 2) if video else (2, 2), ((1, 1),) * (3 if video else 2)))
      side, cin = (side + 2 - 4) // 2 + 1, width
    layers.append(nnx.Conv(cin, width, (1, side, side) if video else (side, side),
                           padding="VALID", rngs=rngs))
    specs.append(((1,) * len(grid), ((0, 0),) * len(grid)))
    self.specs = tuple(specs)
    self.convs = nnx.List(layers)
    self.norms = nnx.List([nnx.GroupNorm(width, num_groups=_groups(width), rngs=rngs)
                           for _ in layers[:-1]])
    self.out = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, features):
    h = features.astype(jnp.float32)
    apply = lambda i, h: conv(h, self.convs[i].kernel[...], self.convs[i].bias[...],
                              *self.specs[i])
    for i, norm in enumerate(self.norms):
      h = jax.nn.silu(norm(apply(i, h)))
    h = jax.nn.silu(apply(len(self.norms), h))
    h = jnp.mean(h.reshape(h.shape[0], -1, h.shape[-1]), axis=1)
    return self.out(h)[:, 0]


class Head:
  """(apply(params, features) -> logits [B], initial params) of a GanHead."""

  def __init__(self, grid: tuple[int, ...], dim: int, width: int, seed: int):
    functional, self.params = models.build_module(
        GanHead(tuple(grid), dim, width, rngs=nnx.Rngs(seed)))
    self.graphdef = functional.graphdef

  def apply(self, params, features):
    return nnx.merge(self.graphdef, nnx.State(params))(features)
