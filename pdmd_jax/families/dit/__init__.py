"""The project's own DiT teachers: MNIST digits (configs/mnist.py) and moving digits (configs/video.py).

The teacher is a trained DiT read from ``teacher.path`` (its card.json + params.safetensors;
"" = the shipped assets/mnist_teacher), or, with ``teacher.arch`` set to DiTConfig fields, a
random DiT of that architecture with every weight perturbed by N(0, teacher.perturb) (AOT
planning, benchmarks and sharding tests: no file needed). Fakes are full copies of the teacher
(or shared-backbone LoRA fakes), experts LoRA on it (or full copies). With
``teacher.unconditional`` the run distils the teacher's null class only (its unconditional
branch): the digits' ten classes become modes the few-step sampler must cover. Every parameter
carries logical axes (models/dit.py), so the mesh may use every axis (data, fsdp, tensor,
context).
"""

from __future__ import annotations

import dataclasses
import os
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np

from pdmd_jax import assets
from pdmd_jax import families
from pdmd_jax import models
from pdmd_jax import noise
from pdmd_jax import teachers
from pdmd_jax import validation as V
from pdmd_jax.evaluation import image_metrics
from pdmd_jax.families import common
from pdmd_jax.models import attention
from pdmd_jax.models import dit as dit_lib


def validate(config, plan, *, files: bool = True):  # pylint: disable=unused-argument
  t = config.teacher
  arch = dict(t.get("arch") or {})
  if arch:
    fields = {f.name for f in dataclasses.fields(dit_lib.DiTConfig)}
    unknown = sorted(set(arch) - fields)
    if unknown:
      V.fail("teacher.arch", arch, f"DiTConfig fields {sorted(fields)} (unknown: {unknown})")
    V.positive(config, "teacher.perturb", minimum=0.0)
  elif t.path and not os.path.exists(os.path.join(t.path, "card.json")):
    V.fail("teacher.path", t.path, "'' (the shipped MNIST teacher) or a directory with card.json "
           "and params.safetensors (train one: python main.py --config=configs/mnist_teacher.py "
           "or --config=configs/video_teacher.py --workdir=DIR; it is written to config.out_dir)")
  V.choice(config, "model.name", ("dit",))
  if V.has(config, "teacher.cfg_norm"):
    V.choice(config, "teacher.cfg_norm", teachers.CFG_NORMS)
  if V.has(config, "model.attention"):
    V.choice(config, "model.attention", attention.IMPLS)
  for f in ("model.remat", "model.scan_layers"):
    if not isinstance(V.get(config, f), bool):
      V.fail(f, V.get(config, f), [True, False])
  if not arch and (config.model.remat or config.model.scan_layers):
    V.fail("model.scan_layers", config.model.scan_layers, "False with model.remat=False for a "
           "trained teacher (its weights are unscanned); both may be set with teacher.arch")
  common.validate_lora(config)
  if unconditional(config):
    if arch and not arch.get("num_classes"):
      V.fail("teacher.unconditional", True, "False for a teacher without classes")
    if dit_config(config)[0].video:
      V.fail("teacher.unconditional", True, "False for a video teacher (its evaluation reads "
             "every frame's intended class)")
    if t.guidance_scale != 1.0:
      V.fail("teacher.guidance_scale", t.guidance_scale, "1.0 with teacher.unconditional=True "
             "(the null class has no conditional branch to guide towards)")
    if config.get("gan") is not None and config.gan.enabled:
      V.fail("gan.enabled", True, "False with teacher.unconditional=True (real digits carry "
             "classes)")
  if config.get("gan") is not None and config.gan.enabled:
    depth = dit_config(config)[0].depth
    if config.gan.layer > depth:
      V.fail("gan.layer", config.gan.layer, f"-1 (the middle block) or a block in 0..{depth}")


def unconditional(config) -> bool:
  """teacher.unconditional: distil the null class only (the teacher's unconditional branch)."""
  value = config.teacher.get("unconditional", False)
  if not isinstance(value, bool):
    V.fail("teacher.unconditional", value, [True, False])
  return value


def has_features(config) -> bool:
  """Digits (32 x 32 x 1, 10 classes) have the shipped classifier's features (the ODE anchor's
  "features" distance); moving-digit clips do not."""
  cfg, _ = dit_config(config)
  return tuple(cfg.sample_shape) == (32, 32, 1) and cfg.num_classes == 10


def has_gan(config) -> bool:
  """The GAN term needs real data of the teacher's kind (a trained teacher of digits or clips)
  and unscanned blocks (its tokens are read after a middle block)."""
  cfg, card = dit_config(config)
  return card is not None and not cfg.scan_layers


