"""Backward simulation for phase k (spec §3.3): frozen earlier experts, then phase-k steps.

All functions take ``apply(params, x, t, y) -> v`` (one function for every expert, or a
sequence with one per expert, e.g. LoRA experts on different backbones) and Euler-step on the
plan's grid. The
phase output x_s lives at the phase boundary s = t_k. Gradient modes:
- "full": every phase-k step keeps its gradient (vanilla multi-step DMD when K = 1).
- "sgts": a stop step j is drawn uniformly among the phase's steps (one draw per batch, so it
  is shared by all data shards); steps before j run without gradient, and step j Euler-jumps
  straight to the boundary with the only gradient (DMD2 / SGTS when K = 1, spec §2.3, §3.3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdmd_jax import methods
from pdmd_jax import schedule as S

sg = jax.lax.stop_gradient


def _times(x, t):
  return jnp.full((x.shape[0],), t, jnp.float32)


def apply_of(apply, i: int):
  """Expert i's apply function from a single callable or a per-expert sequence."""
  return apply if callable(apply) else apply[i]


def frozen_prefix(plan: methods.PhasePlan, k: int, apply, experts, z, y):
  """Runs phases 0..k-1 with their experts, no gradient: x at the start of phase k."""
  steps = [(phase.index, t, t_next) for phase in plan.phases[:k]
           for t, t_next in zip(phase.times, phase.times[1:] + (phase.boundary,))]
  if k > 1:
    # One loop over the frozen steps, the step's expert picked by lax.switch (one branch per
    # frozen expert; no copy of the experts' parameters), so the compiled step holds one
    # forward pass's buffers whatever the number of frozen phases; the same arithmetic as the
    # unrolled loop (t and t' - t rounded to float32 as Python floats would be).
    index = jnp.asarray([i for i, _, _ in steps], jnp.int32)
    times = jnp.asarray([t for _, t, _ in steps], jnp.float32)
    deltas = jnp.asarray([t_next - t for _, t, t_next in steps], jnp.float32)
    branches = [lambda x, tt, i=i: apply_of(apply, i)(sg(experts[i]), x, tt, y) for i in range(k)]

    def body(x, step):
      i, t, dt = step
      return S.euler_step(x, 0.0, dt, jax.lax.switch(i, branches, x, _times(x, t))), None

    return sg(jax.lax.scan(body, z, (index, times, deltas))[0])
  x = z
  for i, t, t_next in steps:
    x = S.euler_step(x, t, t_next, apply_of(apply, i)(sg(experts[i]), x, _times(x, t), y))
  return sg(x)


def phase_steps(phase: methods.Phase, apply, params, x, y, key):
  """Phase-k steps from its start to its boundary; returns (x_s, stop index used).

  The stop index is -1 in "full" mode (all steps differentiable).
  """
  nxt = phase.times[1:] + (phase.boundary,)
  if phase.grad_mode == "full" or phase.num_steps == 1:
    for t, t_next in zip(phase.times, nxt):
      x = S.euler_step(x, t, t_next, apply(params, x, _times(x, t), y))
    return x, jnp.int32(-1 if phase.num_steps > 1 else 0)
  j = jax.random.randint(key, (), 0, phase.num_steps)
  return jump_at(phase, apply, params, x, y, j)[0], j


def jump_at(phase: methods.Phase, apply, params, x, y, j):
  """Steps 0..j-1 of the phase without gradient, then step j Euler-jumps straight to the
  boundary with the only gradient. Returns (x_s, the state at t_j the jump starts from)."""
  times = jnp.asarray(phase.times + (phase.boundary,), jnp.float32)
  frozen = sg(params)

  def body(i, x):
    return S.euler_step(x, times[i], times[i + 1], apply(frozen, x, _times(x, times[i]), y))

  # A dynamic trip count: only j no-grad steps are computed (the loop has no tangents).
  x = sg(jax.lax.fori_loop(0, j, body, sg(x)))
  t_j = times[j]
  v = apply(params, x, _times(x, t_j), y)
  return S.euler_step(x, t_j, phase.boundary, v), x


def phase_sample(plan: methods.PhasePlan, k: int, apply, experts, active_params, z, y, key):
  """x_s = pipeline_k(z): frozen experts 0..k-1 then expert k (with ``active_params``)."""
  x = frozen_prefix(plan, k, apply, experts, z, y)
  return phase_steps(plan.phases[k], apply_of(apply, k), active_params, x, y, key)


def phase_sample_at(plan: methods.PhasePlan, k: int, apply, experts, active_params, z, y,
                    stop: int):
  """phase_sample with the stop step fixed at ``stop`` (the ODE anchor's step, as LightX2V
  fixes its diversity step): returns (x_s, the no-gradient state at t_stop the jump starts
  from), so the anchor's teacher ODE starts where the expert's gradient step does."""
  x = frozen_prefix(plan, k, apply, experts, z, y)
  return jump_at(plan.phases[k], apply_of(apply, k), active_params, x, y, stop)
