"""Meshes and shardings (XLA SPMD; no hand-written communication).

Mesh axes: ``data`` (batch only), ``fsdp`` (batch and parameters), ``tensor`` (attention heads
and MLP width) and ``context`` (the token axis of activations, and parameters like fsdp). Every
mesh has all four axes
(size 1 when unused) with Auto axis types, so classic GSPMD code (jit shardings,
``with_sharding_constraint``) works on any of them.

Two ways to shard a parameter tree:
- logical rules (large models): every parameter carries logical axis names (``embed``,
  ``heads``, ``mlp``, ``vocab``, ``layers``; models/dit.py, models/wan.py) and a rule table maps
  each name to mesh axes (or None). A dimension that the mesh axes' size does not divide is
  replicated instead (that dimension only), and a mesh axis is used at most once per array.
  Optionally (``fsdp_min_size``), large leaves that the rules leave unsplit over (fsdp,
  context) are split over them on their largest divisible dimension.
- ``tree_shardings`` (big_vision's FSDP tactic, for unannotated trees): the largest dimension
  divisible by the fsdp size is split over ``fsdp``; small or indivisible leaves are replicated.

Optimizer states follow their parameters through ``optax.tree_map_params`` (Adam's mu/nu
sharded like the params, step counts replicated); LoRA factors follow their kernel (A [in, r]
by the kernel's input axis, B [r, out] by its output axis).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axis | tuple of mesh axes | None); the first rule of a name wins.
# Parameters are split over the context axis too (as maxtext does): context-parallel devices
# hold different tokens of the same samples, so they would otherwise hold copies of the weights.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("layers", None),
    ("length", "context"),
)

# ============================================================================================
# Meshes
# ============================================================================================


def make_mesh(data: int, fsdp: int, devices=None, *, tensor: int = 1,
              context: int = 1) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor, context) mesh with Auto axes; sizes must multiply to len(devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = (data, fsdp, tensor, context)
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} x context={context} "
                     f"needs {math.prod(sizes)} devices; {len(devices)} available")
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_sizes(sizes, num_devices: int) -> dict[str, int]:
  """Resolves a {axis: size} mapping (missing axes = 1, at most one -1) to concrete sizes."""
  get = sizes.get if hasattr(sizes, "get") else lambda k, d: getattr(sizes, k, d)
  unknown = sorted(set(sizes.keys() if hasattr(sizes, "keys") else []) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh axes {unknown} are unknown; allowed: {list(MESH_AXES)}")
  out = {a: int(get(a, 1)) for a in MESH_AXES}
  free = [a for a, n in out.items() if n == -1]
  if len(free) > 1 or any(n == 0 or n < -1 for n in out.values()):
    raise ValueError(f"mesh={out}: sizes must be positive, with at most one -1")
  known = math.prod(n for n in out.values() if n != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"mesh={out}: {num_devices} devices are not divisible by {known}")
    out[free[0]] = num_devices // known
  if math.prod(out.values()) != num_devices:
    raise ValueError(f"mesh={out} needs {math.prod(out.values())} devices; {num_devices} available")
  return out


def mesh_from_sizes(sizes, devices=None) -> jax.sharding.Mesh:
  """make_mesh from a {axis: size} mapping or config (one size may be -1)."""
  devices = list(devices if devices is not None else jax.devices())
  return make_mesh(**mesh_sizes(sizes, len(devices)), devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=64' -> {'data': 1, 'fsdp': 64} (resolve with ``mesh_sizes``)."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in MESH_AXES or not value:
      raise ValueError(f"mesh entry {part!r}: expected axis=size with axis in {list(MESH_AXES)}")
    out[name] = int(value)
  return out


# ============================================================================================
# Logical axis rules
# ============================================================================================


def _rule_table(rules) -> dict[str, Any]:
  table = {}
  for name, axes in rules:
    table.setdefault(name, axes)
  return table


def _axis_size(mesh, axes) -> int:
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in names)


# Parameter-sharding axes of the optional fallback of ``logical_spec``.
FSDP_AXES = ("fsdp", "context")


def logical_spec(names: Sequence[str | None], rules=DEFAULT_RULES, shape=None, mesh=None,
                 fsdp_min_size: int | None = None) -> P:
  """PartitionSpec of one array from its logical axis names.

  With ``shape`` and ``mesh``, a dimension whose size the mesh axes do not divide is
  replicated (that dimension only); size-1 mesh axes are dropped; a mesh axis already used by
  an earlier dimension is not reused (e.g. batch->(data, fsdp) then embed->fsdp).

  fsdp_min_size: parameters only. A leaf of at least this many elements that the rules leave
  unsplit over FSDP_AXES gets its largest free divisible dimension split over them, so no
  large unannotated leaf is replicated on every device. Not for LoRA factors: splitting
  B [r, out] where the kernel keeps ``out`` whole saved 4 GiB of arguments per device on the
  Wan plan but cost 4-27 GiB of temporaries (A B is then formed in the wrong layout and the
  full-size product resharded), so LoRA factors follow their kernels (docs/scale.md).
  """
  table = _rule_table(rules)
  used: set[str] = set()
  spec = []
  for d, name in enumerate(names):
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes and shape[d] % _axis_size(mesh, axes):
        axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  if fsdp_min_size is not None and mesh is not None and shape is not None \
      and math.prod(shape) >= fsdp_min_size:
    axes = tuple(a for a in FSDP_AXES if a not in used and mesh.shape[a] > 1)
    n = _axis_size(mesh, axes) if axes else 1
    free = [d for d in range(len(spec)) if spec[d] is None and shape[d] % n == 0]
    if n > 1 and free and not used & set(FSDP_AXES):
      spec[max(free, key=lambda d: shape[d])] = axes[0] if len(axes) == 1 else axes
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _is_names(x) -> bool:
  return isinstance(x, (tuple, P)) and all(n is None or isinstance(n, str) for n in x)


def logical_shardings(mesh, tree, axes, rules=DEFAULT_RULES, fsdp_min_size: int | None = None):
  """NamedSharding for every parameter leaf of ``tree`` (arrays or ShapeDtypeStructs).

  axes: a tree of the same structure whose leaves are tuples (or PartitionSpecs) of logical
    names, e.g. ``models.logical_axes(cfg)`` or ``wan.param_specs(cfg)``.
  fsdp_min_size: see ``logical_spec`` (None: the rules only, the default).
  """
  return jax.tree.map(
      lambda names, x: NamedSharding(mesh, logical_spec(tuple(names), rules, np.shape(x), mesh,
                                                        fsdp_min_size)),
      axes, tree, is_leaf=_is_names)


def lora_axes(lora, param_axes):
  """Logical axes of a LoRA tree {path: {"a": [..., in, r], "b": [..., r, out]}}.

  A takes its kernel's input axis name, B its output axis name (leading axes, e.g. a scanned
  "layers" axis, are kept); the rank axis is never split.
  """
  flat = {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(param_axes).items()}
  out = {}
  for path in lora:
    *lead, d_in, d_out = tuple(flat[path])
    out[path] = {"a": (*lead, d_in, None), "b": (*lead, None, d_out)}
  return out


def opt_state_shardings(tx: optax.GradientTransformation, params, param_shardings, mesh):
  """Shardings of ``tx.init(params)``: parameter-shaped leaves (mu, nu) like the parameters,
  everything else (counts, scalars) replicated. ``params`` may be abstract."""
  abstract = jax.eval_shape(tx.init, params)
  rep = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                               transform_non_params=lambda _: rep)


def train_state_shardings(mesh, state, tx_of, param_axes, expert_axes=None,
                          rules=DEFAULT_RULES, fsdp_min_size: int | None = None):
  """Shardings of a ``train_step.TrainState`` from logical axes.

  state: the (abstract) TrainState.
  tx_of: (gen_tx, fake_tx).
  param_axes: logical axes of a fake score (a full parameter tree).
  expert_axes: logical axes of a generator expert (``lora_axes(...)`` for LoRA experts);
    None: experts are full copies with ``param_axes``.
  """
  gen_tx, fake_tx = tx_of
  expert_axes = param_axes if expert_axes is None else expert_axes
  rep = NamedSharding(mesh, P())
  shard = lambda tree, axes: None if tree is None else logical_shardings(
      mesh, tree, axes, rules, fsdp_min_size)
  opt = lambda tx, opt_state, params, s: None if opt_state is None else opt_state_shardings(
      tx, params, s, mesh)
  experts = tuple(shard(e, expert_axes) for e in state.experts)
  fakes = tuple(shard(f, param_axes) for f in state.fakes)
  ema = tuple(None if e is None else {"params": shard(e["params"], expert_axes), "count": rep}
              for e in state.ema)
  return state.replace(
      step=rep, rng=rep, experts=experts, fakes=fakes, ema=ema,
      expert_opt=tuple(opt(gen_tx, o, e, s)
                       for o, e, s in zip(state.expert_opt, state.experts, experts)),
      fake_opt=tuple(opt(fake_tx, o, f, s) for o, f, s in zip(state.fake_opt, state.fakes, fakes)))


# ============================================================================================
# Activations
# ============================================================================================


def constrain(x, names: Sequence[str | None], rules=DEFAULT_RULES, mesh=None):
  """with_sharding_constraint of an activation by logical names, e.g. ("batch", "length", None).

  mesh: defaults to the mesh set by ``jax.set_mesh``; without one (or on a single device) this
  is the identity, so models may call it unconditionally. Indivisible dimensions stay
  unconstrained-replicated as in ``logical_spec``.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return x
  if mesh.size == 1:
    return x
  spec = logical_spec(tuple(names), rules, x.shape, mesh)
  sharding = spec if isinstance(mesh, jax.sharding.AbstractMesh) else NamedSharding(mesh, spec)
  return jax.lax.with_sharding_constraint(x, sharding)


def shard_batch(x, rules=DEFAULT_RULES, mesh=None):
  """Any activation [B, ...]: the batch axis over (data, fsdp), the rest unconstrained.

  Noise drawn inside a jitted step carries no sharding, and GSPMD may then replicate the
  whole batch on every device (seen on the Wan plan: every device computed all samples and
  all-reduced activations); the models constrain their input and output with this.
  """
  return constrain(x, ("batch",) + (None,) * (x.ndim - 1), rules, mesh)


def shard_tokens(x, rules=DEFAULT_RULES, mesh=None):
  """Token activations [B, N, ...]: batch over (data, fsdp), tokens over ``context``."""
  return constrain(x, ("batch", "length") + (None,) * (x.ndim - 2), rules, mesh)


# ============================================================================================
# Rule-free FSDP (unannotated trees) and small helpers
# ============================================================================================


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


def abstract_with(tree, shardings):
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (AOT lowering without arrays)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)
