"""Samplers: the mixed expert/teacher sampler agrees with the pure ones and composes by interval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdmd_jax import methods
from pdmd_jax import sampling
from pdmd_jax import teachers


def _toy():
  # Teacher and experts whose velocities depend on x, t and y, so any mis-routed interval shows.
  teacher = teachers.Teacher(apply=lambda p, x, t, y: p * x * (1 + t[:, None]) + y[:, None],
                             null_class=0, guidance_scale=2.0)
  expert_apply = lambda p, x, t, y: p * jnp.sin(x) - t[:, None] + 0.1 * y[:, None]
  plan = methods.make_plan("phased_dmd_sgts", 4, 2, 3.0)
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
  y = jnp.array([1.0, 2.0, 3.0])
  return teacher, expert_apply, plan, z, y, (jnp.float32(0.5), jnp.float32(-1.5))


def test_mixed_sampler_reduces_to_the_pure_samplers_and_composes():
  teacher, apply, plan, z, y, experts = _toy()
  kw = dict(substeps=3, shift_value=3.0)
  tp = jnp.float32(-0.7)
  mixed = lambda use: sampling.mixed_sample(plan, apply, experts, teacher, tp, z, y,
                                           use_teacher=use, **kw)
  few = sampling.few_step_sample(plan, apply, experts, z, y)
  ref = sampling.teacher_sample(teacher, tp, plan, z, y, **kw)
  for a, b in zip(mixed((False,) * 4), few):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  for a, b in zip(mixed((True,) * 4), ref):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Teacher to the phase boundary (grid point 2), then the phase-1 expert: its states equal the
  # teacher's up to the boundary, and from there one expert Euler step per interval.
  hand_off = mixed((True, True, False, False))
  for i in range(3):
    np.testing.assert_allclose(hand_off[i], ref[i], rtol=1e-6, atol=1e-6)
  x = ref[2]
  for i in (2, 3):
    t, t_next = plan.grid[i], plan.grid[i + 1]
    x = x + (t_next - t) * apply(experts[1], x, jnp.full((3,), t, jnp.float32), y)
    np.testing.assert_allclose(hand_off[i + 1], x, rtol=1e-5, atol=1e-6)
  assert not np.allclose(hand_off[-1], few[-1]) and not np.allclose(hand_off[-1], ref[-1])
  with pytest.raises(ValueError, match="use_teacher has 3 entries"):
    mixed((True, False, True))


def test_sdedit_returns_the_data_point_of_a_dirac_teacher_and_is_sampling_at_t0_1():
  """With the exact velocity of a Dirac at p, v = (x_t - p) / t, Euler keeps x_t - p = (t/t0)
  (x_t0 - p) exactly, so SDEdit lands on p from any t0 and any x0; from t0 = 1 it is the
  teacher's sampler from the noise."""
  p = jnp.array([[0.3, -1.2], [2.0, 0.5]])
  dirac = teachers.Teacher(apply=lambda q, x, t, y: (x - q) / t[:, None], null_class=0)
  x0 = jnp.array([[5.0, 5.0], [-3.0, 1.0]])
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  y = jnp.zeros((2,), jnp.int32)
  for t0 in (0.2, 0.7, 1.0):
    out = sampling.sdedit(dirac, p, x0, eps, y, t0=t0, steps=5, shift_value=3.0)
    np.testing.assert_allclose(out, p, rtol=1e-5, atol=1e-5)
  still = teachers.Teacher(apply=lambda q, x, t, y: jnp.zeros_like(x), null_class=0)
  np.testing.assert_allclose(sampling.sdedit(still, p, x0, eps, y, t0=0.3, steps=5,
                                             shift_value=3.0), 0.7 * x0 + 0.3 * eps, rtol=1e-6)
  teacher, _, _, z, yy, _ = _toy()
  tp = jnp.float32(-0.7)
  times = [float(t) for t in sampling.S.shift(np.linspace(1.0, 0.0, 7), 3.0)]
  np.testing.assert_allclose(
      sampling.sdedit(teacher, tp, 100.0 * z, z, yy, t0=1.0, steps=6, shift_value=3.0),
      sampling.euler(teacher, tp, times, z, yy)[-1], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="t0=0.0 must be in"):
    sampling.sdedit(teacher, tp, z, z, yy, t0=0.0, steps=4, shift_value=3.0)
