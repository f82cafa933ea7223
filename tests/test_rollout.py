"""Backward simulation (spec §2.3, §3.3): which expert entries get gradient from phase_sample.

The toy generator has one scalar pair per grid step, v = b[i] x + c[i] with i the index of t in
the grid, so a gradient on b[i] or c[i] means "grid step i was differentiated through".
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from pdmd_jax import methods
from pdmd_jax import rollout

B, D = 3, 2

# (name, method, num_steps, num_phases)
CASES = (
    ("dmd", "dmd", 4, 2),
    ("dmd_multistep", "dmd_multistep", 4, 2),
    ("dmd2_sgts", "dmd2_sgts", 4, 2),
    ("phased_dmd", "phased_dmd", 4, 2),
    ("phased_dmd_sgts", "phased_dmd_sgts", 4, 2),
    ("phased_dmd_sgts_3_per_phase", "phased_dmd_sgts", 6, 2),
    ("phased_dmd_multistep", "phased_dmd_multistep", 4, 2),
    # Unequal phases (steps_per_phase): num_phases given as the phases' step counts.
    ("phased_dmd_sgts_1_3", "phased_dmd_sgts", 4, (1, 3)),
    ("phased_dmd_multistep_3_1", "phased_dmd_multistep", 4, (3, 1)),
)


def _make_apply(plan):
  """v = b[i] x + c[i], i = index of t in the plan's grid steps (y is ignored)."""
  steps = jnp.asarray(plan.grid[:-1], jnp.float32)

  def apply(p, x, t, y):
    del y
    i = jnp.argmin(jnp.abs(steps - t[0]))
    return p["b"][i] * x + p["c"][i]

  return apply


def _experts(plan, seed=0):
  rng = np.random.default_rng(seed)
  n = plan.num_steps
  return tuple({"b": jnp.asarray(rng.uniform(-0.8, 0.8, n), jnp.float32),
                "c": jnp.asarray(rng.normal(size=n), jnp.float32)} for _ in plan.phases)


def _offsets(plan):
  """Global grid index of each phase's first step."""
  return np.cumsum([0] + [p.num_steps for p in plan.phases])[:-1]


def _reference(plan, k, experts, active, z, stop):
  """Euler rollout written from the spec, in jnp so that it can be differentiated w.r.t. active.

  Phases < k use constant (numpy) experts. Phase k: 'full' differentiates every step; 'sgts'
  runs ``stop`` steps with stop_gradient'ed params, then one Euler jump t_stop -> boundary.
  """
  x = z
  offs = _offsets(plan)
  for phase in plan.phases[:k]:
    p = jax.tree.map(np.asarray, experts[phase.index])
    nxt = phase.times[1:] + (phase.boundary,)
    for i, (t, tn) in enumerate(zip(phase.times, nxt)):
      g = offs[phase.index] + i
      x = x + (tn - t) * (p["b"][g] * x + p["c"][g])
  phase = plan.phases[k]
  nxt = phase.times[1:] + (phase.boundary,)
  o = offs[k]
  if phase.grad_mode == "full" or phase.num_steps == 1:
    for i, (t, tn) in enumerate(zip(phase.times, nxt)):
      x = x + (tn - t) * (active["b"][o + i] * x + active["c"][o + i])
    return x
  frozen = jax.lax.stop_gradient(active)
  for i in range(stop):
    t, tn = phase.times[i], nxt[i]
    x = x + (tn - t) * (frozen["b"][o + i] * x + frozen["c"][o + i])
  t = phase.times[stop]
  return x + (phase.boundary - t) * (active["b"][o + stop] * x + active["c"][o + stop])


