"""Wan2.2 A14B distillation task: MoE teacher, per-phase fakes and LoRA experts, prompt embeddings.

``parts(config, sched)`` builds what ``trainer.build`` needs for ``teacher.type == "wan"``:

- teacher: the two diffusers experts (``transformer`` = high noise, ``transformer_2`` = low
  noise) as one ``teachers.MoETeacher`` whose params are the tuple (high, low); sample i is
  routed by its t (high if t >= boundary), CFG against the negative-prompt embedding.
- fakes (``net`` / ``init_params``): every phase's fake score is an MoE pair (high copy, low
  copy) initialised from the teacher and routed by t like it (spec §3.4: "teacher and fake
  ... chosen by the re-noising t"). The engine keeps one fake per phase with one structure,
  so a phase whose re-noise range touches one expert only (Wan2.2 phase 1 with the t >=
  boundary clamp) still carries the other copy, untouched (zero gradients): one idle expert
  copy plus its AdamW moments per such phase (14B params, 168 GB in fp32 over the mesh).
- phase-1 re-noise t: the paper clamps t = max(t, boundary) (``t_sampler.phase1_floor``,
  ``floor_mode="clamp"``), so phase 1 only ever queries the high-noise teacher and fake, and
  a point mass of (u* - u_1)/(1 - u_1) of the draws sits exactly on the boundary (u* =
  unshift_5(boundary): 1/6 for 0.875, 2/7 for 0.9; spec §7 item 9). ``floor_mode="resample"``
  draws u uniformly above u* instead (no point mass).
- shared-backbone option (``fake.lora_rank`` > 0): each phase's fake is a (high, low) pair of
  LoRA trees on the frozen teacher experts instead of full copies (``_fakes_apply``); set
  ``fake.lr`` like a LoRA's (the paper's 4e-7 is for full weights).
- generator experts: LoRA trees (``generator.lora_*``) on the teacher expert that owns the
  phase's grid times (phase 1 -> high noise, the last phase -> low noise); ``expert_apply``
  returns one apply per phase. A phase whose grid steps straddle the boundary is rejected by
  config validation (one LoRA cannot sit on two backbones).
- conditioning: ``cond_fn(key, shape)`` draws prompt indices and gathers their precomputed
  umT5 embeddings (``load_embeddings``; format below) as the pytree
  ``{"index": [*shape], "context": [*shape, L, D], "negative": [*shape, L_neg, D]}`` (+
  ``"condition": [*shape, C, F, h, w]`` for I2V). Embeddings are zero-padded to
  ``data.text_len`` (512, as diffusers' WanPipeline) inside the model call, so y stays small.

Embeddings file (``data.embeddings``; written by scripts/write_wan_embeddings.py), format
``pdmd_jax.wan_embeddings.v1``, a .safetensors (or .npz) file with
  context    [N, L, D]  umT5 last hidden states (bf16/fp16/fp32), positions past each
             prompt's token count zeroed (as WanPipeline.encode_prompt); L <= text_len
  negative   [L', D]    optional: the negative prompt's embedding (CFG's unconditional branch)
  condition  [N, C, F, h, w] optional (I2V): WanImageToVideoPipeline's ``condition`` latent
             (4 mask + 16 VAE channels for Wan2.2 I2V-A14B) per prompt
and metadata (safetensors string metadata / npz 0-d string arrays): ``format``, ``prompts``
(JSON list of N strings), ``negative_prompt``, ``encoder``, ``text_len``.
The table lives on the accelerators (a constant of the conditioning sampler), so keep it to a
few GB: e.g. 2,000 prompts x 128 tokens x 4096 x bf16 = 2 GB.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdmd_jax import teachers

TASKS = ("t2v", "i2v")
FORMAT = "pdmd_jax.wan_embeddings.v1"
HF_REPOS = {"t2v": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "i2v": "Wan-AI/Wan2.2-I2V-A14B-Diffusers"}
BOUNDARIES = {"t2v": 0.875, "i2v": 0.9}     # model_index.json boundary_ratio of each repo
VAE_STRIDE = (4, 8, 8)                       # Wan2.1 VAE (used by Wan2.2 A14B): frames, h, w
EXPERT_DIRS = ("transformer", "transformer_2")   # high noise, low noise
WEIGHTS = "diffusion_pytorch_model"
# I2V condition channels of the tiny model (1 mask + 4 latent; Wan2.2 I2V-A14B: 4 + 16).
TINY_CONDITION_CHANNELS = 5
# Wan's own default negative prompt (Wan2.1/2.2 shared_config.sample_neg_prompt).
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
                       "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
                       "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


# ============================================================================================
# Files: weights and latent shapes
# ============================================================================================

def latent_shape(channels: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
  """[C, F, h, w] of a Wan latent: 81 frames at 480 x 832 -> [16, 21, 60, 104]."""
  st, sh, sw = VAE_STRIDE
  return (channels, (num_frames - 1) // st + 1, height // sh, width // sw)


def missing_weights(root: str) -> list[str]:
  """What of a diffusers Wan2.2 A14B root is missing (empty when loadable)."""
  out = []
  if not os.path.isfile(os.path.join(root, "model_index.json")):
    out.append(os.path.join(root, "model_index.json"))
  for sub in EXPERT_DIRS:
    d = os.path.join(root, sub)
    if not os.path.isfile(os.path.join(d, "config.json")):
      out.append(os.path.join(d, "config.json"))
    index = os.path.join(d, WEIGHTS + ".safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      out += [os.path.join(d, s) for s in shards if not os.path.isfile(os.path.join(d, s))]
    elif not (os.path.isdir(d) and any(n.endswith(".safetensors") for n in os.listdir(d))):
      out.append(os.path.join(d, WEIGHTS + ".safetensors (or sharded *.safetensors + "
                              f"{WEIGHTS}.safetensors.index.json)"))
  return out


def weights_message(root: str, task: str, missing: list[str]) -> str:
  repo = HF_REPOS[task]
  return (
      f"config.teacher.path={root!r}: the Wan2.2 {task.upper()}-A14B diffusers weights are not "
      "there. Looked for model_index.json, transformer/config.json + "
      f"transformer/{WEIGHTS}*.safetensors (high-noise expert) and transformer_2/config.json + "
      f"transformer_2/{WEIGHTS}*.safetensors (low-noise expert); missing:\n  "
      + "\n  ".join(missing) +
      "\nGet them with\n"
      f"  huggingface-cli download {repo} --local-dir {root} "
      "--include 'model_index.json' 'transformer/*' 'transformer_2/*'\n"
      "(the text encoder is only needed by scripts/write_wan_embeddings.py), or point "
      "--config.teacher.path at your copy. `--config=configs/wan22.py:tiny` runs without any "
      "weights (a random 2-layer Wan and random stand-in embeddings).")


def embeddings_message(path: str, task: str) -> str:
  return (
      f"config.data.embeddings={path!r}: no prompt-embedding file there. Write one with\n"
      f"  python scripts/write_wan_embeddings.py --prompts prompts.txt "
      f"--model {HF_REPOS[task]} --out {path or 'prompts.safetensors'}\n"
      "(umT5 from the diffusers repo's text_encoder/, run anywhere with torch + transformers), "
      "or from a .npy the encoder you use wrote (--from_npy). `:tiny` uses random stand-in "
      "embeddings instead.")


# ============================================================================================
# Prompt embeddings
# ============================================================================================

@dataclasses.dataclass
class Embeddings:
  """Precomputed text conditioning (numpy; see the module docstring for the file format)."""
  context: np.ndarray                     # [N, L, D]
  negative: np.ndarray | None = None      # [L', D]
  condition: np.ndarray | None = None     # [N, C, F, h, w] (I2V)
  prompts: list[str] = dataclasses.field(default_factory=list)
  negative_prompt: str = ""
  encoder: str = ""
  text_len: int = 512

  def __post_init__(self):
    if self.context.ndim != 3:
      raise ValueError(f"embeddings: context must be [N, L, D]; got shape {self.context.shape}")
    if self.negative is not None:
      if self.negative.ndim == 3 and self.negative.shape[0] == 1:
        self.negative = self.negative[0]
      if self.negative.ndim != 2 or self.negative.shape[-1] != self.context.shape[-1]:
        raise ValueError(f"embeddings: negative must be [L, {self.context.shape[-1]}]; got "
                         f"{self.negative.shape}")
    if self.condition is not None and (self.condition.ndim != 5
                                       or self.condition.shape[0] != self.context.shape[0]):
      raise ValueError(f"embeddings: condition must be [N={self.context.shape[0]}, C, F, h, w]; "
                       f"got {self.condition.shape}")
    if self.prompts and len(self.prompts) != self.context.shape[0]:
      raise ValueError(f"embeddings: {len(self.prompts)} prompts for {self.context.shape[0]} "
                       "context rows")

  @property
  def num(self) -> int:
    return self.context.shape[0]

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in (self.context, self.negative, self.condition) if a is not None)


def trim(context: np.ndarray) -> np.ndarray:
  """Drops the trailing token positions that are zero for every prompt (the zero padding)."""
  nonzero = np.any(np.asarray(context, np.float32) != 0, axis=(0, 2))
  n = int(np.max(np.nonzero(nonzero)[0])) + 1 if nonzero.any() else 1
  return context[:, :n]


def save_embeddings(path: str, emb: Embeddings):
  """Writes ``emb`` as .safetensors (any dtype) or .npz (bf16 stored as fp32)."""
  meta = {"format": FORMAT, "prompts": json.dumps(list(emb.prompts), ensure_ascii=False),
          "negative_prompt": emb.negative_prompt, "encoder": emb.encoder,
          "text_len": str(emb.text_len)}
  arrays = {"context": emb.context}
  if emb.negative is not None:
    arrays["negative"] = emb.negative
  if emb.condition is not None:
    arrays["condition"] = emb.condition
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".npz"):
    np_ok = lambda a: a if a.dtype in (np.float16, np.float32, np.float64) else a.astype(np.float32)
    np.savez(path, **{k: np_ok(np.asarray(v)) for k, v in arrays.items()},
             **{k: np.asarray(v) for k, v in meta.items()})
  elif path.endswith(".safetensors"):
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path, metadata=meta)
  else:
    raise ValueError(f"{path}: the embeddings file must end in .safetensors or .npz")


def load_embeddings(path: str) -> Embeddings:
  """Reads a file written by ``save_embeddings`` (format ``pdmd_jax.wan_embeddings.v1``)."""
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    meta = {k: str(arrays.pop(k)) for k in ("format", "prompts", "negative_prompt", "encoder",
                                            "text_len") if k in arrays}
  else:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(path, framework="np") as f:
      arrays = {k: f.get_tensor(k) for k in f.keys()}
      meta = f.metadata() or {}
  if meta.get("format", FORMAT) != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}; expected {FORMAT!r}")
  if "context" not in arrays:
    raise ValueError(f"{path}: no 'context' tensor [N, L, D]; has {sorted(arrays)}")
  unknown = sorted(set(arrays) - {"context", "negative", "condition"})
  if unknown:
    raise ValueError(f"{path}: unexpected tensors {unknown}; allowed: context, negative, condition")
  return Embeddings(context=arrays["context"], negative=arrays.get("negative"),
                    condition=arrays.get("condition"),
                    prompts=json.loads(meta.get("prompts", "[]")),
                    negative_prompt=meta.get("negative_prompt", ""),
                    encoder=meta.get("encoder", ""), text_len=int(meta.get("text_len", 512)))


def embedding_shapes(path: str) -> dict[str, tuple[int, ...] | None]:
  """{"context", "negative", "condition"} shapes of an embeddings file (headers only for
  .safetensors), for validation before anything is loaded."""
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        shapes = {k: f[k].shape for k in ("context", "negative", "condition") if k in f.files}
    else:
      from safetensors import safe_open  # pylint: disable=import-outside-toplevel
      with safe_open(path, framework="np") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
    raise ValueError(f"config.data.embeddings={path!r}: not a readable .safetensors or .npz "
                     f"embeddings file ({type(e).__name__}: {e})") from None
  if "context" not in shapes:
    raise ValueError(f"config.data.embeddings={path!r}: no 'context' tensor [N, L, D]; has "
                     f"{sorted(shapes)}")
  neg = shapes.get("negative")
  if neg is not None and len(neg) == 3 and neg[0] == 1:
    neg = neg[1:]
  return {"context": tuple(shapes["context"]), "negative": neg,
          "condition": shapes.get("condition")}


def random_embeddings(num: int, length: int, dim: int, *, seed: int = 0,
                      condition_shape: tuple[int, ...] | None = None) -> Embeddings:
  """A deterministic stand-in (tiny runs): unit-normal tokens, random prompt lengths, zero pad."""
  rng = np.random.default_rng(seed)
  ctx = rng.standard_normal((num, length, dim)).astype(np.float32)
  lens = rng.integers(max(1, length // 4), length + 1, num)
  ctx[np.arange(length)[None, :] >= lens[:, None]] = 0.0
  neg = rng.standard_normal((length, dim)).astype(np.float32)
  neg[length // 2:] = 0.0
  cond = (None if condition_shape is None else
          rng.standard_normal((num, *condition_shape)).astype(np.float32))
  return Embeddings(context=ctx, negative=neg, condition=cond,
                    prompts=[f"random prompt {i}" for i in range(num)],
                    negative_prompt="random negative", encoder=f"random(seed={seed})",
                    text_len=length)


def make_cond_fn(emb: Embeddings, use_negative: bool = True):
  """(key, shape) -> {"index", "context", ["negative"], ["condition"]}, prompts drawn uniformly."""
  context, negative = emb.context, emb.negative if use_negative else None
  if negative is not None:   # one token count for both (CFG swaps them): zero-pad the shorter
    n = max(context.shape[1], negative.shape[0])
    context = np.pad(context, ((0, 0), (0, n - context.shape[1]), (0, 0)))
    negative = np.pad(negative, ((0, n - negative.shape[0]), (0, 0)))

  def cond_fn(key, shape):
    idx = jax.random.randint(key, shape, 0, emb.num)
    y = {"index": idx, "context": jnp.asarray(context)[idx]}
    if negative is not None:
      y["negative"] = jnp.broadcast_to(jnp.asarray(negative), tuple(shape) + negative.shape)
    if emb.condition is not None:
      y["condition"] = jnp.asarray(emb.condition)[idx]
    return y
  return cond_fn


def negative_cond(y):
  """CFG's unconditional branch: the negative prompt's embedding in place of the prompt's."""
  return {**y, "context": y["negative"]}


