"""Evaluation of a distillation run on an image or video teacher (the MNIST / moving-digits DiT).

The distilled few-step sampler and the teacher's many-step Euler sampler (CFG, through the
plan's grid points) start from the same noise and labels (``eval.num_samples`` images, classes
in turn, so image i has class i % C and seed i // C). Both get the classifier-feature metrics of
``image_metrics`` (class accuracy, FD to real digits, diversity, saturation); the student also
gets FD to the teacher's samples. The teacher's samples are cached in the workdir.
Video teachers get ``video_metrics`` instead (per-frame class accuracy, FD of clip features to
real held-out clips and to the teacher, diversity, optical flow, dynamic degree, warp error).
An unconditional run (the null class only) gets class coverage instead of accuracy: the
entropy and the rarest share of the classes its samples read as, and their total variation
from the teacher's. Writes ``samples_<tag>.png`` (rows = classes, columns = seeds; videos also
``.gif``; unconditional: rows are seeds too),
``teacher_samples.png`` and ``metrics_<tag>.md``.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from pdmd_jax import families
from pdmd_jax import paths
from pdmd_jax import sampling
from pdmd_jax.evaluation import image_metrics

COLUMNS = ("accuracy", "fd_real", "fd_reference", "feature_cosine", "pixel_l2", "saturation")
UNCONDITIONAL_COLUMNS = ("class_entropy", "class_min_share", "class_tv_reference") + COLUMNS[1:]
VIDEO_COLUMNS = COLUMNS + ("mean_flow", "flow_ratio", "dynamic_degree", "dynamic_degree_fast",
                          "warp_error")
GRID_SEEDS = 8


def _batches(fn, z, y, batch: int):
  """fn(z_b, y_b) over fixed-size batches (the last one padded; never larger than z), numpy
  output concatenated."""
  n = z.shape[0]
  batch = min(batch, n)
  out = []
  for i in range(0, n, batch):
    zb, yb = z[i:i + batch], y[i:i + batch]
    pad = batch - zb.shape[0]
    if pad:
      zb = jnp.concatenate([zb, jnp.zeros((pad,) + zb.shape[1:], zb.dtype)])
      yb = jnp.concatenate([yb, jnp.zeros((pad,), yb.dtype)])
    out.append(jax.tree.map(lambda a: np.asarray(a)[:batch - pad], fn(zb, yb)))
  return jax.tree.map(lambda *a: np.concatenate(a), *out)


def inputs(run):
  """(z [N, ...], labels [N]) of the evaluation: a function of eval.seed only. Labels are the
  classes in turn, or the null class everywhere for an unconditional run."""
  n = run.config.eval.num_samples
  labels = jnp.arange(n, dtype=jnp.int32) % run.num_classes
  if unconditional(run):
    labels = jnp.full((n,), run.num_classes, jnp.int32)
  z = jax.random.normal(jax.random.PRNGKey(run.config.eval.seed), (n,) + run.sample_shape)
  return z, labels


def student_samples(run, experts, z, labels, batch: int = 250):
  """Few-step trajectories [N + 1 grid points][N, ...] of the distilled MoE sampler (pixels:
  ``families.decode``)."""
  fn = jax.jit(lambda e, tp, z, y: [families.decode(run.family, x) for x in
                                    sampling.few_step_sample(
                                        run.plan, run.step_cfg.experts_apply(tp), e, z, y)])
  return _batches(lambda z, y: fn(experts, run.teacher_params, z, y), z, labels, batch)


def teacher_fingerprint(run) -> str:
  """8 hex digits naming the teacher: its config section and, for a trained teacher, its card
  (which records the weights' training run and metrics), so a cached reference is never reused
  for another teacher put at the same path."""
  card = run.family.extras.get("card")
  blob = json.dumps([run.config.teacher.to_dict(), card], sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:8]


def teacher_samples(run, z, labels, workdir: str | None, batch: int = 250):
  """The teacher's many-step Euler samples (final x), cached in ``workdir``."""
  c = run.config
  key = (f"teacher_samples_n{z.shape[0]}_seed{c.eval.seed}_sub{c.eval.teacher_substeps}_"
         f"cfg{c.teacher.guidance_scale:g}_grid{'-'.join(f'{t:.4f}' for t in run.plan.grid)}_"
         f"t{teacher_fingerprint(run)}.npy")
  path = os.path.join(workdir, key) if workdir else None
  if path and paths.exists(path):
    return paths.load_npy(path)
  fn = jax.jit(lambda tp, z, y: families.decode(run.family, sampling.teacher_sample(
      run.teacher, tp, run.plan, z, y, substeps=c.eval.teacher_substeps,
      shift_value=c.shift)[-1]))
  x = _batches(lambda z, y: fn(run.teacher_params, z, y), z, labels, batch)
  if path and jax.process_index() == 0:       # multi-process: process 0 writes
    paths.save_npy(path, x)
  return x


def grid_order(x, num_classes: int, seeds: int = GRID_SEEDS):
  """The first classes x seeds images reordered class-major (rows = classes, columns = seeds)."""
  x = np.asarray(x)
  seeds = max(1, min(seeds, len(x) // num_classes))
  x = x[:num_classes * seeds]
  return x.reshape(seeds, num_classes, *x.shape[1:]).swapaxes(0, 1).reshape(-1, *x.shape[1:])


def evaluate(run, state, workdir: str | None, *, tag: str, verbose: bool = True) -> dict:
  z, labels = inputs(run)
  traj = student_samples(run, run.experts(state), z, labels)
  student = traj[-1]
  teacher = teacher_samples(run, z, labels, workdir)
  labels = np.asarray(labels)
  if video(run):
    from pdmd_jax.evaluation import video_metrics  # pylint: disable=import-outside-toplevel
    data = (run.family.extras.get("card") or {}).get("data") or {}
    real = video_metrics.real_clips(data, len(labels))[0]
    size = data.get("sprite_size")
    student_rep = video_metrics.video_report(student, labels, reference=teacher, real=real,
                                             sprite_size=size)
    teacher_rep = video_metrics.video_report(teacher, labels, real=real, sprite_size=size)
  else:
    student_rep = image_metrics.image_report(student, labels, teacher)
    teacher_rep = image_metrics.image_report(teacher, labels)
  out = {f"student/{k}": float(v) for k, v in student_rep.items()}
  out.update({f"teacher/{k}": float(v) for k, v in teacher_rep.items()})
  out["step"] = int(jax.device_get(state.step))
  if workdir and jax.process_index() == 0:
    save_samples(run, student, os.path.join(workdir, f"samples_{tag}"))
    if video(run):   # the clips themselves, for side-by-side strips (experiments/video_motion.py)
      paths.save_npy(os.path.join(workdir, f"samples_{tag}.npy"), student[:40].astype(np.float16))
    tpath = os.path.join(workdir, "teacher_samples")
    if not paths.exists(tpath + ".png"):
      save_samples(run, teacher, tpath)
    paths.write_text(os.path.join(workdir, f"metrics_{tag}.md"), metrics_markdown(out, run))
  if verbose:
    print(metrics_markdown(out, run))
  return out


def video(run) -> bool:
  return len(run.sample_shape) == 4


def unconditional(run) -> bool:
  """The run distils the teacher's null class only (``Family.unconditional``)."""
  return bool(getattr(getattr(run, "family", None), "unconditional", False))


def save_samples(run, x, stem: str) -> None:
  """``stem``.png: rows = classes, columns = seeds (videos: 4 seeds, frames along a row of the
  .png strip and animated in ``stem``.gif)."""
  c = run.num_classes
  if video(run):
    from pdmd_jax.evaluation import motion_metrics  # pylint: disable=import-outside-toplevel
    grid = grid_order(x, c, seeds=4)
    motion_metrics.save_video_strip(grid, stem, mp4=False, ncols=len(grid) // c, scale=2)
  else:
    image_metrics.save_grid_png(grid_order(x, c), stem + ".png", nrow=c)


def metrics_markdown(out: dict, run=None) -> str:
  columns = (VIDEO_COLUMNS if run is not None and video(run) else UNCONDITIONAL_COLUMNS
             if run is not None and unconditional(run) else COLUMNS)
  rows = {}
  sub = run.config.eval.teacher_substeps * run.plan.num_steps if run else "many"
  guided = run is None or run.config.teacher.guidance_scale != 1.0
  for who, label in (("teacher", f"teacher ({sub}-step Euler{', CFG' if guided else ''})"),
                     ("student", f"distilled ({run.plan.method}, {run.plan.num_steps} steps)"
                      if run else "distilled")):
    rows[label] = {k: out.get(f"{who}/{k}", float("nan")) for k in columns}
  return image_metrics.markdown_table(rows, list(columns)) + "\n"
