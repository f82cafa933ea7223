"""Phase-step time: pdmd_jax (jit) against the plain PyTorch reference (eager), same process.

  PYTHONPATH=. python benchmarks/step_time.py --runs=5

First both run one phase step from the same weights with the same randomness (the noise the
JAX step draws from fold_in(rng, step) is recomputed and passed to PyTorch), and the losses,
gradient norms and updated parameters are compared. Then the two alternate for ``--runs``
timed steps each (after a warm-up); the table gives medians and the ratio. The step: the
MNIST teacher's architecture (DiT "small": 32x32x1, patch 4, width 128, depth 4, 4 heads;
random weights), phased_dmd_sgts 4 steps 2 phases, phase 2 (the longest frozen prefix),
LoRA r16 experts, full fake copies, CFG 3, TTUR 5, batch 32 (configs/mnist.py).
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import numpy as np
import torch
from absl import app, flags

from benchmarks import common
from benchmarks import torch_reference as tr
from pdmd_jax import train_step as ts
from pdmd_jax.models import dit

flags.DEFINE_integer("runs", 5, "Timed steps per implementation (alternating).")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("ttur", 5, "Fake updates per generator update.")
flags.DEFINE_integer("phase", 1, "Phase to step (0-based).")
flags.DEFINE_bool("write", True, "Write the table to docs/benchmarks.md.")
FLAGS = flags.FLAGS


def jax_noise(cfg: ts.StepConfig, k: int, rng, step: int, batch: int) -> list[tr.Noise]:
  """The z, SGTS stop, t and eps that ts.phase_step draws for (rng, step, phase k)."""
  phase = cfg.plan.phases[k]
  base = jax.random.fold_in(jax.random.fold_in(rng, step), k)
  out = []
  for i in range(cfg.ttur + 1):
    kz, ks, kt, ke = jax.random.split(jax.random.fold_in(base, i), 4)   # ts._keys order
    stop = 0
    if phase.grad_mode == "sgts" and phase.num_steps > 1:
      stop = int(jax.random.randint(ks, (), 0, phase.num_steps))
    t = lambda a: torch.from_numpy(np.array(a))
    out.append(tr.Noise(z=t(jax.random.normal(kz, (batch,) + cfg.sample_shape)), stop=stop,
                        t=t(phase.t_sampler(kt, (batch,))),
                        eps=t(jax.random.normal(ke, (batch,) + cfg.sample_shape))))
  return out


def torch_model(asm, state, dit_cfg, lora_scale: float) -> tr.PhasedDMD:
  cfg = asm.step_cfg
  kinds = [("eq11" if cfg.fake_target == "eq13" and p.boundary == 0.0 and not cfg.clamp_final_phase
            else cfg.fake_target) for p in cfg.plan.phases]
  experts = ts.fill_experts(state.experts, asm.family.expert_init)   # every phase's tree
  fakes = ts.fill_experts(state.fakes, asm.family.fake_init)
  loras = [{p: {n: torch.from_numpy(np.array(v)) for n, v in ab.items()} for p, ab in e.items()}
           for e in experts]
  return tr.PhasedDMD(
      tr.DiTShape.from_jax(dit_cfg), tr.params_from_jax(asm.family.teacher_params), loras,
      [tr.params_from_jax(f) for f in fakes],
      [tr.PhaseSpec(p.times, p.boundary, p.grad_mode) for p in cfg.plan.phases],
      lora_scale=lora_scale, guidance=cfg.teacher.guidance_scale, ttur=cfg.ttur,
      weighting=cfg.weighting, fake_target_kind=kinds, gen_lr=3e-4, fake_lr=1e-4,
      norm_floor=cfg.norm_floor)


def _max_diff(a_tree, b_flat) -> tuple[float, float]:
  """(max |a - b|, max |b|) over a JAX tree and the matching flat torch dict."""
  a_flat = tr.params_from_jax(a_tree)
  d = max(float((a_flat[k] - b_flat[k].detach()).abs().max()) for k in a_flat)
  m = max(float(b_flat[k].detach().abs().max()) for k in a_flat)
  return d, m


def build(ttur: int, batch_size: int):
  """The benchmarked step's assembly (the trainer's), initial state, labels and the matching
  PyTorch model."""
  torch.manual_seed(0)
  dit_cfg = dit.config_for("small", patch=4)
  asm = common.dit_assembly(dit_cfg, method="phased_dmd_sgts", steps=4, phases=2, ttur=ttur,
                            batch=batch_size, abstract=False)
  state0 = jax.device_get(asm.initial_state(FLAGS.phase))
  ys = asm.family.sample_cond(jax.random.PRNGKey(1), (asm.step_cfg.ttur + 1, batch_size))
  return asm, state0, ys, torch_model(asm, state0, dit_cfg, lora_scale=1.0)


def main(argv):
  del argv
  asm, state0, ys, model = build(FLAGS.ttur, FLAGS.batch)
  cfg, k, batch_size = asm.step_cfg, FLAGS.phase, FLAGS.batch
  teacher = asm.family.teacher_params

  # ---- parity: one phase step from the same weights and noise
  fn = ts.jit_phase_step(cfg, k)
  t0 = time.perf_counter()
  compiled = fn.lower(state0, teacher, {"y": ys}).compile()
  compile_s = time.perf_counter() - t0
  noise = jax_noise(cfg, k, state0.rng, int(state0.step), batch_size)
  state, m_jax = compiled(jax.device_put(state0), teacher, {"y": ys})
  state, m_jax = jax.device_get((state, m_jax))
  y_t = torch.from_numpy(np.array(ys)).long()
  m_torch = model.phase_step(k, y_t, noise)
  assert int(m_jax["stop_index"]) == noise[-1].stop
  rows = ["| quantity | JAX | PyTorch | relative difference |", "|---|---|---|---|"]
  worst = 0.0
  for name in ("fake_loss", "fake_grad_norm", "gen_surrogate", "gen_grad_norm", "dmd_grad_norm"):
    a, b = float(m_jax[name]), m_torch[name]
    rel = abs(a - b) / max(abs(b), 1e-12)
    worst = max(worst, rel)
    rows.append(f"| {name} | {a:.6g} | {b:.6g} | {rel:.1e} |")
  lora_t = {f"{p}.{n}": v for p, ab in model.loras[k].items() for n, v in ab.items()}
  for label, tree, flat in (("LoRA expert after the step", state.experts[k], lora_t),
                            ("fake score after the step", state.fakes[k], model.fakes[k])):
    d, mx = _max_diff(tree, flat)
    rows.append(f"| {label}: max abs diff / max abs value | | | {d:.1e} / {mx:.2f} |")
  parity = "\n".join(rows)
  print(parity)
  if worst > 1e-3:
    sys.exit(f"JAX and PyTorch disagree (worst relative difference {worst:.1e}); not timing")

  if FLAGS.runs == 0:
    return
  # ---- timing: alternate, medians
  state = jax.device_put(state0)
  teacher = jax.device_put(teacher)
  ys_d = jax.device_put({"y": ys})
  state, m = compiled(state, teacher, ys_d)           # warm-up
  jax.block_until_ready((state, m))
  model.phase_step(k, y_t, noise)
  t_jax, t_torch = [], []
  for _ in range(FLAGS.runs):
    t0 = time.perf_counter()
    state, m = compiled(state, teacher, ys_d)
    jax.block_until_ready((state, m))
    t_jax.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    model.phase_step(k, y_t, noise)
    t_torch.append(time.perf_counter() - t0)
  mj, mt = statistics.median(t_jax), statistics.median(t_torch)
  table = "\n".join([
      "| implementation | median step (s) | all runs (s) |", "|---|---|---|",
      f"| pdmd_jax (jit, compiled once in {compile_s:.1f} s) | {mj:.3f} | "
      f"{', '.join(f'{x:.2f}' for x in t_jax)} |",
      f"| PyTorch {torch.__version__} eager ({torch.get_num_threads()} threads) | {mt:.3f} | "
      f"{', '.join(f'{x:.2f}' for x in t_torch)} |",
      f"| ratio PyTorch / JAX | {mt / mj:.2f} | |"])
  print(table)
  if FLAGS.write:
    cmd = (f"PYTHONPATH=. python benchmarks/step_time.py --runs={FLAGS.runs} "
           f"--batch={batch_size} --ttur={cfg.ttur} --phase={k}")
    common.write_section("step_time", f"""## Phase step: pdmd_jax vs a plain PyTorch reference

`{cmd}` ({common.machine()}; jax {jax.__version__}, torch {torch.__version__})

DiT "small" (the MNIST teacher's architecture: 32x32x1, patch 4, width 128, depth 4, 4 heads;
random perturbed weights), phased_dmd_sgts 4 steps 2 phases, phase {k + 1}, LoRA r16 experts on
the frozen teacher, full fake copies, CFG 3, TTUR {cfg.ttur}, batch {batch_size},
dmd_normalized weighting, AdamW (beta1 0, clip 1).
PyTorch reference: benchmarks/torch_reference.py (eager, float32, SDPA attention).

Parity (one phase step, same weights, same noise; the script refuses to time if a loss or
gradient norm differs by more than 1e-3 relative). Parameters after the step differ by more
than the losses: AdamW with beta1 = 0 moves every entry by about lr (3e-4 LoRA, 1e-4 fake)
whatever its gradient's size, so an entry whose gradient is near zero can move by a different
fraction of lr in the two implementations.

{parity}

Time (alternating runs, {FLAGS.runs} each after a warm-up):

{table}
""")


if __name__ == "__main__":
  app.run(main)