# ============================================================================================
# Networks
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


@dataclasses.dataclass(frozen=True, eq=False)
class MoENet:
  """The fake scores: params (high copy, low copy), each sample routed by t (``moe_apply``)."""
  net: WanNet
  boundary: float
  route: str = "switch"

  def apply(self, params, x, t, y):
    return teachers.moe_apply(self.net.apply, self.net.apply, self.boundary, self.route)(
        params, x, t, y)


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
          "num_phases 2 or 4)")
    out.append(sides.pop())
  return tuple(out)


def wan_config(config, arch: dict | None = None):
  """Our WanConfig: the architecture (a diffusers config dict or the tiny one) + numerics."""
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  m = config.model
  numerics = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                  remat=m.remat)
  if arch is None:
    cond = TINY_CONDITION_CHANNELS if config.teacher.task == "i2v" else 0
    return wan.tiny(in_channels=4 + cond, **numerics)
  return wan.WanConfig.from_diffusers(arch, **numerics)


def random_params(cfg, seed: int):
  """Random parameters of a Wan (numpy, host): kernels N(0, 1/fan_in), norm scales 1 + 0.1 n,
  biases 0.1 n, modulation tables n / sqrt(dim). Far cheaper than tracing the module's init."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(wan.abstract_params(cfg))
  out = {}
  for path, leaf in flat.items():
    n = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1]
    if name == "kernel":
      x = n / np.sqrt(leaf.shape[-2])
    elif name == "scale":
      x = 1.0 + 0.1 * n
    elif name == "bias":
      x = 0.1 * n
    elif name == "scale_shift_table":
      x = n / np.sqrt(leaf.shape[-1])
    else:
      x = 0.02 * n
    out[path] = x.astype(leaf.dtype)
  return traverse_util.unflatten_dict(out)


def _random_teacher_root(config) -> str:
  """Two random tiny experts written as a diffusers Wan2.2 root (the real loader then reads it)."""
  from pdmd_jax.convert import wan as convert  # pylint: disable=import-outside-toplevel
  cfg = wan_config(config)
  root = tempfile.mkdtemp(prefix="pdmd_wan_tiny_")
  for i, sub in enumerate(EXPERT_DIRS):
    convert.export_diffusers(random_params(cfg, config.teacher.seed + i), cfg,
                             os.path.join(root, sub))
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "WanPipeline", "boundary_ratio": config.teacher.boundary}, f)
  return root


def load_teacher(config):
  """(WanConfig, (high params, low params)): the diffusers root, or random tiny experts.

  Real weights are placed leaf by leaf on the run's FSDP shardings over all devices
  (``sharding.tree_shardings``, exactly what the trainer then asks for), so no device holds a
  whole expert.
  """
  from pdmd_jax import config_lib  # pylint: disable=import-outside-toplevel
  from pdmd_jax import sharding as sh  # pylint: disable=import-outside-toplevel
  from pdmd_jax.convert import wan as convert  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  t = config.teacher
  root = _random_teacher_root(config) if t.random else t.path
  try:
    cfg = wan_config(config, convert.read_config(os.path.join(root, EXPERT_DIRS[0])))
    shardings = None
    if not t.random:
      devices = jax.devices()
      mesh = sh.make_mesh(*config_lib.mesh_shape(config, len(devices)), devices=devices)
      shardings = sh.tree_shardings(mesh, wan.abstract_params(cfg))
    experts = tuple(convert.load_expert(os.path.join(root, sub), cfg, shardings)
                    for sub in EXPERT_DIRS)
  finally:
    if t.random:
      shutil.rmtree(root, ignore_errors=True)
  return cfg, experts


def _lora_apply(apply, spec, backbone):
  from pdmd_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  return lambda lora, x, t, y: apply(lora_lib.merge(spec, backbone, lora), x, t, y)


def _experts_apply(apply, spec, owners, teacher_params):
  """One apply per phase: the owning teacher expert (frozen) with the phase's LoRA merged in."""
  backbones = jax.lax.stop_gradient(teacher_params)
  return tuple(_lora_apply(apply, spec, backbones[e]) for e in owners)


