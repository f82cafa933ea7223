"""Pieces every network family shares: LoRA experts, shared-backbone fakes, their validation.

A generator expert is either a full copy of the teacher (``generator.lora_rank = 0``) or a LoRA
tree on the frozen teacher backbone; a fake score is a full copy (the paper) or, in
shared-backbone mode (``fake.lora_rank > 0``), a LoRA tree on the frozen teacher. A family
with several teacher experts (Wan2.2's MoE) passes the backbone each phase sits on.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax

from pdmd_jax import sharding as sh
from pdmd_jax import validation as V
from pdmd_jax.models import lora as lora_lib


def validate_lora(config):
  """generator.lora_* and (if present) fake.lora_*: rank >= 0, alpha > 0, a regex."""
  for who in ("generator", "fake"):
    if "lora_rank" not in config[who]:
      continue                 # full copies (configs without the LoRA option)
    V.positive(config, f"{who}.lora_rank", integer=True, minimum=0)
    if V.get(config, f"{who}.lora_rank"):
      V.positive(config, f"{who}.lora_alpha")
      try:
        re.compile(V.get(config, f"{who}.lora_targets"))
      except (re.error, TypeError) as e:
        V.fail(f"{who}.lora_targets", V.get(config, f"{who}.lora_targets"),
               f"a regular expression ({e})")


def lora_spec(block) -> lora_lib.LoraSpec | None:
  """The LoRA of a config block (generator or fake), None for full-parameter copies."""
  if block.get("lora_rank", 0) <= 0:
    return None
  return lora_lib.LoraSpec(((block.lora_targets, block.lora_rank, block.lora_alpha),))


def lora_init(spec, params, key, abstract: bool):
  """A zero-effect LoRA tree on ``params`` (ShapeDtypeStructs when ``abstract``)."""
  init = lambda p: lora_lib.init(spec, p, key)
  return jax.eval_shape(init, params) if abstract else init(params)


def adapters(config, apply: Callable, params, axes, *, abstract: bool,
             expert_backbone: Callable | None = None, defer: str | None = None) -> dict[str, Any]:
  """Experts and fakes on one teacher parameter tree (``params``, logical ``axes``).

  Returns the Family fields expert_init/expert_axes/expert_apply/expert_merge and fake_init/
  fake_axes/fake_apply/fake_merge: full copies of ``params`` (apply None) or LoRA trees (apply:
  teacher_params -> the adapted network; merge: teacher_params -> the merged parameters).
  ``expert_backbone(teacher_params)`` picks the expert's backbone out of the teacher's
  parameters (default: all of them). ``defer``: a regex of kernel paths the model merges per
  layer inside its layer scan (``lora.Deferred``; a scanned model's blocks), so the adapted
  network never holds a merged copy of every layer at once.
  """
  backbone = expert_backbone or (lambda tp: tp)
  out = {"expert_init": params, "expert_axes": axes, "expert_apply": None, "expert_merge": None,
         "fake_init": params, "fake_axes": axes, "fake_apply": None, "fake_merge": None}
  spec = lora_spec(config.generator)
  if spec is not None:
    out["expert_init"] = lora_init(spec, params, jax.random.PRNGKey(config.seed + 7), abstract)
    out["expert_axes"] = None if axes is None else sh.lora_axes(out["expert_init"], axes)
    out["expert_apply"] = lambda tp: lora_lib.apply_on(apply, spec, backbone(tp), defer)
    out["expert_merge"] = lambda tp: lambda lora: lora_lib.merge(
        spec, jax.lax.stop_gradient(backbone(tp)), lora)
  spec_f = lora_spec(config.fake)
  if spec_f is not None:   # shared backbone: LoRA fakes on the frozen teacher
    out["fake_init"] = lora_init(spec_f, params, jax.random.PRNGKey(config.seed + 11), abstract)
    out["fake_axes"] = None if axes is None else sh.lora_axes(out["fake_init"], axes)
    out["fake_apply"] = lambda tp: lora_lib.apply_on(apply, spec_f, backbone(tp), defer)
    out["fake_merge"] = lambda tp: lambda lora: lora_lib.merge(
        spec_f, jax.lax.stop_gradient(backbone(tp)), lora)
  return out


def perturbed(params, seed: int = 0, scale: float = 0.05):
  """Random non-zero weights everywhere (a fresh DiT outputs exactly 0: adaLN-Zero)."""
  def fn(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])
  return jax.jit(fn)(params)   # one compile, not one per leaf


def cast_linears(tree, dtype, under: str):
  """The Linear layers (kernel and bias) below the key ``under`` (a model's blocks) in ``dtype``.

  For a frozen teacher computing in ``dtype``: its matmuls cast the weights there anyway, so
  the velocities are unchanged while the blocks take half the memory in bf16. Norms,
  modulation tables and embedders keep their dtype. Returns ``tree`` itself when nothing
  changes (a full-copy fake then shares the teacher's arrays). Abstract trees stay abstract.
  """
  dtype = jax.numpy.dtype(dtype)

  def to(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)

  def walk(node, inside):
    if isinstance(node, (tuple, list)):
      return type(node)(walk(n, inside) for n in node)
    if not isinstance(node, dict):
      return node
    if inside and "kernel" in node:              # a Linear: kernel [+ bias]
      return {k: to(v) if k in ("kernel", "bias") else v for k, v in node.items()}
    return {k: walk(v, inside or k == under) for k, v in node.items()}

  if all(x.dtype == dtype for x in jax.tree.leaves(tree)):
    return tree
  return walk(tree, False)
