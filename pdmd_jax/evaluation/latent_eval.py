"""Evaluation of a latent-space (Wan2.2, Qwen-Image) distillation run against the teacher's sampler.

The distilled few-step MoE sampler and the teacher's many-step Euler sampler (CFG, through
the plan's grid points, ``eval.teacher_substeps`` steps per interval) start from the same
noise and prompts (``eval.num_samples``, a function of ``eval.seed``). Reported:
- per-channel mean and std of the final latents (student and teacher) and the largest gaps;
- MSE of the student to the teacher from the same noise (and relative to the teacher's
  second moment), also at every phase boundary x_{t_k};
- diversity: mean pairwise L2 distance between samples, student / teacher.
Writes ``latents_<tag>.npz`` (student latents and trajectory, prompt indices) and caches the
teacher's latents in the workdir. With ``eval.vae_path`` (a diffusers VAE folder) and
``eval.decode`` > 0, the first samples are decoded to RGB with torch + diffusers, if installed
(otherwise that step is skipped): by the family's decoder, ``family.extras["decode"]`` =
(name, fn(vae_path, latents) -> uint8 array or None), written to ``<name>_<tag>.npz`` under the
key ``name``; without one, Wan videos (``decode`` below: ``videos_<tag>.npz``, uint8
[N, F, H, W, 3]).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from pdmd_jax import paths
from pdmd_jax import sampling
from pdmd_jax.evaluation import gmm_metrics
from pdmd_jax.evaluation import image_metrics


def _batched(fn, z, y, batch: int):
  """fn(z_b, y_b) over fixed-size batches (the last one padded), numpy outputs concatenated."""
  n, out = z.shape[0], []
  for i in range(0, n, batch):
    take = lambda a: a[i:i + batch]
    zb, yb = take(z), jax.tree.map(take, y)
    pad = batch - zb.shape[0]
    if pad:
      fill = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])
      zb, yb = fill(zb), jax.tree.map(fill, yb)
    out.append(jax.tree.map(lambda a: np.asarray(a)[:batch - pad], fn(zb, yb)))
  return jax.tree.map(lambda *a: np.concatenate(a), *out)


def _fns(run):
  """Jitted student / teacher samplers, built once per run (phase-end evals reuse them)."""
  fns = getattr(run, "_latent_eval_fns", None)
  if fns is None:
    c = run.config
    student = jax.jit(lambda e, tp, z, y: sampling.few_step_sample(
        run.plan, run.step_cfg.experts_apply(tp), e, z, y))
    teacher = jax.jit(lambda tp, z, y: sampling.teacher_sample(
        run.teacher, tp, run.plan, z, y, substeps=c.eval.teacher_substeps,
        shift_value=c.shift))
    fns = run._latent_eval_fns = (student, teacher)  # pylint: disable=protected-access
  return fns


def inputs(run):
  """(z [N, C, F, h, w], conditioning pytree [N, ...]): a function of eval.seed only."""
  c = run.config
  k_y, k_z = jax.random.split(jax.random.PRNGKey(c.eval.seed))
  y = run.sample_labels(k_y, (c.eval.num_samples,))
  z = jax.random.normal(k_z, (c.eval.num_samples,) + tuple(run.sample_shape))
  return z, y


def teacher_latents(run, z, y, workdir: str | None):
  """The teacher's states at the grid times [N + 1][N, ...] (cached in ``workdir``)."""
  c = run.config
  key = (f"teacher_latents_n{z.shape[0]}_seed{c.eval.seed}_sub{c.eval.teacher_substeps}_"
         f"cfg{c.teacher.guidance_scale:g}-{c.teacher.get('guidance_scale_low')}_"
         + (f"{c.teacher.cfg_norm}_" if c.teacher.get("cfg_norm", "none") != "none" else "") +
         f"grid{'-'.join(f'{t:.4f}' for t in run.plan.grid)}.npy")
  path = os.path.join(workdir, key) if workdir else None
  if path and paths.exists(path):
    return list(paths.load_npy(path))
  _, fn = _fns(run)
  traj = _batched(lambda z, y: fn(run.teacher_params, z, y), z, y, c.eval.batch_size)
  if path and jax.process_index() == 0:       # multi-process: process 0 writes
    paths.save_npy(path, np.stack(traj))
  return traj


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of latents [N, C, ...] over every other axis."""
  axes = (0,) + tuple(range(2, x.ndim))
  return x.mean(axis=axes), x.std(axis=axes)


def diversity(x: np.ndarray) -> float:
  """Mean pairwise L2 distance between samples (0 for a single sample)."""
  return 0.0 if len(x) < 2 else image_metrics.pixel_l2(x, np.zeros(len(x), np.int32))


def report(student_traj, teacher_traj, plan) -> dict:
  """Metrics of the student's trajectory against the teacher's (both [N + 1][N, ...])."""
  s, t = np.asarray(student_traj[-1], np.float64), np.asarray(teacher_traj[-1], np.float64)
  s_mean, s_std = channel_stats(s)
  t_mean, t_std = channel_stats(t)
  out = {"mse_to_teacher": float(np.mean((s - t)**2)),
         "rel_mse_to_teacher": float(np.mean((s - t)**2) / max(np.mean(t**2), 1e-12)),
         "channel_mean_gap_max": float(np.max(np.abs(s_mean - t_mean))),
         "channel_std_ratio_min": float(np.min(s_std / np.maximum(t_std, 1e-12))),
         "channel_std_ratio_max": float(np.max(s_std / np.maximum(t_std, 1e-12))),
         "student/diversity": diversity(s), "teacher/diversity": diversity(t)}
  out["diversity_ratio"] = out["student/diversity"] / max(out["teacher/diversity"], 1e-12)
  for i, (m, sd) in enumerate(zip(s_mean, s_std)):
    out[f"student/channel_{i}/mean"], out[f"student/channel_{i}/std"] = float(m), float(sd)
  for i, (m, sd) in enumerate(zip(t_mean, t_std)):
    out[f"teacher/channel_{i}/mean"], out[f"teacher/channel_{i}/std"] = float(m), float(sd)
  for p in plan.phases[:-1]:
    i = plan.boundary_index(p.index)
    a, b = np.asarray(student_traj[i], np.float64), np.asarray(teacher_traj[i], np.float64)
    out[f"boundary_{p.index + 1}/t"] = p.boundary
    out[f"boundary_{p.index + 1}/mse_to_teacher"] = float(np.mean((a - b)**2))
  return out


def decode(vae_path: str, latents: np.ndarray) -> np.ndarray | None:
  """RGB uint8 videos [N, F, H, W, 3] from Wan latents through diffusers' AutoencoderKLWan.

  Latents are un-normalised as WanPipeline does (x / (1 / std) + mean, from the VAE's config).
  Returns None (with a message) when torch/diffusers or the VAE are unavailable.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from diffusers import AutoencoderKLWan  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"latent_eval: not decoding ({e}); install torch and diffusers to decode")
    return None
  if not os.path.exists(os.path.join(vae_path, "config.json")):
    print(f"latent_eval: not decoding; no AutoencoderKLWan config.json under {vae_path!r}")
    return None
  vae = AutoencoderKLWan.from_pretrained(vae_path, torch_dtype=torch.float32).eval()
  c = latents.shape[1]
  mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1)
  std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1)
  videos = []
  with torch.no_grad():
    for x in latents:
      x = torch.from_numpy(np.asarray(x, np.float32)[None]) * std + mean
      v = vae.decode(x).sample[0]                                   # [3, F, H, W] in [-1, 1]
      v = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
      videos.append(v.permute(1, 2, 3, 0).numpy())
  return np.stack(videos)


