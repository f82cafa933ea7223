"""The released recipes' extra terms, one at a time and combined, at equal budgets.

MNIST (the shipped default: Phased DMD 4-step 2-phase + SGTS, 300 updates): baseline, then one
term each (loss scale, ODE anchor, IDA, GAN head with real digits, EMA, CFG norm rescale), then
every term whose gain in FD to the teacher is outside seed noise, combined. The ring (exact
8-mode mixture): one-step DMD with and without the anchor, Phased DMD 4-phase with and without
the element-mean loss scale. Video (moving digits, short budget): baseline vs the best MNIST
combination, optical flow against the teacher's. Every row's runs are cached in their workdir
(``--workroot``), so an interrupted sweep resumes (a run stopped by SIGTERM from its last
checkpoint); tables are rewritten after every run.

  python experiments/recipe_ablation.py --suites=ring,mnist --seeds=0,1,2
  python experiments/recipe_ablation.py --suites=mnist,video --seeds=0,1,2 --video_seeds=0,1 \
      --video_steps=100 --video_terms=anchor,cfg_norm

Writes ``docs/results/recipes.md`` and ``recipes.json``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pdmd_jax import assets  # noqa: E402
from configs import gmm as gmm_config  # noqa: E402  (configs/gmm.py)
from pdmd_jax import configs  # noqa: E402
from pdmd_jax import trainer  # noqa: E402
from pdmd_jax.evaluation import gmm_metrics  # noqa: E402

_SUITES = flags.DEFINE_list("suites", ["ring", "mnist"], "ring, mnist and/or video.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every row.")
_MNIST_STEPS = flags.DEFINE_integer("mnist_steps", 300, "Generator updates per MNIST run.")
_VIDEO_STEPS = flags.DEFINE_integer("video_steps", 100, "Generator updates per video run.")
_ONLY = flags.DEFINE_list("only", [], "Run only these row ids.")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "docs", "results"), "Output directory.")
_WORK = flags.DEFINE_string("workroot", "/tmp/pdmd_recipes", "Scratch workdirs (the cache).")
_CACHED = flags.DEFINE_bool("cached_only", False, "Tabulate the cached runs only (run nothing).")
_PRIOR = flags.DEFINE_string(
    "prior", "", "A recipes.json of an earlier sweep: its runs count as cached when suite, row, "
    "seed, overrides and step count match (rebuilds a table after the scratch cache is gone).")
_VIDEO_TERMS = flags.DEFINE_list(
    "video_terms", [], "MNIST term ids to run on video, each alone beside the baseline, in "
    "addition to the best combination (e.g. anchor,cfg_norm when no combination is selected).")
_VIDEO_SEEDS = flags.DEFINE_list("video_seeds", ["0", "1"], "Seeds of the video rows.")

# MNIST: (row id, name, leaf overrides). The recipes' values: LightX2V's anchor weight 0.05 and
# IDA 0.97, DMD2's GAN weights (generator 3e-3, discriminator 1e-2), an EMA that starts a third
# into each expert's 150 updates.
MNIST_TERMS = [
    ("loss_scale", "+ loss scale (element_mean)", {"generator.loss_reduction": "element_mean"}),
    ("anchor", "+ ODE anchor (0.05, MSE)", {"anchor.weight": 0.05}),
    ("ida", "+ IDA (0.97)", {"fake.ida_lambda": 0.97}),
    ("gan", "+ GAN head (3e-3 / 1e-2, real digits)", {"gan.enabled": True}),
    ("ema", "+ EMA (0.95 from update 50)", {"generator.ema_decay": 0.95,
                                            "generator.ema_start": 50}),
    ("cfg_norm", "+ CFG norm rescale", {"teacher.cfg_norm": "sample"}),
    # not a loss term: the released trainer's phase order (the paper trains phases in turn)
    ("interleaved", "phase order interleaved (the released trainer's)",
     {"phase_order": "interleaved"}),
]
# What the tables say so far (rewritten with the tables; keep it true to them).
READING = """
## Reading (2026-12-02; MNIST: 3 seeds of every term; video: 2 seeds)

- **Outside seed noise** is judged on paired differences: each term's run minus the baseline's
  on the same seed (same initialisation, data order and evaluation noise), with a 95% paired-t
  interval. Unpaired, the seed-to-seed spread swamps everything: the baseline's FD to the teacher
  is 7.1, 8.5 and 6.9 on seeds 0, 1 and 2.
