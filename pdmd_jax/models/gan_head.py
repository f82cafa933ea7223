"""DMD2's discriminator head: a small conv pyramid on a score network's middle-block tokens.

features [B, *grid, D] (image grid [H', W'], video [T', H', W']) -> one logit per sample:
4x4 stride-2 convs (video: 3x4x4, stride 1 in time) while the spatial side exceeds 4, a conv
over the remaining spatial extent (DMD2's last 4x4/stride-4 layer: side -> 1), each followed by
GroupNorm and SiLU (the last conv: SiLU only, a norm over a 1 x 1 map of a narrow head would
zero it), a mean over what is left (frames), and a linear layer to the logit (DMD2's
``cls_pred_branch``, sd_guidance.py: 32 -> 16 -> 8 -> 4 -> 1, then a 1x1 conv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pdmd_jax import models


def _groups(width: int) -> int:
  """Up to 32 groups of at least 4 channels."""
  return next(g for g in (32, 16, 8, 4, 2, 1) if width % g == 0 and width // g >= 4 or g == 1)


class GanHead(nnx.Module):
  """features [B, *grid, dim] -> logits [B]."""

  def __init__(self, grid: tuple[int, ...], dim: int, width: int, *, rngs: nnx.Rngs):
    if len(grid) not in (2, 3) or grid[-1] != grid[-2]:
      raise ValueError(f"GanHead: grid {grid} must be [H', W'] or [T', H', W'] with H' = W'")
    video = len(grid) == 3
    side, cin, layers = grid[-1], dim, []
    while side > 4:
      layers.append(nnx.Conv(cin, width, (3, 4, 4) if video else (4, 4),
                             strides=(1, 2, 2) if video else (2, 2),
                             padding=((1, 1),) * (3 if video else 2), rngs=rngs))
      side, cin = (side + 2 - 4) // 2 + 1, width
    layers.append(nnx.Conv(cin, width, (1, side, side) if video else (side, side),
                           padding="VALID", rngs=rngs))
    self.convs = nnx.List(layers)
    self.norms = nnx.List([nnx.GroupNorm(width, num_groups=_groups(width), rngs=rngs)
                           for _ in layers[:-1]])
    self.out = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, features):
    h = features.astype(jnp.float32)
    for conv, norm in zip(self.convs, self.norms):
      h = jax.nn.silu(norm(conv(h)))
    h = jax.nn.silu(self.convs[-1](h))
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
