r"""LoRA (Hu et al. 2021) as a functional overlay on any parameter tree.

A generator expert = the frozen teacher backbone + its own low-rank update of selected kernels:

  W' = W + (alpha / r) A B,   A [..., in, r] ~ N(0, 1/in),   B [..., r, out] = 0,

so a fresh expert computes exactly the teacher. Targets are regular expressions over
'.'-joined parameter paths (e.g. ``blocks\.\d+\.(qkv|proj|fc1|fc2)\.kernel``; '.' and not '/'
because the paths are keys of the checkpointed LoRA tree), each with its own
rank and alpha; leading axes of a kernel (a scanned "layers" axis) get one A, B per slice.
The LoRA tree ``{path: {"a", "b"}}`` is the only thing the expert's optimizer sees; ``merge``
rebuilds the full parameters inside the jitted step. For a model that scans its layers, kernels
matching ``defer`` stay ``Deferred`` (W, A, B) and the model merges each layer inside its scan
(``materialize`` in the scan body): a merged copy of every layer's kernels is never held at
once (Wan2.2: 14B parameters per merged expert).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """targets: ((path regex, rank, alpha), ...); the first matching pattern wins."""
  targets: tuple[tuple[str, int, float], ...]

  def match(self, path: str):
    for pattern, rank, alpha in self.targets:
      if re.fullmatch(pattern, path):
        return rank, alpha
    return None


def _flat(params) -> dict[str, jax.Array]:
  return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(params).items()}


def target_paths(spec: LoraSpec, params) -> list[str]:
  """Paths of the kernels (ndim >= 2) that ``spec`` adapts; raises if there are none."""
  paths = [p for p, v in _flat(params).items() if v.ndim >= 2 and spec.match(p)]
  if not paths:
    raise ValueError(f"generator.lora targets {[t[0] for t in spec.targets]} match no kernel; "
                     f"kernels are e.g. {[p for p, v in _flat(params).items() if v.ndim >= 2][:6]}")
  return sorted(paths)


def init(spec: LoraSpec, params, key) -> dict[str, dict[str, jax.Array]]:
  """Zero-effect LoRA for every targeted kernel of ``params`` (B = 0)."""
  flat = _flat(params)
  out = {}
  for i, path in enumerate(target_paths(spec, params)):
    w = flat[path]
    rank, _ = spec.match(path)
    *lead, d_in, d_out = w.shape
    a = jax.random.normal(jax.random.fold_in(key, i), (*lead, d_in, rank), jnp.float32)
    out[path] = {"a": a / jnp.sqrt(d_in), "b": jnp.zeros((*lead, rank, d_out), jnp.float32)}
  return out


def scales(spec: LoraSpec, lora) -> dict[str, float]:
  return {p: alpha / rank for p in lora for rank, alpha in [spec.match(p)]}


def delta(lora_entry, scale: float):
  """(alpha / r) A B for one kernel (batched over leading axes)."""
  return scale * jnp.einsum("...ir,...ro->...io", lora_entry["a"], lora_entry["b"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Deferred:
  """A kernel whose LoRA is merged where the model uses it: W + scale A B (per scanned layer)."""
  w: jax.Array
  a: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(metadata=dict(static=True))

  def merged(self) -> jax.Array:
    return self.w + delta({"a": self.a, "b": self.b}, self.scale).astype(self.w.dtype)


def materialize(tree):
  """``tree`` with every ``Deferred`` kernel merged (call inside the layer scan's body)."""
  return jax.tree.map(lambda v: v.merged() if isinstance(v, Deferred) else v, tree,
                      is_leaf=lambda v: isinstance(v, Deferred))


def merge(spec: LoraSpec, params, lora, defer: str | None = None):
  """The full parameter tree with every adapted kernel replaced by W + (alpha / r) A B; kernels
  whose path matches ``defer`` become ``Deferred`` (the model merges them per layer)."""
  if not lora:
    return params
  s = scales(spec, lora)
  flat = traverse_util.flatten_dict(params)
  for key in list(flat):
    path = ".".join(map(str, key))
    if path in lora:
      w = flat[key]
      if defer is not None and re.fullmatch(defer, path):
        flat[key] = Deferred(w, lora[path]["a"], lora[path]["b"], s[path])
      else:
        flat[key] = (w + delta(lora[path], s[path]).astype(w.dtype))
  return traverse_util.unflatten_dict(flat)


def num_params(lora) -> int:
  return sum(x.size for x in jax.tree.leaves(lora))


DIT_TARGETS = r"blocks\.(\d+\.)?(qkv|proj|fc1|fc2)\.kernel"   # attention and MLP projections


def apply_on(apply, spec: LoraSpec, backbone, defer: str | None = None):
  """apply(lora, x, t, y) of an adapted network: the frozen ``backbone`` with ``lora`` merged in
  (kernels matching ``defer``: merged by the model, per layer inside its scan).

  The backbone is under stop_gradient: only the LoRA tree is trained.
  """
  backbone = jax.lax.stop_gradient(backbone)
  return lambda lora, x, t, y: apply(merge(spec, backbone, lora, defer), x, t, y)
