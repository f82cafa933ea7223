"""Memory saved by the shared-backbone mode: LoRA fake scores on the frozen teacher.

  PYTHONPATH=. python benchmarks/shared_backbone.py

Phased DMD keeps one fake score per phase (and its AdamW moments) in the train state. With full
fake copies that is 3 x |theta| per phase (weights + two moments); in shared-backbone mode each
fake score is a LoRA tree on the teacher's frozen parameters (which the step already receives),
so a phase costs 3 x |LoRA|. The phase step (TTUR 1, batch 32) is compiled for abstract
arguments and XLA's memory analysis read: arguments (train state + teacher), temporaries, peak.
Generator experts are LoRA r16 in both columns; 4-step 4-phase Phased DMD (the most fakes).
"""

from __future__ import annotations

import jax
from absl import app, flags

from benchmarks import common
from pdmd_jax import assembly
from pdmd_jax.models import dit

flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("rank", 16, "LoRA rank of the shared-backbone fakes.")
flags.DEFINE_bool("write", True, "Write the section of docs/benchmarks.md.")
FLAGS = flags.FLAGS

MODELS = [("DiT small (MNIST teacher)", dict(variant="small", patch=4)),
          ("DiT base", dict(variant="base", patch=4)),
          ("video DiT small (moving digits)", dict(variant="small", patch=4, frames=8,
                                                   temporal_patch=4))]


def measure(model: dict, fake_rank: int) -> dict:
  kw = dict(model)
  cfg = dit.config_for(kw.pop("variant"), **kw)
  asm = common.dit_assembly(cfg, method="phased_dmd", steps=4, phases=4, batch=FLAGS.batch,
                            fake_lora_rank=fake_rank)
  k = asm.plan.num_phases - 1
  state = asm.abstract_state(k)
  out = assembly.memory(asm.lower(k).compile())   # the trainer's step
  out["fakes"] = assembly.num_bytes((state.fakes, state.fake_opt))
  out["state"] = assembly.num_bytes(state)
  return out


def main(argv):
  del argv
  mib = lambda b: f"{b / 2**20:.1f}"
  lines = ["| model | fakes: full copies | fakes: shared backbone (LoRA r%d) | train state: full / shared "
           "| peak per step: full / shared | saving of peak |" % FLAGS.rank, "|---|---|---|---|---|---|"]
  for name, model in MODELS:
    full, shared = measure(model, 0), measure(model, FLAGS.rank)
    print(name, full, shared, flush=True)
    lines.append(f"| {name} | {mib(full['fakes'])} | {mib(shared['fakes'])} | {mib(full['state'])} / "
                 f"{mib(shared['state'])} | {mib(full['peak'])} / {mib(shared['peak'])} | "
                 f"{1 - shared['peak'] / full['peak']:.0%} |")
  table = "\n".join(lines)
  print(table)
  if FLAGS.write:
    common.write_section("shared_backbone", f"""## Shared backbone: LoRA fake scores on the frozen teacher

`PYTHONPATH=. python benchmarks/shared_backbone.py --batch={FLAGS.batch} --rank={FLAGS.rank}`
(jax {jax.__version__}, XLA:CPU; compiled for abstract arguments, nothing allocated)

Phased DMD 4-step 4-phase, LoRA r16 generator experts, phase-4 step (TTUR 1, batch {FLAGS.batch}).
Memory in MiB: the four fake scores with their AdamW moments, the whole train state, and XLA's
peak of the compiled phase step (arguments incl. the frozen teacher + outputs - aliased +
temporaries). Set `--config.fake.lora_rank=16` to train this way; the paper trains full-parameter
fakes (the default), and the quality effect of LoRA fakes is not measured here yet.

{table}
""")


if __name__ == "__main__":
  app.run(main)