def embeddings_for(config, cfg) -> Embeddings:
  """The configured embeddings file, or the seeded random stand-in (data.embeddings == "")."""
  d = config.data
  if d.embeddings:
    return load_embeddings(d.embeddings)
  cond = cfg.in_channels - cfg.out_channels
  shape = latent_shape(cond, d.num_frames, d.height, d.width) if cond else None
  return random_embeddings(d.random_prompts, d.random_length, cfg.text_dim,
                           seed=config.seed + 11, condition_shape=shape)


def parts(config, sched) -> dict:  # pylint: disable=unused-argument
  """The trainer's parts for ``teacher.type == "wan"`` (see the module docstring)."""
  from pdmd_jax import config_lib  # pylint: disable=import-outside-toplevel
  from pdmd_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  t, g, d = config.teacher, config.generator, config.data
  plan = config_lib.validate(config)
  owners = expert_of_phases(plan, t.boundary)
  cfg, experts = load_teacher(config)     # validate() checked the embeddings against cfg
  emb = embeddings_for(config, cfg)
  net = WanNet(_graphdef(cfg), d.text_len)
  teacher = teachers.moe_teacher(net.apply, net.apply, t.boundary, t.guidance_scale,
                                 negative_cond, guidance_scale_low=t.guidance_scale_low,
                                 route=t.route)
  out = {"kind": "latent", "teacher": teacher, "teacher_params": experts,
         "net": MoENet(net, t.boundary, t.route), "init_params": experts,
         "sample_shape": latent_shape(cfg.out_channels, d.num_frames, d.height, d.width),
         "num_classes": 0, "cond_fn": make_cond_fn(emb, _uses_cfg(config)),
         "wan_config": cfg, "embeddings": emb}
  if g.lora_rank > 0:
    spec = lora_lib.LoraSpec(((g.lora_targets, g.lora_rank, g.lora_alpha),))
    out["expert_init"] = lora_lib.init(spec, experts[0], jax.random.PRNGKey(config.seed + 7))
    out["expert_apply"] = functools.partial(_experts_apply, net.apply, spec, owners)
  f = config.fake
  if f.get("lora_rank", 0) > 0:   # shared backbone: a LoRA pair on the frozen teacher experts
    spec = lora_lib.LoraSpec(((f.lora_targets, f.lora_rank, f.lora_alpha),))
    key = jax.random.PRNGKey(config.seed + 11)
    out["expert_init"] = out.get("expert_init", experts)       # full-copy experts stay full
    out["init_params"] = tuple(lora_lib.init(spec, e, jax.random.fold_in(key, i))
                               for i, e in enumerate(experts))
    out["fake_apply"] = functools.partial(_fakes_apply, net.apply, spec, t.boundary, t.route)
  return out


