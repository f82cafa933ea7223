"""Wan2.2 A14B (T2V / I2V) in the diffusers layout: the paper's video teacher (configs/wan22.py).

- teacher: the two diffusers experts (``transformer`` = high noise, ``transformer_2`` = low
  noise) as one ``teachers.MoETeacher`` whose params are the tuple (high, low); sample i is
  routed by its t (high if t >= boundary), CFG against the negative-prompt embedding.
- fakes: every phase's fake score is an MoE pair (high copy, low copy) initialised from the
  teacher and routed by t like it (spec §3.4: "teacher and fake ... chosen by the re-noising
  t"); a phase whose re-noise range touches one expert only (phase 1 with the t >= boundary
  clamp) still carries the other copy, untouched (zero gradients). Shared-backbone option
  (``fake.lora_rank`` > 0): a (high, low) pair of LoRA trees on the frozen teacher experts.
- phase-1 re-noise t: the paper clamps t = max(t, boundary) (``t_sampler.phase1_floor``,
  ``floor_mode="clamp"``): a point mass of (u* - u_1)/(1 - u_1) of the draws sits exactly on
  the boundary (u* = unshift_5(boundary): 1/6 for 0.875, 2/7 for 0.9; spec §7 item 9).
- generator experts: LoRA trees on the teacher expert that owns the phase's grid times (phase
  1 -> high noise, the last phase -> low noise); a phase whose grid steps straddle the
  boundary is rejected by ``validate`` (one LoRA cannot sit on two backbones).
- conditioning: precomputed umT5 embeddings (``pdmd_jax.families.prompts``; ``data.embeddings``,
  or a seeded random stand-in for the tiny model), zero-padded to ``data.text_len`` (512, as
  diffusers' WanPipeline) inside the model call, so y stays small.
- sharding: every parameter carries logical axes (``models.wan.param_specs``); real weights are
  read leaf by leaf onto the run's shardings (no device holds a whole 14B expert).
"""

from __future__ import annotations

import dataclasses
import os
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pdmd_jax import families
from pdmd_jax import sharding as sh
from pdmd_jax import teachers
from pdmd_jax import validation as V
from pdmd_jax.families import common
from pdmd_jax.families import prompts
from pdmd_jax.families.wan22 import weights as W
from pdmd_jax.models import attention
from pdmd_jax.models import lora as lora_lib

NEEDED = ("teacher.task", "teacher.path", "teacher.random", "teacher.seed", "teacher.boundary",
          "teacher.guidance_scale_low", "teacher.route", "model.dtype", "model.param_dtype",
          "model.scan_layers", "model.remat", "generator.lora_rank", "generator.lora_alpha",
          "generator.lora_targets", "data.embeddings", "data.num_frames", "data.height",
          "data.width", "data.text_len", "data.random_prompts", "data.random_length",
          "data.max_table_gb", "eval.batch_size")


# ============================================================================================
# Validation
# ============================================================================================

