"""All methods on the shipped MNIST DiT teacher: equal budgets, several seeds.

Every method gets the same number of generator updates, TTUR ratio, batch, LoRA rank,
optimizers and teacher CFG; phased methods split their budget evenly over their phases. All
runs share the evaluation noise and labels (eval.seed), so the teacher's many-step reference is
the same image set for every row. Writes ``docs/results/mnist.md`` (mean ± std over seeds),
``mnist.json`` (every run) and the seed-0 sample grids (rows = classes, columns = seeds).

  python experiments/mnist_compare.py --seeds=0,1,2 --steps=300
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

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (LoRA init, noise, t, labels).")
_STEPS = flags.DEFINE_integer("steps", 300, "Generator updates per run (all methods).")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "docs", "results"), "Output directory.")
_WORK = flags.DEFINE_string("workroot", "/tmp/pdmd_mnist_compare", "Scratch workdirs.")
_ONLY = flags.DEFINE_list("only", [], "Run only these row ids (phased_sgts, phased, sgts, dmd, "
                          "multistep).")

# (row id, row name, config variant)
ROWS = [
    ("phased_sgts", "phased_dmd_sgts (4-step 2-phase, default)", "method=phased_dmd_sgts,steps=4,phases=2"),
    ("phased", "phased_dmd (4-step 4-phase)", "method=phased_dmd,steps=4"),
    ("sgts", "dmd2_sgts (4 steps)", "method=dmd2_sgts,steps=4"),
    ("dmd", "dmd (1 step)", "method=dmd"),
    ("multistep", "dmd_multistep (4 steps)", "method=dmd_multistep,steps=4"),
]
METRICS = [("accuracy", "class acc."), ("fd_real", "FD real"), ("fd_reference", "FD teacher"),
           ("feature_cosine", "feat. cosine"), ("pixel_l2", "pixel L2"), ("saturation", "saturation")]


def _load_config(variant):
  return configs.load(f"configs/mnist.py:{variant}")


def run_one(row_id, variant, steps, seed):
  config = _load_config(f"{variant},seed={seed}")
  config.train.num_steps = steps
  config.train.ckpt_every = steps
  workdir = os.path.join(_WORK.value, f"{row_id}_x{steps}_s{seed}")
  if os.path.exists(os.path.join(workdir, "metrics.json")):
    return json.load(open(os.path.join(workdir, "metrics.json"))), workdir
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  ref = os.path.join(_WORK.value, "teacher_reference")   # the teacher's samples, shared
  if os.path.isdir(ref):
    for f in os.listdir(ref):
      shutil.copy(os.path.join(ref, f), workdir)
  t0 = time.time()
  out = trainer.train_and_evaluate(config, workdir, evaluate_phases=False, verbose=False)
  out["wall_s"] = time.time() - t0
  os.makedirs(ref, exist_ok=True)
  for f in os.listdir(workdir):
    if f.startswith("teacher_samples"):
      shutil.copy(os.path.join(workdir, f), ref)
  json.dump(out, open(os.path.join(workdir, "metrics.json"), "w"), indent=1, default=float)
  return out, workdir


def main(argv):
  del argv
  jax.config.update("jax_compilation_cache_dir", os.path.join(_WORK.value, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  os.makedirs(_OUT.value, exist_ok=True)
  rows = [r for r in ROWS if not _ONLY.value or r[0] in _ONLY.value]
  results = {}
  for row_id, name, variant in rows:
    for seed in map(int, _SEEDS.value):
      out, workdir = run_one(row_id, variant, _STEPS.value, seed)
      results.setdefault(name, []).append(out)
      print(f"{name} seed {seed}: acc {out['student/accuracy']:.3f} fd_real "
            f"{out['student/fd_real']:.2f} cos {out['student/feature_cosine']:.3f} "
            f"({out.get('wall_s', 0):.0f}s)", flush=True)
      if seed == int(_SEEDS.value[0]):   # (a cached run restored from mnist.json has no PNGs)
        for src, dst in (("samples_final.png", f"mnist_{row_id}.png"),
                         ("teacher_samples.png", "mnist_teacher.png")):
          if os.path.exists(os.path.join(workdir, src)):
            shutil.copy(os.path.join(workdir, src), os.path.join(_OUT.value, dst))
      write_table(results)


def write_table(results):
  first = next(iter(results.values()))
  rows = [{"method": "teacher, 32-step Euler + CFG 3 (reference)", "steps": 32,
           **{label: [r[f"teacher/{k}"] for r in first[:1]] for k, label in METRICS
              if k != "fd_reference"}}]
  for name, runs in results.items():
    row = {"method": name, "steps": int(runs[0].get("num_steps", 1 if "1 step" in name else 4)),
           "seeds": len(runs)}
    row.update({label: [r[f"student/{k}"] for r in runs] for k, label in METRICS})
    row["ms / step"] = [r["time_per_step_ms"] for r in runs]
    row["temp MB"] = [max(m["temp_bytes"] for m in r["memory_by_phase"].values()) / 2**20
                      for r in runs]
    row["peak MB"] = [r["peak_memory_bytes"] / 2**20 for r in runs]
    rows.append(row)
  cols = (["method", "steps", "seeds"] + [label for _, label in METRICS]
          + ["ms / step", "temp MB", "peak MB"])
  header = (f"# MNIST DiT teacher: all methods, {_STEPS.value} generator updates "
            "(TTUR 5, batch 32, LoRA rank 16, CFG 3)\n\n"
            "mean ± std over seeds; 500 samples per run (50 per class) from the same noise and "
            "labels. class acc.: the project's classifier (prompt following). FD real / FD "
            "teacher: Frechet distance in the classifier's 128-d feature space to the 500 real "
            "held-out digits / to the teacher's samples (biased upward at N = 500: compare rows, "
            "not papers). feat. cosine: mean same-class pairwise cosine similarity of features "
            "(higher = less diverse; the analogue of the paper's DINOv3 metric). pixel L2: mean "
            "same-class pairwise pixel distance (higher = more diverse). saturation: fraction of "
            "pixels outside [-1, 1]. ms / step: median wall time of one phase step (TTUR fake "
            "updates + one generator update) on 2 CPU cores (other jobs shared the CPU during some runs: "
            "compare ms / step only loosely; docs/benchmarks.md has clean ratios). temp MB: "
            "XLA's compiled temporaries of the largest phase step; peak MB adds arguments and "
            "outputs.\n\n")
  with open(os.path.join(_OUT.value, "mnist.md"), "w") as f:
    f.write(header + gmm_metrics.markdown_table(rows, cols))
    f.write("\nSample grids (seed 0): " + ", ".join(
        f"[{r}](mnist_{r}.png)" for r, _, _ in ROWS
        if os.path.exists(os.path.join(_OUT.value, f"mnist_{r}.png"))) +
        ", [teacher](mnist_teacher.png)\n")
  with open(os.path.join(_OUT.value, "mnist.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
  app.run(main)
