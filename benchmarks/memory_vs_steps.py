"""Compiled temporary memory of one generator update against the number of sampling steps N.

  PYTHONPATH=. python benchmarks/memory_vs_steps.py --steps=1,2,4,8

For dmd_multistep (gradient through all N steps), dmd2_sgts (one random step with gradient)
and phased_dmd (N phases; the update of the last phase, which runs the longest frozen
prefix), ``train_step.generator_step`` is compiled for abstract arguments and XLA's
``memory_analysis().temp_size_in_bytes`` is read (the working memory on top of the
arguments: activations kept for the backward pass, gradients, optimizer temporaries). Writes
a table to docs/benchmarks.md and a plot to docs/memory_vs_steps.png.
"""

from __future__ import annotations

import functools
import os

import jax
from absl import app, flags

from benchmarks import common
from pdmd_jax import assembly
from pdmd_jax import train_step as ts
from pdmd_jax.models import dit

METHODS = ("dmd_multistep", "dmd2_sgts", "phased_dmd")
flags.DEFINE_list("steps", ["1", "2", "4", "8"], "Numbers of sampling steps N.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_bool("write", True, "Write docs/benchmarks.md and docs/memory_vs_steps.png.")
FLAGS = flags.FLAGS


def generator_temp_bytes(method: str, n: int, batch: int) -> dict:
  asm = common.dit_assembly(dit.config_for("small", patch=4), method=method, steps=n,
                            phases=n if method == "phased_dmd" else 1, batch=batch)
  cfg = asm.step_cfg
  k = cfg.plan.num_phases - 1
  y = jax.eval_shape(lambda key: asm.family.sample_cond(key, (batch,)), jax.random.PRNGKey(0))
  key = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
  fn = jax.jit(functools.partial(ts.generator_step, cfg, k))
  compiled = fn.lower(asm.abstract_state(), asm.teacher_params(), y, key).compile()
  return assembly.memory(compiled)


def _plot(results, steps, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5, 3.4))
  styles = {"dmd_multistep": "o-", "dmd2_sgts": "s-", "phased_dmd": "^--"}
  for method in METHODS:   # dmd2_sgts and phased_dmd coincide: dashed on top
    ax.plot(steps, [results[method][n]["temp"] / 2**20 for n in steps], styles[method],
            label=method, markersize=7 if method == "dmd2_sgts" else 5)
  ax.set_xscale("log", base=2)
  ax.set_xticks(steps, [str(n) for n in steps])
  ax.set_xlabel("sampling steps N")
  ax.set_ylabel("compiled temp memory (MiB)")
  ax.set_title("One generator update (DiT small, batch %d)" % FLAGS.batch, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  steps = [int(s) for s in FLAGS.steps]
  results = {m: {} for m in METHODS}
  for method in METHODS:
    for n in steps:
      results[method][n] = generator_temp_bytes(method, n, FLAGS.batch)
      print(method, n, results[method][n], flush=True)
  mib = lambda b: f"{b / 2**20:.1f}"
  rows = ["| method | " + " | ".join(f"temp N={n}" for n in steps) + " | "
          + " | ".join(f"arguments N={n}" for n in steps) + " |",
          "|---|" + "---|" * 2 * len(steps)]
  for method in METHODS:
    rows.append(f"| {method} | " + " | ".join(mib(results[method][n]["temp"]) for n in steps)
                + " | " + " | ".join(mib(results[method][n]["argument"]) for n in steps) + " |")
  table = "\n".join(rows)
  print(table)
  if FLAGS.write:
    png = os.path.join(common.ROOT, "docs", "memory_vs_steps.png")
    _plot(results, steps, png)
    common.write_section("memory_vs_steps", f"""## Generator-update memory vs sampling steps

`PYTHONPATH=. python benchmarks/memory_vs_steps.py --steps={','.join(FLAGS.steps)} --batch={FLAGS.batch}`
(jax {jax.__version__}, XLA:CPU)

Compiled temp memory and argument size (MiB) of one `generator_step` (DiT "small", 32x32x1, batch {FLAGS.batch},
LoRA r16 experts, CFG 3), for the last phase. dmd_multistep backpropagates through all N
steps, so its activations grow with N; dmd2_sgts keeps the gradient of one step; phased_dmd's
last phase runs N - 1 frozen steps without gradient and one step with it, so its working
memory is dmd2_sgts's. Its arguments grow instead: N LoRA experts and N full fake copies
(with AdamW moments) live in the state.

{table}

![temp memory vs N](memory_vs_steps.png)
""")


if __name__ == "__main__":
  app.run(main)
