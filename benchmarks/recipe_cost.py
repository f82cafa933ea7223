"""Cost of each recipe term: the trainer's compiled phase step on the shipped MNIST teacher
(configs/mnist.py, batch 32, TTUR 5, LoRA experts), each term alone vs the plain step, timed in
alternation in one process (median of ``--reps`` rounds), plus XLA's temporaries.

  python benchmarks/recipe_cost.py --reps=5

Writes the "recipe_cost" section of docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

_REPS = flags.DEFINE_integer("reps", 5, "Alternating rounds (one step of each variant per round).")
_PHASE = flags.DEFINE_integer("phase", 0, "Phase whose step is timed.")

VARIANTS = [
    ("plain (the default)", {}),
    ("loss scale (element_mean)", {"generator.loss_reduction": "element_mean"}),
    ("ODE anchor (16 teacher steps)", {"anchor.weight": 0.05}),
    ("IDA", {"fake.ida_lambda": 0.97}),
    ("GAN head (source fake)", {"gan.enabled": True}),
    ("GAN head (source teacher)", {"gan.enabled": True, "gan.source": "teacher"}),
    ("EMA", {"generator.ema_decay": 0.95}),
    ("CFG norm rescale", {"teacher.cfg_norm": "sample"}),
]


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from pdmd_jax import assembly, configs, trainer  # pylint: disable=import-outside-toplevel
  k = _PHASE.value
  runs = []
  for name, overrides in VARIANTS:
    c = configs.load("configs/mnist.py")
    c.mesh.data = 1
    for key, value in overrides.items():
      node = c
      *path, leaf = key.split(".")
      for p in path:
        node = node[p]
      node[leaf] = value
    run = trainer.build(c, devices=jax.devices()[:1])
    compiled = run.asm.lower(k, None, run.teacher_params, trainer.batch_for_step(run, 0)).compile()
    state = run.asm.initial_state(k)
    runs.append({"name": name, "run": run, "fn": compiled, "state": state, "times": [],
                 "temp": assembly.memory(compiled)["temp"]})
  for r in runs:                                   # one untimed step each (allocation)
    r["state"], m = r["fn"](r["state"], r["run"].teacher_params, trainer.batch_for_step(r["run"], 0))
    jax.block_until_ready(m)
  for i in range(_REPS.value):
    for r in runs:
      batch = trainer.batch_for_step(r["run"], i + 1)
      jax.block_until_ready(batch)
      t0 = time.perf_counter()
      r["state"], m = r["fn"](r["state"], r["run"].teacher_params, batch)
      jax.block_until_ready(m)
      r["times"].append(time.perf_counter() - t0)
  base = float(np.median(runs[0]["times"]))
  lines = [f"## Cost of the recipe terms (`python benchmarks/recipe_cost.py --reps={_REPS.value}`)",
           "",
           f"The trainer's compiled phase-{k + 1} step (5 fake updates + 1 generator update, batch "
           "32, the shipped MNIST teacher and configs/mnist.py) with one term on, timed in "
           f"alternation with the plain step in one process ({common.machine()}); median of "
           f"{_REPS.value} rounds. temp: XLA's compiled temporaries.",
           "", "| term | ms / step | vs plain | temp MiB |", "|---|---|---|---|"]
  for r in runs:
    t = float(np.median(r["times"]))
    lines.append(f"| {r['name']} | {1000 * t:.0f} | {t / base:.2f}x | {r['temp'] / 2**20:.1f} |")
  text = "\n".join(lines)
  print(text)
  common.write_section("recipe_cost", text)


if __name__ == "__main__":
  app.run(main)
