"""Networks, used through a functional boundary: ``Functional.apply(params, x, t, y)``.

Modules are Flax NNX; params travel as pure dicts (``nnx.State.to_pure_dict``) so that optax,
orbax and jit shardings see plain pytrees, and ``nnx.merge`` rebuilds the module inside jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from pdmd_jax.models import dit as dit_lib
from pdmd_jax.models.mlp import VelocityMLP

MODELS = ("mlp", "dit")


@dataclasses.dataclass(frozen=True, eq=False)
class Functional:
  """A static NNX graph plus a pure apply; hashable by identity (safe as a jit static)."""
  graphdef: Any

  def apply(self, params, x, t, y):
    return nnx.merge(self.graphdef, nnx.State(params))(x, t, y)

  def apply_features(self, params, x, t, y, layer: int):
    """(velocity, features after block ``layer`` on the token grid) of a DiT."""
    return nnx.merge(self.graphdef, nnx.State(params))(x, t, y, features_at=layer)


def build(name: str, *, dim: int, num_classes: int, width: int, depth: int, time_dim: int,
          seed: int):
  """Returns (Functional, params pure dict) of a freshly initialised model."""
  if name != "mlp":
    raise ValueError(f"model.name={name!r} is unknown; allowed: {list(MODELS)}")
  module = VelocityMLP(dim, num_classes, width=width, depth=depth, time_dim=time_dim,
                       rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(module, nnx.Param)
  return Functional(graphdef), state.to_pure_dict()


def build_module(module: nnx.Module):
  """(Functional, params pure dict) of an NNX module (parameters only; no other state)."""
  graphdef, state = nnx.split(module, nnx.Param)
  return Functional(graphdef), state.to_pure_dict()


def build_dit(cfg: "dit_lib.DiTConfig", seed: int = 0):
  """(Functional, params) of a freshly initialised DiT."""
  return build_module(dit_lib.DiT(cfg, rngs=nnx.Rngs(seed)))


def abstract_dit(cfg: "dit_lib.DiTConfig"):
  """(Functional, ShapeDtypeStruct params) without allocating (jax.eval_shape)."""
  out = {}

  def make():
    f, p = build_dit(cfg)
    out["f"] = f
    return p
  params = jax.eval_shape(make)
  return out["f"], params


def logical_axes(module_or_cfg) -> dict:
  """Logical axis names of every parameter (a pure dict of tuples), from the modules' metadata."""
  module = module_or_cfg
  if isinstance(module_or_cfg, dit_lib.DiTConfig):
    module = nnx.eval_shape(lambda: dit_lib.DiT(module_or_cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(module, nnx.Param)
  return jax.tree.map(lambda v: tuple(v.get_metadata().get("out_sharding") or (None,) * v.ndim),
                      state, is_leaf=lambda v: isinstance(v, nnx.Variable)).to_pure_dict()