def _real_data(cfg: dit_lib.DiTConfig, card: dict, gan):
  """(batch_size, seed) -> MapDataset of real batches through the teacher's own data pipeline:
  the MNIST training digits, or moving-digit clips of them with the card's clip settings; or
  the prepared tfds dataset gan.data_source ('tfds:NAME')."""
  def make(batch_size: int, seed: int):
    from pdmd_jax.data import mnist, moving_digits, tfds_data  # pylint: disable=import-outside-toplevel
    if tfds_data.is_tfds(gan.get("data_source", "")):
      src = {"source": gan.data_source, "tfds_dir": gan.tfds_dir}
      ds = tfds_data.dataset(src, "train", batch_size, seed, size=cfg.image_size,
                             frames=cfg.frames if cfg.video else 0)
      key = "video" if cfg.video else "image"
    elif cfg.video:
      ds, key = moving_digits.dataset("train", batch_size, seed, **card.get("data", {})), "video"
    else:
      ds, key = mnist.dataset("train", batch_size, seed), "image"
    rho = cfg.noise_frame_corr      # real clips in the engine's (whitened) coordinates
    return ds.map(lambda b: {"x": np.asarray(noise.whiten(np.asarray(b[key], np.float32), rho)),
                             "y": np.asarray(b["label"], np.int32)})
  return make


def dit_config(config) -> tuple[dit_lib.DiTConfig, dict | None]:
  """(architecture, card) of the run's teacher; reads only card.json for a trained teacher."""
  t, m = config.teacher, config.model
  arch = dict(t.get("arch") or {})
  if arch:
    cfg = dit_lib.DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
    return dataclasses.replace(cfg, scan_layers=m.scan_layers, remat=m.remat,
                               attention=m.get("attention", cfg.attention)), None
  card = assets.load_card(t.path or assets.path("mnist_teacher"))
  cfg = dit_lib.DiTConfig(**card["model"])
  return dataclasses.replace(cfg, attention=m.get("attention", cfg.attention)), card


def build(config, plan, mesh, *, abstract: bool = False, workdir: str | None = None):  # pylint: disable=unused-argument
  t = config.teacher
  cfg, card = dit_config(config)
  net, params = models.abstract_dit(cfg)
  if not abstract and card is None:      # a random DiT of teacher.arch, perturbed
    params = jax.jit(lambda: models.build_dit(cfg, config.seed)[1])()
    params = common.perturbed(params, config.seed, t.perturb) if t.perturb else params
  elif not abstract:
    params = assets.load(t.path or assets.path("mnist_teacher"), params)
  axes = models.logical_axes(cfg)
  gan = config.get("gan")
  layer = cfg.depth // 2 if gan is None or gan.layer < 0 else gan.layer
  uncond = unconditional(config)
  # A teacher trained under the frame-correlated prior runs in whitened coordinates (noise.py).
  rho = cfg.noise_frame_corr
  apply = noise.whitened_apply(net.apply, rho)

  def score_features(p, x, t, y):
    v, tokens = net.apply_features(p, noise.color(x, rho), t, y, layer)
    return noise.whiten(v, rho), tokens

  return families.Family(
      name="dit", teacher=teachers.network_teacher(
          apply, cfg.num_classes, t.guidance_scale, t.get("cfg_norm", "none"),
          token_block=((cfg.temporal_patch,) if cfg.video else ()) + (cfg.patch, cfg.patch,
                                                                      cfg.channels)),
      teacher_params=params, teacher_axes=axes, apply=apply,
      sample_shape=cfg.sample_shape, num_classes=cfg.num_classes, evaluator="image_eval",
      attention_shape=(int(np.prod(cfg.grid)), cfg.heads),
      sample_cond=((lambda key, shape: jnp.full(shape, cfg.num_classes, jnp.int32)) if uncond
                   else (lambda key, shape: jax.random.randint(key, shape, 0, cfg.num_classes))),
      unconditional=uncond,
      features=image_metrics.feature_map() if has_features(config) else None,
      score_features=None if cfg.scan_layers else score_features,
      real_data=None if card is None else _real_data(cfg, card, config.get("gan") or {}),
      decode=(lambda x: noise.color(x, rho)) if rho else None,
      extras=MappingProxyType({"card": card, "dit_config": cfg}),
      **common.adapters(config, apply, params, axes, abstract=abstract))


def random_config(arch: dit_lib.DiTConfig, arg: str | None = None, overrides: dict | None = None):
  """configs/mnist.py[:arg] with a random DiT teacher of ``arch`` (AOT plans, benchmarks,
  sharding tests: no weight file). ``overrides``: {"dotted.field": value}, e.g. {"fake.ttur": 1}."""
  from pdmd_jax import configs  # pylint: disable=import-outside-toplevel
  c = configs.load("configs/mnist.py" + (f":{arg}" if arg else ""))
  c.teacher.arch = dataclasses.asdict(arch)
  c.model.scan_layers, c.model.remat = arch.scan_layers, arch.remat
  for field, value in (overrides or {}).items():
    *parents, leaf = field.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
