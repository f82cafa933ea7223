"""Whole-step memory of the trainer's compiled phase step against the number of sampling steps N.

  PYTHONPATH=. python benchmarks/memory_vs_steps.py --steps=1,2,4,8

For dmd_multistep (gradient through all N steps), dmd2_sgts (one random step with gradient)
and phased_dmd (N phases, progressive; the last phase, which holds the most frozen experts
and runs the longest frozen prefix), the trainer's phase step (``Assembly.lower``: TTUR fake
updates + one generator update, state donated) is compiled for abstract arguments and XLA's
``memory_analysis`` is read: peak = arguments + outputs - aliased + temporaries. Writes a table
to docs/benchmarks.md and a plot to docs/memory_vs_steps.png; exits non-zero if phased_dmd's
peak at the largest N exceeds 1.1 x one-step DMD's plus its frozen experts' parameters.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags

from benchmarks import common
from pdmd_jax import assembly
from pdmd_jax.models import dit

METHODS = ("dmd_multistep", "dmd2_sgts", "phased_dmd")
flags.DEFINE_list("steps", ["1", "2", "4", "8"], "Numbers of sampling steps N.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("ttur", 5, "Fake updates per generator update.")
flags.DEFINE_bool("write", True, "Write docs/benchmarks.md and docs/memory_vs_steps.png.")
FLAGS = flags.FLAGS


def step_memory(method: str, n: int, batch: int, ttur: int) -> dict:
  """Per-device bytes of the last phase's compiled step, plus its frozen experts' bytes."""
  asm = common.dit_assembly(dit.config_for("small", patch=4), method=method, steps=n,
                            phases=n if method == "phased_dmd" else 1, batch=batch, ttur=ttur)
  k = asm.plan.num_phases - 1
  out = assembly.memory(asm.lower(k).compile())
  state = asm.abstract_state(k)
  out["frozen"] = assembly.num_bytes([e for e, o in zip(state.experts, state.expert_opt)
                                      if e is not None and o is None])
  return out


def _plot(results, steps, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5, 3.4))
  styles = {"dmd_multistep": "o-", "dmd2_sgts": "s-", "phased_dmd": "^--"}
  for method in METHODS:
    ax.plot(steps, [results[method][n]["peak"] / 2**20 for n in steps], styles[method],
            label=method, markersize=7 if method == "dmd2_sgts" else 5)
  ax.set_xscale("log", base=2)
  ax.set_xticks(steps, [str(n) for n in steps])
  ax.set_xlabel("sampling steps N")
  ax.set_ylabel("compiled peak per step (MiB)")
  ax.set_title(f"Phase step, TTUR {FLAGS.ttur} (DiT small, batch {FLAGS.batch})", fontsize=9)
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
      results[method][n] = step_memory(method, n, FLAGS.batch, FLAGS.ttur)
      print(method, n, results[method][n], flush=True)
  mib = lambda b: f"{b / 2**20:.1f}"
  cols = ("peak", "argument", "temp")
  rows = ["| method | " + " | ".join(f"{c} N={n}" for c in cols for n in steps) + " |",
          "|---|" + "---|" * len(cols) * len(steps)]
  for method in METHODS:
    rows.append(f"| {method} | " + " | ".join(mib(results[method][n][c]) for c in cols
                                              for n in steps) + " |")
  table = "\n".join(rows)
  one_step = results["dmd_multistep"][1]["peak"] if 1 in steps else None
  n_max = max(steps)
  phased = results["phased_dmd"][n_max]
  verdict = ""
  if one_step is not None:
    bound = 1.1 * one_step + phased["frozen"]
    ok = phased["peak"] <= bound
    verdict = (f"phased_dmd at N={n_max}: peak {mib(phased['peak'])} MiB against 1.1 x one-step "
               f"DMD's {mib(one_step)} + its {n_max - 1} frozen experts' {mib(phased['frozen'])} "
               f"= {mib(bound)} MiB: {'within' if ok else 'OVER'} the bound "
               f"({phased['peak'] / (one_step + phased['frozen']):.3f} x one-step DMD + frozen).")
  print(table)
  print(verdict)
  if FLAGS.write:
    png = os.path.join(common.ROOT, "docs", "memory_vs_steps.png")
    _plot(results, steps, png)
    common.write_section("memory_vs_steps", f"""## Phase-step memory vs sampling steps

`PYTHONPATH=. python benchmarks/memory_vs_steps.py --steps={','.join(FLAGS.steps)} --batch={FLAGS.batch} --ttur={FLAGS.ttur}`
(jax {jax.__version__}, XLA:CPU)

Per-device MiB of the trainer's compiled phase step (TTUR {FLAGS.ttur} fake updates + one
generator update, the state donated) for the last phase: DiT "small" (32x32x1), batch
{FLAGS.batch}, LoRA r16 experts, full fake copies with AdamW, CFG 3. peak = arguments +
outputs - aliased + temporaries. dmd_multistep backpropagates through all N steps, so its
temporaries grow with N; dmd2_sgts keeps the gradient of one step; phased_dmd's last phase
runs N - 1 frozen steps without gradient (one loop, each step's expert picked by a switch,
`rollout.frozen_prefix`; unrolled, they took 168.8 MiB of temporaries at N = 8) and one with
it, so its temporaries are close to dmd2_sgts's.
Its state holds only the active phase's expert, fake score and moments, plus the N - 1 finished
LoRA experts as frozen parameters (progressive order; the interleaved order keeps all N phases'
fakes and moments live, the earlier layout's 21 -> 134 MiB of arguments).

{table}

{verdict}

![peak memory vs N](memory_vs_steps.png)
""")
  if one_step is not None and phased["peak"] > 1.1 * one_step + phased["frozen"]:
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