def validate(config, plan, *, files: bool = True):
  """Every Wan field; then (``files``) the weights and embeddings exist and fit, shapes only."""
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  missing = [f for f in NEEDED if not V.has(config, f)]
  if missing:
    V.fail("teacher.type", "wan22", f"a config with every field of configs/wan22.py; missing {missing}")
  t, d = config.teacher, config.data
  V.choice(config, "teacher.task", W.TASKS)
  V.choice(config, "teacher.route", teachers.ROUTES)
  for f in ("teacher.random", "model.scan_layers"):
    if not isinstance(V.get(config, f), bool):
      V.fail(f, V.get(config, f), [True, False])
  if not 0.0 < t.boundary < 1.0:
    V.fail("teacher.boundary", t.boundary, "a number in (0, 1) (0.875 T2V-A14B, 0.9 I2V-A14B)")
  if t.guidance_scale_low is not None:
    V.positive(config, "teacher.guidance_scale_low", minimum=0.0)
  V.positive(config, "teacher.seed", integer=True, minimum=0)
  V.choice(config, "model.remat", tuple(wan.REMAT_POLICIES))
  for f in ("model.dtype", "model.param_dtype"):
    V.choice(config, f, ("float32", "bfloat16"))
  if V.has(config, "model.attention"):
    V.choice(config, "model.attention", attention.IMPLS)
  if V.get(config, "model").get("teacher_dtype"):
    V.choice(config, "model.teacher_dtype", ("", "float32", "bfloat16"))
  if V.has(config, "model.num_layers"):
    V.positive(config, "model.num_layers", integer=True, minimum=0)
  common.validate_lora(config)
  if config.fake.get("ida_lambda", 1.0) < 1.0:
    V.fail("fake.ida_lambda", config.fake.ida_lambda, "1.0 for Wan2.2 (IDA is not built for "
           "it: a fake is a high/low-noise pair re-noised across both teacher experts, while a "
           "phase's expert adapts one of them)")
  for f in ("data.num_frames", "data.height", "data.width", "data.text_len",
            "data.random_prompts", "data.random_length", "eval.batch_size"):
    V.positive(config, f, integer=True)
  V.positive(config, "data.max_table_gb")
  prompts.check_stream(config)
  st, s_h, _ = W.VAE_STRIDE
  if (d.num_frames - 1) % st:
    V.fail("data.num_frames", d.num_frames, f"1 + a multiple of {st} (e.g. 81 -> {81 // st + 1} "
           "latent frames)")
  for f in ("data.height", "data.width"):
    if V.get(config, f) % (2 * s_h):
      V.fail(f, V.get(config, f), f"a multiple of {2 * s_h} (VAE stride {s_h} x patch 2)")
  if d.random_length > d.text_len:
    V.fail("data.random_length", d.random_length, f"at most data.text_len={d.text_len}")
  if files and not t.random and not d.embeddings:
    V.fail("data.embeddings", d.embeddings, "a prompt-embedding file (scripts/"
           "write_wan_embeddings.py); '' (random stand-in) only with teacher.random=True (:tiny)")
  expert_of_phases(plan, t.boundary)   # each phase's generator on one expert
  if files:
    _check_files(config)               # last: every field is fine, files missing?


def _check_files(config):
  """Weights under teacher.path and the embeddings file exist (FileNotFoundError otherwise)."""
  from pdmd_jax.convert import wan as convert  # pylint: disable=import-outside-toplevel
  t, d = config.teacher, config.data
  problems = []
  if not t.random:
    missing = W.missing_weights(t.path)
    if missing:
      problems.append(W.weights_message(t.path, t.task, missing))
    else:
      ratio = convert.boundary_ratio(t.path)
      if ratio is not None and abs(ratio - t.boundary) > 1e-9:
        V.fail("teacher.boundary", t.boundary, f"{ratio} (boundary_ratio in {t.path}/"
               "model_index.json)")
  if d.embeddings and not os.path.isfile(d.embeddings):
    problems.append(W.embeddings_message(d.embeddings, t.task))
  if problems:
    raise FileNotFoundError("\n\n".join(problems))
  _check_inputs(config)   # embeddings vs config.json: shapes only, nothing loaded


def _check_inputs(config):
  """The embeddings fit the model and the config; raises ValueError naming the field.

  Reads only config.json and the embeddings' shapes: run by config validation, before any
  weight is loaded.
  """
  d = config.data
  cfg = W.architecture(config)
  if d.embeddings:
    shapes, nbytes = prompts.embedding_shapes(d.embeddings), os.path.getsize(d.embeddings)
    where = f"config.data.embeddings={d.embeddings!r}"
  else:
    emb = embeddings(config, cfg)
    shapes = {"context": emb.context.shape,
              "negative": None if emb.negative is None else emb.negative.shape,
              "condition": None if emb.condition is None else emb.condition.shape}
    nbytes, where = emb.nbytes, "the random stand-in embeddings"
  ctx, neg, cond_shape = shapes["context"], shapes["negative"], shapes["condition"]
  if len(ctx) != 3 or ctx[-1] != cfg.text_dim:
    raise ValueError(f"{where}: context shape {ctx} is not [N, L, text_dim={cfg.text_dim}] "
                     "(umT5-XXL: 4096)")
  if neg is not None and (len(neg) != 2 or neg[-1] != cfg.text_dim):
    raise ValueError(f"{where}: negative shape {neg} is not [L, {cfg.text_dim}]")
  longest = max(ctx[1], 0 if neg is None else neg[0])
  if longest > d.text_len:
    raise ValueError(f"{where}: {longest} tokens > config.data.text_len={d.text_len}")
  if uses_cfg(config) and neg is None:
    raise ValueError(f"{where}: no 'negative' embedding, but teacher.guidance_scale != 1 needs "
                     "one for CFG (write it with --negative_prompt, '' for the empty prompt)")
  cond = cfg.in_channels - cfg.out_channels
  if cond and cond_shape is None:
    raise ValueError(f"{where}: the I2V model takes {cond} condition channels, but there is "
                     "no 'condition' tensor [N, C, F, h, w]")
  if cond_shape is not None:
    want = (ctx[0],) + W.latent_shape(cond, d.num_frames, d.height, d.width)
    if tuple(cond_shape) != want:
      raise ValueError(f"{where}: condition shape {tuple(cond_shape)} != {want} for "
                       f"{d.num_frames} frames at {d.height}x{d.width}")
  held, what = nbytes, "the random stand-in is held on every device"
  if d.embeddings:
    held, what = prompts.table_bytes(d, shapes, nbytes)
  if held > d.max_table_gb * 2**30:
    raise ValueError(f"{where}: {held / 2**30:.1f} GB of embeddings > "
                     f"config.data.max_table_gb={d.max_table_gb}: {what}")


