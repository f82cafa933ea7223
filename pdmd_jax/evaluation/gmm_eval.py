"""Evaluation of a run on an exact Gaussian-mixture teacher (the gmm family).

Few-step samples against exact samples of the mixture and against the teacher's own many-step
Euler sampler (``gmm_metrics.gmm_report``: modes covered, per-mode weight error, intra-mode std
ratio, sliced Wasserstein, MMD), the distilled x_{t_k} at every phase boundary against the
teacher's, and a scatter plot per boundary (``samples_<tag>.png``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from pdmd_jax import paths
from pdmd_jax import sampling
from pdmd_jax.data import gmm as gmm_lib
from pdmd_jax.evaluation import gmm_metrics


def evaluate(run, state, workdir: str | None, *, tag: str, verbose: bool = True) -> dict:
  """Few-step samples vs exact data and vs the many-step teacher; boundary marginals; plots."""
  c, gmm = run.config, run.family.extras["gmm"]
  n = c.eval.num_samples
  key = jax.random.PRNGKey(c.eval.seed)
  k_y, k_z, k_x = jax.random.split(key, 3)
  y = gmm_lib.sample_labels(k_y, gmm, c.teacher.num_classes, (n,))
  z = jax.random.normal(k_z, (n, c.teacher.dim))
  student = jax.jit(lambda e, z, y: sampling.few_step_sample(run.plan, run.experts_apply(), e, z,
                                                             y))(run.experts(state), z, y)
  teacher = jax.jit(lambda p, z, y: sampling.teacher_sample(
      run.teacher, p, run.plan, z, y, substeps=c.eval.teacher_substeps, shift_value=c.shift))(
          gmm, z, y)
  exact, _ = gmm_lib.sample(k_x, gmm, y)
  student, teacher, exact = jax.device_get((student, teacher, exact))
  out = {f"student/{k}": v for k, v in gmm_metrics.gmm_report(student[-1], gmm, exact).items()}
  out.update({f"teacher/{k}": v for k, v in gmm_metrics.gmm_report(teacher[-1], gmm, exact).items()})
  # Phase-boundary marginals: the distilled x_{t_k} against the teacher's own x_{t_k}.
  for p in run.plan.phases[:-1]:
    i = run.plan.boundary_index(p.index)
    a = float(run.sched.alpha(jnp.float32(p.boundary)))
    d_s = gmm_metrics.boundary_distance(student[i], gmm, a)
    d_t = gmm_metrics.boundary_distance(teacher[i], gmm, a)
    out[f"boundary_{p.index + 1}/t"] = p.boundary
    out[f"boundary_{p.index + 1}/student_dist"] = d_s
    out[f"boundary_{p.index + 1}/teacher_dist"] = d_t
    out[f"boundary_{p.index + 1}/ratio"] = d_s / d_t
  out["step"] = int(jax.device_get(state.step))
  if workdir and jax.process_index() == 0:    # multi-process: process 0 writes
    _plot(run, student, teacher, exact, os.path.join(workdir, f"samples_{tag}.png"))
    paths.write_text(os.path.join(workdir, f"metrics_{tag}.md"), metrics_markdown(out))
  if verbose:
    print(metrics_markdown(out))
  return out


def metrics_markdown(out: dict) -> str:
  cols = ["modes_covered", "weight_error_max", "std_ratio", "rms_std_ratio", "outlier_fraction",
          "sliced_wasserstein", "mmd"]
  rows = []
  for who, label in (("teacher", "teacher (many-step Euler)"), ("student", "distilled (few-step)")):
    row = {"sampler": label}
    for col in cols:
      if f"{who}/{col}" in out:
        v = out[f"{who}/{col}"]
        row[col] = f"{v:.0f}/{out[f'{who}/num_modes']:.0f}" if col == "modes_covered" else v
    rows.append(row)
  text = gmm_metrics.markdown_table(rows, ["sampler"] + cols)
  dist = "mean dist. to nearest (1-t_k)mu"
  bnds = sorted({k.split("/")[0] for k in out if k.startswith("boundary_")})
  if bnds:
    rows = [{"boundary": b, "t_k": out[b + "/t"], f"{dist}, distilled": out[b + "/student_dist"],
             "teacher": out[b + "/teacher_dist"], "ratio": out[b + "/ratio"]} for b in bnds]
    text += "\n\n" + gmm_metrics.markdown_table(rows, list(rows[0]))
  return text + "\n"


def _plot(run, student, teacher, exact, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  means = np.asarray(run.family.extras["gmm"].means)
  if means.shape[1] > 2:   # project onto the top-2 principal directions of the mode means
    _, _, vt = np.linalg.svd(means - means.mean(0), full_matrices=False)
    proj = lambda x: (np.asarray(x) - means.mean(0)) @ vt[:2].T
  else:
    proj = np.asarray
  panels = [("exact data", exact), ("teacher, many-step", teacher[-1])]
  for p in run.plan.phases[:-1]:
    panels.append((f"distilled x at t={p.boundary:.3f}", student[run.plan.boundary_index(p.index)]))
  panels.append((f"distilled ({run.plan.method}, {run.plan.num_steps} steps)", student[-1]))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
  for ax, (title, x) in zip(axes[0], panels):
    xy = proj(x)[:3000]
    ax.scatter(xy[:, 0], xy[:, 1], s=1, alpha=0.4)
    ax.set_title(title, fontsize=8)
    ax.set_aspect("equal")
  fig.tight_layout()
  paths.save_figure(path, fig, dpi=90)
  plt.close(fig)
