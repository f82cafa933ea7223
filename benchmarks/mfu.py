"""Model FLOP utilisation of the compiled phase step on this machine.

  PYTHONPATH=. python benchmarks/mfu.py --batches=8,16,32,64 --runs=3

MFU = (FLOPs of one phase step / its median time) / (this machine's matmul FLOP/s, measured
here: a jitted float32 n x n matmul, n = 1024 and 2048, the better median). FLOPs are XLA's
``cost_analysis`` of the compiled step (all ops, not only matmuls). XLA counts a loop body
once, so the step is chosen loop-free at run time: phased_dmd (4 steps, 4 phases; one step
per phase, no SGTS stop loop), phase 4 (three frozen experts before it), TTUR 1 (the fake
update's fori_loop runs once). The jaxpr's matmul FLOPs are shown beside it.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from pdmd_jax import aot as plan
from pdmd_jax import train_step as ts
from pdmd_jax.models import dit

flags.DEFINE_list("batches", ["8", "16", "32", "64"], "Batch sizes.")
flags.DEFINE_integer("runs", 3, "Timed steps per batch size (after one warm-up).")
flags.DEFINE_bool("write", True, "Write the table to docs/benchmarks.md.")
FLAGS = flags.FLAGS


def matmul_flops_per_s(runs: int = 10) -> tuple[float, str]:
  """Best median FLOP/s of a jitted float32 square matmul (n = 1024, 2048)."""
  best, rows = 0.0, []
  for n in (1024, 2048):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    for _ in range(3):
      f(a, a).block_until_ready()
    times = []
    for _ in range(runs):
      t0 = time.perf_counter()
      f(a, a).block_until_ready()
      times.append(time.perf_counter() - t0)
    rate = 2 * n**3 / statistics.median(times)
    rows.append(f"n={n}: {rate / 1e9:.0f} GFLOP/s")
    best = max(best, rate)
  return best, ", ".join(rows)


def main(argv):
  del argv
  peak, peak_desc = matmul_flops_per_s()
  print(f"matmul: {peak_desc}")
  dit_cfg = dit.config_for("small", patch=4)
  rows = ["| batch | XLA FLOPs / step | matmul FLOPs / step | median step (s) | achieved GFLOP/s "
          "| MFU |", "|---|---|---|---|---|---|"]
  for batch in map(int, FLAGS.batches):
    asm = common.dit_assembly(dit_cfg, method="phased_dmd", steps=4, phases=4, batch=batch,
                              abstract=False)
    cfg = asm.step_cfg
    k = cfg.plan.num_phases - 1
    state, teacher = asm.initial_state(k), asm.teacher_params()
    batch_y = asm.batch_fn()(0)
    compiled = asm.lower(k, state, teacher, batch_y).compile()   # the trainer's step
    flops = plan.xla_flops(compiled)
    mm, whiles = plan.matmul_flops(lambda *a: ts.phase_step(cfg, k, *a), state, teacher,
                                   batch_y)
    assert whiles == 0
    state, m = compiled(state, teacher, batch_y)   # warm-up
    jax.block_until_ready((state, m))
    times = []
    for _ in range(FLAGS.runs):
      t0 = time.perf_counter()
      state, m = compiled(state, teacher, batch_y)
      jax.block_until_ready((state, m))
      times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    rows.append(f"| {batch} | {flops:.3e} | {mm:.3e} | {t:.3f} | {flops / t / 1e9:.1f} | "
                f"{flops / t / peak:.1%} |")
    print(rows[-1], flush=True)
  table = "\n".join(rows)
  print(table)
  if FLAGS.write:
    common.write_section("mfu", f"""## MFU of the compiled phase step

`PYTHONPATH=. python benchmarks/mfu.py --batches={','.join(FLAGS.batches)} --runs={FLAGS.runs}`
({common.machine()}; jax {jax.__version__})

Machine matmul FLOP/s (jitted float32 square matmul, median of 10): {peak_desc}; the
denominator is the better one, {peak / 1e9:.0f} GFLOP/s.
Step: DiT "small" (32x32x1, patch 4, width 128, depth 4), phased_dmd 4 steps 4 phases, phase 4,
LoRA r16 experts, full fakes, CFG 3, TTUR 1 (so XLA's cost_analysis, which counts a loop body
once, is exact: no loop runs more than once). Median of {FLAGS.runs} steps after a warm-up.

{table}
""")


if __name__ == "__main__":
  app.run(main)
