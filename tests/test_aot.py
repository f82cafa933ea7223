"""The AOT planner: FLOP counting through loops; it compiles the trainer's own program."""

import chex
import jax
import jax.numpy as jnp
import pytest

from pdmd_jax import aot as plan
from pdmd_jax import assembly
from pdmd_jax import configs
from pdmd_jax import trainer
from pdmd_jax.families import dit as dit_family
from pdmd_jax.models import dit


def test_matmul_flops_count_scans_by_length():
  w = jnp.ones((10, 64, 64))
  x = jnp.ones((8, 64))
  one = 2 * 8 * 64 * 64
  scan = lambda x: jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]
  assert plan.matmul_flops(scan, x) == (10 * one, 0)
  # Static trip counts become scans; a dynamic one stays a while loop, counted once.
  fori = lambda x: jax.lax.fori_loop(0, 10, lambda i, h: h @ w[i], x)
  assert plan.matmul_flops(fori, x) == (10 * one, 0)
  dyn = lambda x, n: jax.lax.fori_loop(0, n, lambda i, h: h @ w[i], x)
  assert plan.matmul_flops(dyn, x, 3) == (one, 1)
  # cond: the most expensive branch; grad: forward + two backward matmuls.
  br = lambda x, p: jax.lax.cond(p, lambda x: x @ w[0] @ w[1], lambda x: x @ w[0], x)
  assert plan.matmul_flops(br, x, True) == (2 * one, 0)
  g = jax.grad(lambda w0: jnp.sum(x @ w0))
  assert plan.matmul_flops(g, w[0])[0] == 2 * one   # x^T dy (dx is not needed)


def test_abstract_phase_step_compiles_on_a_mesh():
  """Abstract DiT step on (fsdp 4 x tensor 2): memory, FLOPs and the largest arrays' specs."""
  cfg = dit.config_for("tiny", image_size=8, patch=4, hidden=16, depth=1, heads=2, time_dim=32,
                       scan_layers=True)
  c = dit_family.random_config(cfg, "runlocal", {
      "fake.ttur": 1, "train.batch_size": 8, "generator.lora_rank": 4, "mesh.data": 1,
      "mesh.fsdp": 4, "mesh.tensor": 2})
  asm = assembly.build(c, abstract=True)
  chex.assert_trees_all_equal_structs(asm.abstract_state(1), asm.state_shardings[1])
  r = plan.compile_phase_step(asm, 1)
  m = r["memory"]
  # Donation: the whole state is an input and an output, so it aliases; what is left of the
  # arguments is the teacher and the batch.
  state_bytes = assembly.num_bytes(asm.abstract_state(1)) // 8   # every leaf split 8 ways or less
  assert m["alias"] >= state_bytes > 0
  assert m["temp"] > 0 and m["argument"] >= m["alias"]
  assert r["matmul_flops"] > 0 and r["while_loops"] == 2          # the SGTS stop loops
  rows = plan.largest_arrays({"state": r["args"][0]}, n=50)
  specs = {row["path"]: row["spec"] for row in rows}
  assert specs["state.fakes[1].blocks.fc1.kernel"] == "P(None, 'fsdp', 'tensor')"
  text = plan.format_report(r, asm.mesh, "tiny")
  assert "| temp |" in text and "largest arguments" in text


def test_planner_compiles_the_trainers_program():
  """configs/wan22.py:tiny on 8 devices: the planner's abstract lowering and the trainer's
  concrete one are the same program (same StableHLO text: the same shardings, donation and
  activation constraints, hence the same per-device memory)."""
  c = configs.load("configs/wan22.py:tiny")
  c.train.batch_size = 8
  c.mesh.data, c.mesh.fsdp = 2, -1
  planned = assembly.build(c, abstract=True).lower(1)   # what aot.compile_phase_step compiles
  run = trainer.build(c)
  lowered = run.asm.lower(1, run.asm.initial_state(1), run.teacher_params,
                          trainer.batch_for_step(run, 0))
  assert lowered.as_text() == planned.as_text()   # hence the same compiled program


def test_a_mesh_that_cannot_hold_the_state_is_refused_before_compiling():
  """Wan2.2-A14B at the paper's resolution with 80 GiB devices: one device cannot hold the
  state (the error names the GiB and the levers); 8 can, but dense attention cannot (32,760
  tokens: the error names the sequence length and the blockwise implementation)."""
  c = configs.load("configs/wan22.py")
  c.train.device_memory_gib = 80.0
  c.mesh.data, c.mesh.fsdp, c.train.batch_size = 1, 1, 1
  with pytest.raises(ValueError, match=r"need [\d.]+ GiB per device.*80\.0 GiB.*mesh\.fsdp.*"
                                       r"fake\.lora_rank"):
    assembly.build(c, devices=jax.devices()[:1], abstract=True)
  c.mesh.fsdp, c.train.batch_size = 8, 8
  c.model.attention = "dense"
  with pytest.raises(ValueError, match=r"L = 32760 tokens, 40 heads.*model\.attention="
                                       r"'blockwise'"):
    assembly.build(c, abstract=True)
  c.model.attention = "blockwise"
  asm = assembly.build(c, abstract=True)          # fits: state + teacher under 80 GiB
  state = assembly.per_device_bytes(asm.abstract_state_trees[1], asm.state_shardings[1])
  assert 30 * 2**30 < state < 60 * 2**30