def expert_of_phases(plan, boundary: float) -> tuple[int, ...]:
  """Teacher expert (0 = high noise, 1 = low noise) under each phase's generator.

  Raises ValueError if a phase's grid times lie on both sides of the boundary.
  """
  out = []
  for p in plan.phases:
    sides = {0 if t >= boundary else 1 for t in p.times}
    if len(sides) > 1:
      raise ValueError(
          f"config.num_phases={plan.num_phases} is not allowed with teacher.boundary={boundary}: "
          f"phase {p.index + 1} runs at t={[round(t, 4) for t in p.times]}, on both experts; "
          "allowed: phases whose grid steps are all >= or all < the boundary (Wan2.2 4-step: "
          "num_phases 2 or 4; steps_per_phase moves the boundaries)")
    out.append(sides.pop())
  return tuple(out)


def tokens(cfg, data) -> int:
  """Video tokens of one sample: latent (F, h, w) over the patch (480 x 832 x 81: 32,760)."""
  _, f, h, w = W.latent_shape(cfg.out_channels, data.num_frames, data.height, data.width)
  pt, ph, pw = cfg.patch_size
  return (f // pt) * (h // ph) * (w // pw)


def teacher_dtype(config):
  """model.teacher_dtype, or "" = the compute dtype (model.dtype)."""
  return jnp.dtype(config.model.get("teacher_dtype") or config.model.dtype)


def _cast(tree, dtype):
  """The transformer blocks' linear layers in ``dtype`` (``common.cast_linears``)."""
  return common.cast_linears(tree, dtype, under="blocks")


def uses_cfg(config) -> bool:
  t = config.teacher
  return t.guidance_scale != 1.0 or (t.guidance_scale_low not in (None, 1.0))


# ============================================================================================
# Build
# ============================================================================================

@dataclasses.dataclass(frozen=True, eq=False)
class WanNet:
  """apply(params, x [B, C, F, h, w], t [B], y) of one Wan expert; hashable by identity.

  y["context"] is zero-padded to ``text_len`` tokens (diffusers pads umT5 states with zeros
  to 512, and Wan's cross-attention has no mask, so the padding is part of the model's
  input); y["condition"] (I2V) is concatenated to x on the channel axis.
  """
  graphdef: Any
  text_len: int

  def apply(self, params, x, t, y):
    model = nnx.merge(self.graphdef, nnx.State(params))
    if "condition" in y:
      x_in = jnp.concatenate([x, y["condition"].astype(x.dtype)], axis=1)
    else:
      x_in = x
    ctx = y["context"]
    if ctx.shape[1] < self.text_len:
      ctx = jnp.pad(ctx, ((0, 0), (0, self.text_len - ctx.shape[1]), (0, 0)))
    return model(x_in, t, ctx).astype(x.dtype)


def embeddings(config, cfg) -> prompts.Embeddings:
  """The configured embeddings file, or the seeded random stand-in (data.embeddings == "")."""
  d = config.data
  if d.embeddings:
    return prompts.load_embeddings(d.embeddings)
  cond = cfg.in_channels - cfg.out_channels
  shape = W.latent_shape(cond, d.num_frames, d.height, d.width) if cond else None
  return prompts.random_embeddings(d.random_prompts, d.random_length, cfg.text_dim,
                                   seed=config.seed + 11, condition_shape=shape)


def _abstract_cond(config, cfg):
  """Conditioning of the run's shapes without loading an embeddings file (AOT planning): the
  file's token count and dtype if it exists (headers only), else text_len tokens in the
  compute dtype; the random stand-in itself (it is small) for data.embeddings == ""."""
  d = config.data
  if not d.embeddings:
    return prompts.make_cond_fn(embeddings(config, cfg), uses_cfg(config))
  dtype, length = jnp.dtype(config.model.dtype), d.text_len
  if os.path.isfile(d.embeddings):
    shapes = prompts.embedding_shapes(d.embeddings)
    neg = shapes["negative"]
    length = max(shapes["context"][1], neg[0] if neg is not None and uses_cfg(config) else 0)
    dtype = jnp.dtype(shapes["dtype"])
  cond = cfg.in_channels - cfg.out_channels

  def sample_cond(key, shape):
    k1, k2, k3 = jax.random.split(key, 3)
    txt = (*shape, length, cfg.text_dim)
    y = {"index": jax.random.randint(k1, shape, 0, 1000),
         "context": jax.random.normal(k2, txt, dtype)}
    if uses_cfg(config):
      y["negative"] = jnp.zeros(txt, dtype)
    if cond:
      y["condition"] = jax.random.normal(
          k3, (*shape,) + W.latent_shape(cond, d.num_frames, d.height, d.width))
    return y
  return sample_cond


# LoRA kernels inside the transformer blocks are merged per layer inside the layer scan.
BLOCKS = r"blocks\..*"


def build(config, plan, mesh, *, abstract: bool = False, workdir: str | None = None):  # pylint: disable=unused-argument
  """The MoE teacher, per-phase MoE fake pairs and LoRA experts (see the module docstring)."""
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  t, d = config.teacher, config.data
  owners = expert_of_phases(plan, t.boundary)
  files = not abstract or W.missing_weights(t.path) == []
  cfg = W.architecture(config, files=files)
  axes = jax.tree.map(tuple, wan.param_specs(cfg),
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  expert = wan.abstract_params(cfg)
  if abstract:
    experts = (expert, expert)
    sample_cond, cond_data = _abstract_cond(config, cfg), None
  else:
    shardings = sh.logical_shardings(mesh, expert, axes) if not t.random else None
    cfg, experts = W.load_teacher(config, shardings)
    sample_cond, cond_data = prompts.conditioning(d, lambda: embeddings(config, cfg),
                                                  uses_cfg(config))
  # The frozen teacher's block weights (also the LoRA experts' backbone) in the compute dtype;
  # trainable copies (full fakes) and their moments stay in model.param_dtype.
  teacher_params = _cast(experts, teacher_dtype(config))
  net = WanNet(nnx.split(wan.abstract_model(cfg), nnx.Param)[0], d.text_len)
  teacher = teachers.moe_teacher(net.apply, net.apply, t.boundary, t.guidance_scale,
                                 prompts.negative_cond, guidance_scale_low=t.guidance_scale_low,
                                 route=t.route)
  moe = teachers.moe_apply(net.apply, net.apply, t.boundary, t.route)
  out = {"expert_init": experts, "expert_axes": (axes, axes), "expert_apply": None,
         "fake_init": experts, "fake_axes": (axes, axes), "fake_apply": None}
  spec = common.lora_spec(config.generator)
  if spec is not None:   # one LoRA per phase on the teacher expert that owns the phase
    out["expert_init"] = common.lora_init(spec, experts[0], jax.random.PRNGKey(config.seed + 7),
                                          abstract)
    out["expert_axes"] = sh.lora_axes(out["expert_init"], axes)
    out["expert_apply"] = lambda tp: tuple(
        lora_lib.apply_on(net.apply, spec, tp[e], BLOCKS) for e in owners)
  spec_f = common.lora_spec(config.fake)
  if spec_f is not None:   # shared backbone: a LoRA pair on the frozen teacher experts
    key = jax.random.PRNGKey(config.seed + 11)
    out["fake_init"] = tuple(common.lora_init(spec_f, e, jax.random.fold_in(key, i), abstract)
                             for i, e in enumerate(experts))
    out["fake_axes"] = (sh.lora_axes(out["fake_init"][0], axes),) * 2
    out["fake_apply"] = lambda tp: teachers.moe_apply(
        lora_lib.apply_on(net.apply, spec_f, tp[0], BLOCKS),
        lora_lib.apply_on(net.apply, spec_f, tp[1], BLOCKS),
        t.boundary, t.route)
  return families.Family(
      name="wan22", teacher=teacher, teacher_params=teacher_params, teacher_axes=(axes, axes),
      apply=moe, sample_shape=W.latent_shape(cfg.out_channels, d.num_frames, d.height, d.width),
      attention_shape=(tokens(cfg, d), cfg.num_attention_heads),
      sample_cond=sample_cond, cond_data=cond_data, evaluator="latent_eval",
      extras=MappingProxyType({"wan_config": cfg, "expert_net": net}), **out)