- **No term lowers the FD to the teacher outside seed noise**, so no best combination was
  formed, and **the defaults stay the paper's data-free recipe**. Differences to the baseline
  (3 seeds):
  - loss scale: +0.14 +- 0.12 (slightly worse);
  - anchor: +0.02 +- 0.35;
  - IDA: -0.07 +- 0.62;
  - GAN: +0.11 +- 0.50;
  - EMA: +0.52 +- 1.7;
  - CFG norm rescale: +0.90 +- 0.76 (worse).
- **What does move outside the noise:**
  - **CFG norm rescale** (LightX2V's real-score rescale) is the one term against DMD's
    over-saturation. Saturation goes 0.144 -> 0.112 (-0.033 +- 0.002; the teacher's is
    0.0065). FD to real digits is -4.4 +- 0.9, pixel L2 (diversity) +0.34 +- 0.08, and class
    accuracy 0.957 vs 0.961 (within noise). It moves the target away from the plain-CFG
    teacher, hence the worse FD to that teacher.
  - **GAN head with real digits**: FD to real -2.5 +- 2.0 and saturation -0.005 +- 0.001. The
    real data pulls toward the data rather than toward the teacher.
  - **IDA**: FD to real +4.0 +- 2.6 (worse), diversity -0.21 +- 0.07 in pixel L2 (less
    diverse), accuracy +0.002.
  - **Loss scale** (element_mean) stops the clip from binding (clipped steps 1.0 -> 0.0) and
    changes nothing else beyond the noise. Clipped to norm 1 on every step, the gradient changes
    by a slowly varying factor, which Adam's second-moment normalisation absorbs.
  - **ODE anchor** (LightX2V's weight 0.05) and **EMA** (0.95 from update 50) are within noise
    on every metric at 300 updates.
- **Ring, anchor**: one-step DMD covers 2/8 modes on every seed. It starts at the class mean,
  and the reverse-KL gradient picks the nearest mode. With the ODE anchor (weight 0.5, MSE to the
  teacher's 16-step ODE output from the same noise) it covers 8/8 on every seed. The worst
  mode-weight error is then 0.010 and the sliced Wasserstein distance is 24x smaller, better than
  4-phase Phased DMD's. LightX2V's weight 0.05 was too weak here (2/8 in a single run): the
  mixture runs use the exact w_{t|s} weighting, whose gradient is larger than under DMD2's
  normaliser.
- **Ring, loss scale**: Phased DMD's std ratio is 0.78 +- 0.03, and 0.80 +- 0.03 with
  element_mean: no change. The ring has no gradient clip, and Adam is invariant to a constant
  gradient scale (up to eps). The ring's std ratio itself is explained in
  [mode_spread.md](mode_spread.md): a narrow core set by the generator's learning rate, and
  heavy tails.
- **Cost** (docs/benchmarks.md, `python benchmarks/recipe_cost.py --reps=5`): the GAN step was
  2.95x the plain step. XLA:CPU ran the head's convolution gradients 20-25x slower inside the
  TTUR while loop. They are now strided slices and one matmul, and the step costs 1.49x (head on
  the fake) / 1.25x (on the teacher). The anchor costs 1.68x (16 guided teacher steps per
  generator update), IDA 1.05x, the others 1.00x. The GAN rows' MNIST seeds 0-1 ran with the old
  convolutions (the same arithmetic up to float rounding), seed 2 with the new ones.
- **Video** (moving digits, the v1 teacher, 100 updates, seeds 0 and 1): there is no best MNIST combination, so
  the video row is the one term that uses real data, the GAN head on real clips. It changes
  nothing beyond the noise: flow / teacher's 0.858 vs 0.855 (+0.003, seeds +0.004 and +0.001),
  FD to the teacher -0.1, dynamic degree equal (saturated at 0.997 for both, as for every row
  with the v1 teacher: issue 17). The CFG norm rescale's video rows were not run.
- **Phase order on digits** (the released trainer's interleaved order, 1 seed so far): FD to the
  teacher 8.0 vs 7.1 for the progressive default on seed 0; seeds 1-2 pending.
"""
MNIST_METRICS = [("accuracy", "class acc."), ("fd_real", "FD real"),
                 ("fd_reference", "FD teacher"), ("feature_cosine", "feat. cosine"),
                 ("pixel_l2", "pixel L2"), ("saturation", "saturation")]
RING_ROWS = [
    ("dmd", "dmd (1 step)", "method=dmd", {}),
    ("dmd_anchor", "dmd (1 step) + ODE anchor (0.5, MSE)", "method=dmd", {"anchor.weight": 0.5}),
    ("phased", "phased_dmd (4-step 4-phase)", "method=phased_dmd,steps=4", {}),
    ("phased_loss_scale", "phased_dmd (4-step 4-phase) + loss scale (element_mean)",
     "method=phased_dmd,steps=4", {"generator.loss_reduction": "element_mean"}),
]
RING_METRICS = [("modes_covered", "modes covered"), ("weight_error_max", "weight err (max)"),
                ("std_ratio", "std ratio"), ("sliced_wasserstein", "SW to exact")]
VIDEO_METRICS = [("accuracy", "class acc."), ("fd_reference", "FD teacher"),
                 ("flow_ratio", "flow / teacher's"), ("dynamic_degree", "dynamic degree"),
                 ("saturation", "saturation")]


@functools.cache
def _prior_runs():
  return json.load(open(_PRIOR.value)) if _PRIOR.value else {}


TEACHERS = {"mnist": "mnist_teacher", "video": "video_teacher"}   # ring: the exact mixture


def _teacher(suite):
  """The card fingerprint of the suite's shipped teacher ('' for the exact mixture)."""
  return assets.fingerprint(assets.path(TEACHERS[suite])) if suite in TEACHERS else ""


def _suite_dir(suite):
  """Scratch directory of a suite's runs, one per teacher (a retrained teacher starts afresh)."""
  return os.path.join(_WORK.value, f"{suite}_{_teacher(suite)}" if _teacher(suite) else suite)


def run_one(suite, row_id, spec, overrides, seed, steps=None):
  """One cached run: metrics.json of ``<workroot>/<suite>/<row>_s<seed>``."""
  config = configs.load(f"{spec},seed={seed}" if ":" in spec else f"{spec}:seed={seed}")
  if steps:
    config.train.num_steps = steps
  config.train.ckpt_every = config.train.num_steps
  if config.teacher.type == "gmm":   # the lr these tables were measured at
    config.generator.lr = gmm_config.EARLIER_GENERATOR_LR
  for k, v in overrides.items():
    configs.set_leaf(config, k, v)
  workdir = os.path.join(_suite_dir(suite), f"{row_id}_s{seed}")
  done = os.path.join(workdir, "metrics.json")
  if os.path.exists(done):
    return {**json.load(open(done)), "seed": seed, "teacher": _teacher(suite)}
  for run in _prior_runs().get(suite, {}).get(row_id, []):
    if (run["seed"] == seed and run["step"] == config.train.num_steps
        and run["overrides"] == json.loads(json.dumps(overrides))
        and run.get("teacher", "") == _teacher(suite)):
      return run
  if _CACHED.value:
    return None
  os.makedirs(workdir, exist_ok=True)    # an interrupted run resumes from its checkpoint
  shared = os.path.join(_suite_dir(suite), "shared")    # the teacher's reference / MLP fit
  if os.path.isdir(shared):
    for f in os.listdir(shared):
      src, dst = os.path.join(shared, f), os.path.join(workdir, f)
      if not os.path.exists(dst):
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
  t0 = time.time()
  out = trainer.train_and_evaluate(config, workdir, evaluate_phases=False, verbose=False)
  if "stopped_at_step" in out:       # preempted (SIGTERM) or stopped early: not a result
    sys.exit(f"{suite}/{row_id} seed {seed}: stopped at step {out['stopped_at_step']} "
             f"({out.get('preempted') or out.get('stopped_early')}); rerun to resume")
  out["wall_s"] = time.time() - t0
  out["overrides"] = overrides
  out["seed"] = seed
  out["teacher"] = _teacher(suite)
  os.makedirs(shared, exist_ok=True)
  for f in os.listdir(workdir):
    if f.startswith("teacher_samples") and not os.path.exists(os.path.join(shared, f)):
      shutil.copy(os.path.join(workdir, f), shared)
  json.dump(out, open(done, "w"), indent=1, default=float)
  print(f"{suite}/{row_id} seed {seed}: {out['wall_s']:.0f} s", flush=True)
  return out


def _mean_std(runs, key):
  v = np.asarray([r[key] for r in runs], np.float64)
  return float(v.mean()), float(v.std())


def paired(base_runs, runs, key):
  """Per-seed differences row - baseline of ``key`` over the seeds both have: (mean, sd, n,
  half-width of the 95% paired-t interval; nan for n < 2). Seeds share the initialisation, the
  data order and the evaluation noise across rows, so the seed-to-seed spread (baseline FD to
  the teacher 7.1 vs 8.5 on seeds 0 and 1) largely cancels in the difference."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  _, d = gmm_metrics.paired_by_seed({r["seed"]: r[key] for r in base_runs if key in r},
                                    {r["seed"]: r[key] for r in runs if key in r})
  if d.size < 2:
    return (float(d.mean()) if d.size else float("nan")), float("nan"), int(d.size), float("nan")
  sd = float(d.std(ddof=1))
  return float(d.mean()), sd, int(d.size), float(stats.t.ppf(0.975, d.size - 1) * sd / np.sqrt(d.size))


def best_terms(results) -> list[str]:
  """Terms that lower the FD to the teacher outside seed noise: the paired difference to the
  baseline is negative and its 95% paired-t interval excludes 0 (every seed run)."""
  base = results.get("baseline")
  if not base:
    return []
  out = []
  for row_id, _, _ in MNIST_TERMS:
    runs = results.get(row_id)
    if runs and len(runs) == len(base):
      m, _, n, half = paired(base, runs, "student/fd_reference")
      if n >= 2 and m + half < 0:
        out.append(row_id)
  return out


def mnist_suite(seeds, tables):
  results = {}
  rows = [("baseline", "baseline: Phased DMD 4-step 2-phase + SGTS (the default)", {})]
  rows += MNIST_TERMS
  names = dict((r, n) for r, n, _ in rows)
  for seed in seeds:      # every row at seed 0 first: a partial sweep still compares terms
    for row_id, _, overrides in rows:
      if _ONLY.value and row_id not in _ONLY.value:
        continue
      out = run_one("mnist", row_id, "configs/mnist.py", overrides, seed, _MNIST_STEPS.value)
      if out is not None:
        results.setdefault(row_id, []).append(out)
      tables["mnist"] = (results, names)
      write(tables)
  best = best_terms(results)
  if best and (not _ONLY.value or "best" in _ONLY.value):
    overrides = {k: v for r, _, o in MNIST_TERMS if r in best for k, v in o.items()}
    names["best"] = "best combination: " + " + ".join(best)
    for seed in seeds:
      out = run_one("mnist", "best_" + "_".join(best), "configs/mnist.py", overrides, seed,
                    _MNIST_STEPS.value)
      if out is not None:
        results.setdefault("best", []).append(out)
      write(tables)
  return best


def ring_suite(seeds, tables):
  results, names = {}, {}
  for row_id, name, variant, overrides in RING_ROWS:
    if _ONLY.value and row_id not in _ONLY.value:
      continue
    names[row_id] = name
    for seed in seeds:
      out = run_one("ring", row_id, f"configs/gmm.py:{variant}", overrides, seed)
      if out is not None:
        results.setdefault(row_id, []).append(out)
      tables["ring"] = (results, names)
      write(tables)


def video_suite(seeds, tables, best):
  results, names = {}, {"baseline": "baseline: Phased DMD 4-step 2-phase + SGTS"}
  overrides = {k: v for r, _, o in MNIST_TERMS if r in best for k, v in o.items()}
  rows = [("baseline", {})]
  if best:
    names["best"] = "best MNIST combination: " + " + ".join(best)
    rows.append(("best", overrides))
  for r, name, o in MNIST_TERMS:
    if r in _VIDEO_TERMS.value:
      names[r] = name
      rows.append((r, o))
  for row_id, o in rows:
    cache = "best_" + "_".join(best) if row_id == "best" else row_id   # one dir per combination
    for seed in seeds:
      out = run_one("video", cache, "configs/video.py", o, seed, _VIDEO_STEPS.value)
      if out is not None:
        results.setdefault(row_id, []).append(out)
      tables["video"] = (results, names)
      write(tables)


def _rows(results, names, metrics, extra=()):
  out = []
  for row_id, runs in results.items():
    row = {"row": names[row_id], "seeds": len(runs)}
    for key, label in metrics:
      vals = [r.get(f"student/{key}", r.get(key)) for r in runs]
      if all(v is not None for v in vals):
        row[label] = vals
    for key, label in extra:
      vals = [r.get(key) for r in runs]
      if all(v is not None for v in vals):
        row[label] = vals
    out.append(row)
  return out


PAIRED = [("fd_reference", "Δ FD teacher"), ("fd_real", "Δ FD real"),
          ("accuracy", "Δ class acc."), ("pixel_l2", "Δ pixel L2"), ("saturation", "Δ saturation")]


def _paired_table(results, names, metrics=PAIRED) -> str:
  """Each term minus the baseline, seed by seed: mean ± 95% paired-t half-width (n seeds);
  * marks an interval that excludes 0."""
  base = results.get("baseline")
  if not base:
    return ""
  lines = ["\nPaired differences to the baseline (row - baseline on the same seed; mean ± the "
           "95% paired-t half-width over the seeds both have; * = the interval excludes 0, "
           "i.e. outside seed noise):\n",
           "| row | seeds | " + " | ".join(label for _, label in metrics) + " |",
           "|" + "---|" * (2 + len(metrics))]
  for row_id, runs in results.items():
    if row_id == "baseline":
      continue
    cells, n = [], 0
    for key, _ in metrics:
      m, _, n, half = paired(base, runs, f"student/{key}")
      if np.isnan(half):
        cells.append(f"{m:+.3g}" if n else "")
      else:
        cells.append(f"{m:+.3g} ± {half:.2g}" + (" *" if abs(m) > half else ""))
    lines.append(f"| {names[row_id]} | {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write(tables):
  os.makedirs(_OUT.value, exist_ok=True)
  parts = ["# The released recipes' terms, measured (`experiments/recipe_ablation.py`)\n\n"
           "mean ± std over seeds at equal budgets; every term is a config switch "
           "(README, \"Terms of the released recipes\").\n"]
  if "mnist" in tables:
    results, names = tables["mnist"]
    cols = (["row", "seeds"] + [label for _, label in MNIST_METRICS] + ["clipped steps"])
    parts.append(f"\n## MNIST DiT teacher, {_MNIST_STEPS.value} generator updates\n\n"
                 "Metrics as in [mnist.md](mnist.md) (500 samples from the same noise and "
                 "labels; FD to the teacher's 32-step samples; saturation = fraction of pixels "
                 "outside [-1, 1], the teacher's: 0.0065). clipped steps: fraction of generator "
                 "updates whose gradient norm exceeded generator.grad_clip = 1.\n\n")
    parts.append(gmm_metrics.markdown_table(
        _rows(results, names, MNIST_METRICS, [("gen_clipped_fraction", "clipped steps")]), cols)
        + "\n")
    parts.append(_paired_table(results, names))
  if "ring" in tables:
    results, names = tables["ring"]
    cols = ["row", "seeds"] + [label for _, label in RING_METRICS]
    parts.append("\n## Exact 8-mode ring, 2000 generator updates\n\n"
                 "As in [gmm_ring.md](gmm_ring.md), at generator lr 1e-4 (the default until "
                 "2026-12-02): modes covered, the worst mode-weight error, "
                 "intra-mode std / true std, sliced Wasserstein distance to the exact mixture.\n\n")
    parts.append(gmm_metrics.markdown_table(_rows(results, names, RING_METRICS), cols) + "\n")
  if "video" in tables:
    results, names = tables["video"]
    cols = ["row", "seeds"] + [label for _, label in VIDEO_METRICS]
    parts.append(f"\n## Moving digits, {_VIDEO_STEPS.value} generator updates\n\n")
    parts.append(gmm_metrics.markdown_table(_rows(results, names, VIDEO_METRICS), cols) + "\n")
    parts.append(_paired_table(results, names, [(k, "Δ " + label) for k, label in VIDEO_METRICS]))
  parts.append(READING)
  with open(os.path.join(_OUT.value, "recipes.md"), "w") as f:
    f.write("".join(parts))
  with open(os.path.join(_OUT.value, "recipes.json"), "w") as f:
    json.dump({s: r for s, (r, _) in tables.items()}, f, indent=1, default=float)


def main(argv):
  del argv
  jax.config.update("jax_compilation_cache_dir", os.path.join(_WORK.value, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  seeds = [int(s) for s in _SEEDS.value]
  tables = {}
  best = []
  if "ring" in _SUITES.value:
    ring_suite(seeds, tables)
  if "mnist" in _SUITES.value:
    best = mnist_suite(seeds, tables)
  if "video" in _SUITES.value:
    video_suite([int(s) for s in _VIDEO_SEEDS.value], tables, best)


if __name__ == "__main__":
  app.run(main)
