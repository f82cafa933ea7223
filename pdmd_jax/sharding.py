"""Meshes and shardings (XLA SPMD; no hand-written communication).

Mesh axes: ``data`` (batch only) and ``fsdp`` (batch and parameters). Parameters and optimizer
moments follow big_vision's FSDP tactic: the largest dimension divisible by the fsdp size is
split over ``fsdp``; small or indivisible leaves are replicated. Adam's mu/nu have the
parameters' shapes, so they get the same sharding by construction. The batch axis is split
over (data, fsdp). Large-model logical-axis rules arrive with the DiT/Wan models.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int, fsdp: int, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh with Auto axes (classic GSPMD: with_sharding_constraint works)."""
  devices = list(devices if devices is not None else jax.devices())
  if data * fsdp != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices; "
                     f"{len(devices)} available")
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def fsdp_spec(shape, fsdp_size: int, min_size: int = 1024) -> P:
  """Split the largest divisible dim over ``fsdp`` if the leaf has >= min_size elements."""
  if fsdp_size == 1 or not shape or int(np.prod(shape)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      return P(*([None] * dim + ["fsdp"]))
  return P()


def tree_shardings(mesh, tree, min_size: int = 1024):
  """NamedSharding for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
  n = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n, min_size)), tree)


def replicated(mesh, tree=None):
  s = NamedSharding(mesh, P())
  return s if tree is None else jax.tree.map(lambda _: s, tree)


def batch_sharding(mesh, batch_axis: int = 0, ndim: int = 1):
  """Split axis ``batch_axis`` of an ndim-array over (data, fsdp)."""
  spec = [None] * ndim
  spec[batch_axis] = BATCH_AXES
  return NamedSharding(mesh, P(*spec))