class PhaseSampleTest(parameterized.TestCase):
  """rollout.phase_sample: gradient routing, outputs and the SGTS stop-index law, per method."""

  def _setup(self, method, num_steps, num_phases):
    sizes = num_phases if isinstance(num_phases, tuple) else None
    plan = methods.make_plan(method, num_steps, len(sizes) if sizes else num_phases, 5.0,
                             steps_per_phase=sizes)
    if sizes:
      self.assertEqual(tuple(p.num_steps for p in plan.phases), sizes)
    apply = _make_apply(plan)
    experts = _experts(plan)
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    r = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)  # random cotangent
    y = jnp.zeros((B,), jnp.int32)
    return plan, apply, experts, z, r, y

  @parameterized.named_parameters(*CASES)
  def test_gradient_routing_and_output(self, method, num_steps, num_phases):
    """Full: every step of phase k has gradient; sgts: only the drawn stop step, and the output is
    the Euler jump from that step's input to the boundary. No other expert gets gradient."""
    plan, apply, experts, z, r, y = self._setup(method, num_steps, num_phases)
    offs = _offsets(plan)
    for k, phase in enumerate(plan.phases):

      def loss(experts_, active, key, k=k):
        x_s, stop = rollout.phase_sample(plan, k, apply, experts_, active, z, y, key)
        return jnp.sum(r * x_s), (x_s, stop)

      grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
      seen = set()
      for seed in range(40):
        (g_experts, g_active), (x_s, stop) = grad_fn(experts, experts[k],
                                                     jax.random.PRNGKey(seed))
        stop = int(stop)
        # Experts passed through the tuple (the frozen prefix and the rest) get no gradient.
        chex.assert_trees_all_equal(g_experts, jax.tree.map(jnp.zeros_like, experts))
        if phase.grad_mode == "full" or phase.num_steps == 1:
          self.assertEqual(stop, -1 if phase.num_steps > 1 else 0)
          graded = list(range(offs[k], offs[k] + phase.num_steps))
        else:
          self.assertBetween(stop, 0, phase.num_steps - 1)
          graded = [offs[k] + stop]
        seen.add(stop)
        for name in ("b", "c"):
          g = np.asarray(g_active[name])
          nonzero = np.flatnonzero(g != 0.0)
          np.testing.assert_array_equal(nonzero, graded,
                                        err_msg=f"{method} phase {k} {name} stop {stop}: {g}")
        # Output and gradient equal those of the spec-written Euler rollout.
        ref_fn = lambda a, stop=stop, k=k: _reference(plan, k, experts, a, z, stop)
        chex.assert_trees_all_close(x_s, ref_fn(experts[k]), rtol=1e-5, atol=1e-5)
        ref_grad = jax.grad(lambda a: jnp.sum(r * ref_fn(a)))(experts[k])
        chex.assert_trees_all_close(g_active, ref_grad, rtol=1e-4, atol=1e-5)
        if phase.grad_mode == "full" or len(seen) == phase.num_steps:
          break
      if phase.grad_mode == "sgts":
        self.assertLen(seen, phase.num_steps, msg=f"stop indices seen: {sorted(seen)}")

  @parameterized.named_parameters(*[c for c in CASES if "sgts" in c[1]])
  def test_stop_index_uniform(self, method, num_steps, num_phases):
    """SGTS: the stop index is uniform over the phase's steps across keys (chi-square, p > 1e-3)."""
    plan, apply, experts, z, _, y = self._setup(method, num_steps, num_phases)
    n_keys = 1200
    keys = jax.random.split(jax.random.PRNGKey(7), n_keys)
    for k, phase in enumerate(plan.phases):
      draw = jax.jit(jax.vmap(
          lambda key, k=k: rollout.phase_sample(plan, k, apply, experts, experts[k], z, y, key)[1]))
      stops = np.asarray(draw(keys))
      counts = np.bincount(stops, minlength=phase.num_steps)
      self.assertLen(counts, phase.num_steps)
      expected = n_keys / phase.num_steps
      chi2 = np.sum((counts - expected)**2 / expected)
      # 99.9% quantiles of chi-square with 1, 2, 3 degrees of freedom.
      self.assertLess(chi2, {1: 1e-9, 2: 10.83, 3: 13.82, 4: 16.27}[phase.num_steps],
                      msg=str(counts))

  def test_full_rollout_matches_sgts_last_stop(self):
    """Jumping from the last step to the boundary is the ordinary last Euler step: the SGTS
    output with stop = N-1 equals the full multi-step output (dmd2_sgts vs dmd_multistep)."""
    plan_s, apply, experts, z, _, y = self._setup("dmd2_sgts", 4, 1)
    plan_f = methods.make_plan("dmd_multistep", 4, 1, 5.0)
    full, _ = rollout.phase_sample(plan_f, 0, apply, experts, experts[0], z, y,
                                   jax.random.PRNGKey(0))
    for seed in range(40):
      x_s, stop = rollout.phase_sample(plan_s, 0, apply, experts, experts[0], z, y,
                                       jax.random.PRNGKey(seed))
      if int(stop) == 3:
        chex.assert_trees_all_close(x_s, full, rtol=1e-5, atol=1e-6)
        break
    else:
      self.fail("stop index 3 never drawn in 40 keys")

  def test_frozen_prefix(self):
    """frozen_prefix(k) = Euler through phases < k with their own experts, no gradient."""
    plan, apply, experts, z, r, y = self._setup("phased_dmd_sgts", 4, 2)
    x1 = rollout.frozen_prefix(plan, 1, apply, experts, z, y)
    p = experts[0]
    g = plan.grid
    x = z + (g[1] - g[0]) * (p["b"][0] * z + p["c"][0])
    x = x + (g[2] - g[1]) * (p["b"][1] * x + p["c"][1])
    chex.assert_trees_all_close(x1, x, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(rollout.frozen_prefix(plan, 0, apply, experts, z, y), z)
    grads = jax.grad(lambda e: jnp.sum(r * rollout.frozen_prefix(plan, 1, apply, e, z, y)))(
        experts)
    chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, experts))

  def test_frozen_prefix_of_many_phases(self):
    """k > 1 frozen phases run as one loop over the steps (each step's expert picked by a
    switch): the hand-written Euler chain, no gradient, the same with one apply per expert."""
    plan, apply, experts, z, r, y = self._setup("phased_dmd", 4, 4)
    g = plan.grid
    x = z
    for i in range(3):
      p = experts[i]                  # phase i's one step is grid step i
      x = x + (g[i + 1] - g[i]) * (p["b"][i] * x + p["c"][i])
    x3 = rollout.frozen_prefix(plan, 3, apply, experts, z, y)
    chex.assert_trees_all_close(x3, x, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(rollout.frozen_prefix(plan, 3, (apply,) * 4, experts, z, y),
                                x3, rtol=1e-6, atol=1e-7)
    grads = jax.grad(lambda e: jnp.sum(r * rollout.frozen_prefix(plan, 3, apply, e, z, y)))(
        experts)
    chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, experts))


if __name__ == "__main__":
  absltest.main()
