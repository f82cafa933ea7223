"""Networks, used through a functional boundary: ``Functional.apply(params, x, t, y)``.

Modules are Flax NNX; params travel as pure dicts (``nnx.State.to_pure_dict``) so that optax,
orbax and jit shardings see plain pytrees, and ``nnx.merge`` rebuilds the module inside jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from pdmd_jax.models.mlp import VelocityMLP

MODELS = ("mlp",)


@dataclasses.dataclass(frozen=True, eq=False)
class Functional:
  """A static NNX graph plus a pure apply; hashable by identity (safe as a jit static)."""
  graphdef: Any

  def apply(self, params, x, t, y):
    return nnx.merge(self.graphdef, nnx.State(params))(x, t, y)


def build(name: str, *, dim: int, num_classes: int, width: int, depth: int, time_dim: int,
          seed: int):
  """Returns (Functional, params pure dict) of a freshly initialised model."""
  if name != "mlp":
    raise ValueError(f"model.name={name!r} is unknown; allowed: {list(MODELS)}")
  module = VelocityMLP(dim, num_classes, width=width, depth=depth, time_dim=time_dim,
                       rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(module, nnx.Param)
  return Functional(graphdef), state.to_pure_dict()