def evaluate(run, state, workdir: str | None, *, tag: str, verbose: bool = True) -> dict:
  """Metrics of the distilled sampler at ``state``; latents (and videos) saved to ``workdir``."""
  c = run.config
  z, y = inputs(run)
  student_fn, _ = _fns(run)
  student = _batched(lambda z, y: student_fn(run.experts(state), run.teacher_params, z, y), z, y,
                     c.eval.batch_size)
  teacher = teacher_latents(run, z, y, workdir)
  out = report(student, teacher, run.plan)
  out["step"] = int(jax.device_get(state.step))
  index = np.asarray(y["index"]) if isinstance(y, dict) and "index" in y else np.zeros(0)
  if workdir and jax.process_index() == 0:
    paths.save_npz(os.path.join(workdir, f"latents_{tag}.npz"), student=np.asarray(student[-1]),
                   teacher=np.asarray(teacher[-1]),
                   trajectory=np.stack([np.asarray(x) for x in student]),
                   prompt_index=index, grid=np.asarray(run.plan.grid), step=out["step"])
    n = min(c.eval.get("decode", 0), z.shape[0])
    if n and c.eval.get("vae_path", ""):
      name, fn = run.family.extras.get("decode", ("videos", decode))
      decoded = fn(c.eval.vae_path, np.asarray(student[-1][:n]))
      if decoded is not None:
        paths.save_npz(os.path.join(workdir, f"{name}_{tag}.npz"), **{name: decoded},
                       prompt_index=index[:n])
    paths.write_text(os.path.join(workdir, f"metrics_{tag}.md"), metrics_markdown(out, run))
  if verbose:
    print(metrics_markdown(out, run))
  return out


def metrics_markdown(out: dict, run=None) -> str:
  sub = run.config.eval.teacher_substeps * run.plan.num_steps if run else "many"
  head = f"distilled vs teacher ({sub}-step Euler, CFG)"
  keys = ["mse_to_teacher", "rel_mse_to_teacher", "channel_mean_gap_max", "channel_std_ratio_min",
          "channel_std_ratio_max", "student/diversity", "teacher/diversity", "diversity_ratio"]
  rows = [{head: k, "value": out[k]} for k in keys]
  rows += [{head: f"{k} (t={out[k.split('/')[0] + '/t']:.3f})", "value": out[k]}
           for k in sorted(k for k in out if k.startswith("boundary_")
                           and k.endswith("mse_to_teacher"))]
  return gmm_metrics.markdown_table(rows, [head, "value"]) + "\n"
