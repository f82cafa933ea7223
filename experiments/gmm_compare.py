"""All methods on exact Gaussian-mixture teachers, equal budgets, several seeds.

Every method gets the same number of generator updates, the same TTUR ratio, batch, network,
optimizer and teacher fit; Phased DMD splits its budget evenly over its phases. Writes
``docs/results/gmm_<dataset>.md`` (mean ± std over seeds), ``gmm_<dataset>.json`` (every run)
and the seed-0 scatter plots.

  python experiments/gmm_compare.py --datasets=ring --seeds=0,1,2 --steps=2000
  python experiments/gmm_compare.py --datasets=random --seeds=0,1,2 --steps=2000 --long=0 \
      --only=dmd,sgts,phased,phased_sgts,naive
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pdmd_jax import configs  # noqa: E402
from pdmd_jax import trainer  # noqa: E402
from pdmd_jax.evaluation import gmm_metrics  # noqa: E402

_DATASETS = flags.DEFINE_list("datasets", ["ring", "random"], "ring (8 modes, 2-D) and/or random (12 modes, 16-D).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (network init, teacher fit, noise).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Generator updates per run (all methods).")
_LONG = flags.DEFINE_integer("long", 4, "Extra dmd2_sgts and phased_dmd runs at this multiple of "
                             "the budget (0: none): does longer training keep or lose modes?")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "docs", "results"), "Output directory.")
_WORK = flags.DEFINE_string("workroot", "/tmp/pdmd_gmm_compare", "Scratch workdirs.")
_ONLY = flags.DEFINE_list("only", [], "Run only these row ids (dmd, multistep, sgts, phased, "
                          "phased_sgts, naive, no_margin, sgts_long, phased_long).")

# (row id, row name, config variant, leaf overrides, budget multiple)
ROWS = [
    ("dmd", "dmd (1 step)", "method=dmd", {}, 1),
    ("multistep", "dmd_multistep (4 steps)", "method=dmd_multistep,steps=4", {}, 1),
    ("sgts", "dmd2_sgts (4 steps)", "method=dmd2_sgts,steps=4", {}, 1),
    ("phased", "phased_dmd (4-step 4-phase)", "method=phased_dmd,steps=4", {}, 1),
    ("phased_sgts", "phased_dmd_sgts (4-step 2-phase)", "method=phased_dmd_sgts,steps=4,phases=2", {}, 1),
    ("naive", "phased_dmd, naive fake target (ablation)", "method=phased_dmd,steps=4",
     {"fake.target": "naive"}, 1),
    ("no_margin", "phased_dmd, t_min=0 (no margin)", "method=phased_dmd,steps=4",
     {"t_sampler.t_min": 0.0}, 1),
]


def _load_config(variant):
  return configs.load(f"configs/gmm.py:{variant}")


def run_one(name, variant, overrides, steps, dataset, seed):
  dim = 2 if dataset == "ring" else 16
  config = _load_config(f"{variant},dim={dim},seed={seed}")
  config.train.num_steps = steps
  config.train.ckpt_every = steps       # checkpoint only at phase ends
  for k, v in overrides.items():
    configs.set_leaf(config, k, v)
  slug = "".join(ch if ch.isalnum() else "_" for ch in name)
  workdir = os.path.join(_WORK.value, dataset, f"{slug}_x{steps}_s{seed}")
  if os.path.exists(os.path.join(workdir, "metrics.json")):
    return json.load(open(os.path.join(workdir, "metrics.json"))), workdir
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  fit = os.path.join(_WORK.value, dataset, f"teacher_fit_s{seed}.msgpack")   # shared by all methods
  if os.path.exists(fit):
    shutil.copy(fit, os.path.join(workdir, "teacher_fit.msgpack"))
  t0 = time.time()
  out = trainer.train_and_evaluate(config, workdir, evaluate_phases=False, verbose=False)
  if "stopped_at_step" in out:       # preempted (SIGTERM) or stopped early: not a result
    sys.exit(f"{name} seed {seed}: stopped at step {out['stopped_at_step']} "
             f"({out.get('preempted') or out.get('stopped_early')}); rerun to start it again")
  out["wall_s"] = time.time() - t0
  if not os.path.exists(fit):
    shutil.copy(os.path.join(workdir, "teacher_fit.msgpack"), fit)
  json.dump(out, open(os.path.join(workdir, "metrics.json"), "w"), indent=1, default=float)
  return out, workdir


def main(argv):
  del argv
  jax.config.update("jax_compilation_cache_dir", os.path.join(_WORK.value, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  os.makedirs(_OUT.value, exist_ok=True)
  rows = list(ROWS)
  if _LONG.value:
    rows += [(f"{r}_long", f"{name}, {_LONG.value}x budget", variant, overrides, _LONG.value)
             for r, name, variant, overrides, _ in ROWS if r in ("sgts", "phased")]
  if _ONLY.value:
    rows = [r for r in rows if r[0] in _ONLY.value]
  for dataset in _DATASETS.value:
    results = {}
    for _, name, variant, overrides, mult in rows:
      for seed in map(int, _SEEDS.value):
        out, workdir = run_one(name, variant, overrides, _STEPS.value * mult, dataset, seed)
        results.setdefault(name, []).append(out)
        print(f"[{dataset}] {name} seed {seed}: std {out['student/std_ratio']:.3f} "
              f"modes {out['student/modes_covered']} werr {out['student/weight_error_max']:.3f} "
              f"({out.get('wall_s', 0):.0f}s)", flush=True)
        if seed == int(_SEEDS.value[0]):
          slug = "".join(ch if ch.isalnum() else "_" for ch in name)
          shutil.copy(os.path.join(workdir, "samples_final.png"),
                      os.path.join(_OUT.value, f"gmm_{dataset}_{slug}.png"))
      write_table(dataset, results)


def write_table(dataset, results):
  rows = []
  # The teacher reference refines the run's grid (eval.teacher_substeps per interval): take it
  # from a 4-step run (256 Euler steps), not from one-step DMD's 1-interval grid (64 steps).
  first = results.get("phased_dmd (4-step 4-phase)", next(iter(results.values())))
  rows.append({"method": "teacher, many-step Euler (256 steps, reference)",
               "modes covered": [r["teacher/modes_covered"] for r in first],
               "weight err (max)": [r["teacher/weight_error_max"] for r in first],
               "std ratio": [r["teacher/std_ratio"] for r in first],
               "SW to exact": [r["teacher/sliced_wasserstein"] for r in first]})
  for name, runs in results.items():
    row = {"method": name,
           "modes covered": [r["student/modes_covered"] for r in runs],
           "weight err (max)": [r["student/weight_error_max"] for r in runs],
           "std ratio": [r["student/std_ratio"] for r in runs],
           "SW to exact": [r["student/sliced_wasserstein"] for r in runs],
           "ms / step": [r["time_per_step_ms"] for r in runs],
           "temp MB": [max(m["temp_bytes"] for m in r["memory_by_phase"].values()) / 2**20
                       for r in runs],
           "peak MB": [r["peak_memory_bytes"] / 2**20 for r in runs]}
    bounds = sorted({k.split("/")[0] for k in runs[0] if k.startswith("boundary_")})
    row["boundary dist. ratio vs teacher"] = " / ".join(
        f"{sum(r[b + '/ratio'] for r in runs) / len(runs):.3f}" for b in bounds) or "-"
    rows.append(row)
  cols = ["method", "modes covered", "weight err (max)", "std ratio", "SW to exact",
          "boundary dist. ratio vs teacher", "ms / step", "temp MB", "peak MB"]
  n = len(first)
  m = first[0]["student/num_modes"]
  default = _load_config("method=phased_dmd")
  header = (f"# Gaussian mixture: {dataset} ({m:.0f} modes), {n} seed(s), "
            f"{_STEPS.value} generator updates (TTUR 5, batch 256, generator lr "
            f"{default.generator.lr:g}, fake lr {default.fake.lr:g})\n\n"
            f"Command: `python experiments/gmm_compare.py --datasets={dataset} "
            f"--seeds={','.join(_SEEDS.value)} --steps={_STEPS.value} "
            f"--long={_LONG.value}"
            + (f" --only={','.join(_ONLY.value)}" if _ONLY.value else "") + "`. "
            "mean ± std over seeds. std ratio: intra-mode std of samples / true std (1 is exact). "
            "Boundary ratio: mean distance of x_{t_k} to the nearest scaled mode (1 - t_k) mu_i, "
            "distilled / teacher's many-step Euler, per internal boundary (1 is exact). "
            "ms / step: median wall time of one phase step (5 fake + 1 generator update) on 2 CPU "
            "cores, measured in the same process run by run. temp MB: XLA's compiled temporaries "
            "(activations and gradients) of the largest phase step, the memory the paper's claim "
            "is about; peak MB adds the step's arguments and outputs (the active phase's expert, "
            "fake score and optimizer states, and the finished experts).\n\n")
  with open(os.path.join(_OUT.value, f"gmm_{dataset}.md"), "w") as f:
    f.write(header + gmm_metrics.markdown_table(rows, cols))
  with open(os.path.join(_OUT.value, f"gmm_{dataset}.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
  app.run(main)