def _fakes_apply(apply, spec, boundary, route, teacher_params):
  """Shared-backbone fakes: params (high LoRA, low LoRA), each on its frozen teacher expert and
  routed by t like the teacher; no full expert copy or AdamW moments per phase."""
  backbones = jax.lax.stop_gradient(teacher_params)
  return teachers.moe_apply(_lora_apply(apply, spec, backbones[0]),
                            _lora_apply(apply, spec, backbones[1]), boundary, route)


def _uses_cfg(config) -> bool:
  t = config.teacher
  return t.guidance_scale != 1.0 or (t.guidance_scale_low not in (None, 1.0))


def _graphdef(cfg):
  from pdmd_jax.models import wan  # pylint: disable=import-outside-toplevel
  graphdef, _ = nnx.split(wan.abstract_model(cfg), nnx.Param)
  return graphdef


def teacher_arch(config):
  """Our WanConfig of the run, from teacher.path's transformer/config.json (or the tiny one)."""
  from pdmd_jax.convert import wan as convert  # pylint: disable=import-outside-toplevel
  if config.teacher.random:
    return wan_config(config)
  return wan_config(config, convert.read_config(os.path.join(config.teacher.path, EXPERT_DIRS[0])))


def check_inputs(config):
  """The embeddings fit the model and the config; raises ValueError naming the field.

  Reads only config.json and the embeddings' shapes: run by config validation, before any
  weight is loaded.
  """
  d = config.data
  cfg = teacher_arch(config)
  if d.embeddings:
    shapes, nbytes = embedding_shapes(d.embeddings), os.path.getsize(d.embeddings)
    where = f"config.data.embeddings={d.embeddings!r}"
  else:
    emb = embeddings_for(config, cfg)
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
  if _uses_cfg(config) and neg is None:
    raise ValueError(f"{where}: no 'negative' embedding, but teacher.guidance_scale != 1 needs "
                     "one for CFG (write it with --negative_prompt, '' for the empty prompt)")
  cond = cfg.in_channels - cfg.out_channels
  if cond and cond_shape is None:
    raise ValueError(f"{where}: the I2V model takes {cond} condition channels, but there is "
                     "no 'condition' tensor [N, C, F, h, w]")
  if cond_shape is not None:
    want = (ctx[0],) + latent_shape(cond, d.num_frames, d.height, d.width)
    if tuple(cond_shape) != want:
      raise ValueError(f"{where}: condition shape {tuple(cond_shape)} != {want} for "
                       f"{d.num_frames} frames at {d.height}x{d.width}")
  if nbytes > d.max_table_gb * 2**30:
    raise ValueError(f"{where}: {nbytes / 2**30:.1f} GB of embeddings > "
                     f"config.data.max_table_gb={d.max_table_gb}: the table is held on every "
                     "device; use fewer prompts (or raise the limit)")
