"""The AOT planner: FLOP counting through loops, and an abstract compile on 8 devices."""

import jax
import jax.numpy as jnp
import pytest

from pdmd_jax import plan
from pdmd_jax import sharding as sh
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


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


def test_abstract_phase_step_compiles_on_a_mesh():
  """Abstract DiT step on (fsdp 4 x tensor 2): memory, FLOPs and the largest arrays' specs."""
  cfg = dit.config_for("tiny", image_size=8, patch=4, hidden=16, depth=1, heads=2, time_dim=32,
                       scan_layers=True)
  setup = plan.dit_setup(cfg, abstract=True, lora_rank=4, ttur=1)
  mesh = sh.mesh_from_sizes({"fsdp": 4, "tensor": 2})
  r = plan.compile_phase_step(setup, 1, mesh, batch_size=8)
  m = r["memory"]
  assert m["argument"] > 0 and m["temp"] > 0 and m["alias"] > 0   # the state is donated
  assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
  assert r["matmul_flops"] > 0 and r["while_loops"] == 2          # the SGTS stop loops
  rows = plan.largest_arrays({"state": r["args"][0]}, n=50)
  specs = {row["path"]: row["spec"] for row in rows}
  assert specs["state.fakes[0].blocks.fc1.kernel"] == "P(None, 'fsdp', 'tensor')"
  text = plan.format_report(r, mesh, "tiny")
  assert "| temp |" in text and "largest arguments" in text
