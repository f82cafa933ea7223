"""Samplers: the distilled few-step MoE sampler and the teacher's many-step reference.

Both are Euler (spec §3.3). The few-step sampler routes grid step i to the expert of the
phase that owns it; the teacher sampler refines each grid interval into ``substeps`` Euler
steps uniform in unshifted u, so that it passes through every phase boundary exactly and
its states there can be compared with the distilled generator's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pdmd_jax import methods
from pdmd_jax import rollout
from pdmd_jax import schedule as S
from pdmd_jax import teachers


def few_step_sample(plan: methods.PhasePlan, apply, experts, z, y):
  """Returns the trajectory [x_{t_0} = z, x_{t_1}, ..., x_{t_N}] (a list of N + 1 arrays)."""
  x, traj = z, [z]
  route = plan.expert_of_step()
  for i in range(plan.num_steps):
    x = _expert_step(plan, route, apply, experts, i, x, y)
    traj.append(x)
  return traj


def _expert_step(plan, route, apply, experts, i: int, x, y):
  """Grid step i (t_i -> t_{i+1}) by one Euler step of the expert that owns it."""
  t, t_next = plan.grid[i], plan.grid[i + 1]
  v = rollout.apply_of(apply, route[i])(experts[route[i]], x, jnp.full((x.shape[0],), t, jnp.float32), y)
  return S.euler_step(x, t, t_next, v)


def fine_grid(grid, substeps: int, shift_value: float) -> tuple[np.ndarray, list[int]]:
  """Refines ``grid`` with ``substeps`` steps per interval (uniform in unshifted u).

  Returns (times, indices of the original grid points in ``times``).
  """
  times, marks = [float(grid[0])], [0]
  for a, b in zip(grid[:-1], grid[1:]):
    ua, ub = S.unshift(a, shift_value), S.unshift(b, shift_value)
    u = np.linspace(ua, ub, substeps + 1)[1:]
    ts = [float(S.shift(v, shift_value)) for v in u]
    ts[-1] = float(b)
    times += ts
    marks.append(len(times) - 1)
  return np.asarray(times), marks


def euler(teacher: teachers.Teacher, teacher_params, times, z, y, marks=None):
  """The (guided) teacher's Euler steps through ``times`` (t_0 > t_1 > ... > t_M), in one loop.

  One loop means one copy of the teacher in the program whatever M (a 14B MoE compiles once).
  Returns the states at ``marks`` (indices into ``times``; default: [0, M]) as a list.
  """
  times = np.asarray(times, np.float64)
  marks = [0, len(times) - 1] if marks is None else list(marks)
  ts = jnp.asarray(times, jnp.float32)
  slot = np.full(len(times), -1, np.int32)
  slot[marks] = np.arange(len(marks))
  slot = jnp.asarray(slot)

  def body(i, carry):
    x, buf = carry
    v = teacher.velocity(teacher_params, x, jnp.full((x.shape[0],), ts[i]), y)
    x = S.euler_step(x, ts[i], ts[i + 1], v)
    j = jnp.maximum(slot[i + 1], 0)
    return x, buf.at[j].set(jnp.where(slot[i + 1] >= 0, x, buf[j]))

  buf = jnp.zeros((len(marks),) + z.shape, z.dtype).at[0].set(z)
  _, buf = jax.lax.fori_loop(0, len(times) - 1, body, (z, buf))
  return [buf[k] for k in range(len(marks))]


def teacher_sample(teacher: teachers.Teacher, teacher_params, plan: methods.PhasePlan, z, y, *,
                   substeps: int, shift_value: float):
  """Many-step Euler with the (guided) teacher (``substeps`` per grid interval, uniform in
  unshifted u); returns its states at the plan's grid times."""
  times, marks = fine_grid(plan.grid, substeps, shift_value)
  return euler(teacher, teacher_params, times, z, y, marks)


def sdedit(teacher: teachers.Teacher, teacher_params, x0, eps, y, *, t0: float, steps: int,
           shift_value: float):
  """SDEdit (Meng et al. 2022): data ``x0`` noised to x_t0 = (1 - t0) x0 + t0 eps (the flow
  matching path), then ``steps`` Euler steps of the (guided) teacher from t0 to 0, uniform in
  unshifted u. t0 = 1 is plain sampling from ``eps``; lower t0 keeps more of ``x0`` (what the
  teacher must still decide is what the noise above t0 hides)."""
  if not 0.0 < t0 <= 1.0:
    raise ValueError(f"t0={t0} must be in (0, 1]")
  times, _ = fine_grid([t0, 0.0], steps, shift_value)
  return euler(teacher, teacher_params, times, (1.0 - t0) * x0 + t0 * eps, y)[-1]


def mixed_sample(plan: methods.PhasePlan, apply, experts, teacher: teachers.Teacher,
                 teacher_params, z, y, *, use_teacher, substeps: int, shift_value: float):
  """Grid interval i by the teacher (``substeps`` fine Euler steps) if ``use_teacher[i]``, else
  by the distilled expert that owns it (one Euler step). Returns the states at the grid times.

  All-expert is ``few_step_sample``, all-teacher is ``teacher_sample``; mixtures attribute a
  property of the samples (e.g. motion) to the phases: (expert, expert, teacher, teacher) keeps
  only the high-noise experts, (teacher, teacher, expert, expert) only the low-noise ones.
  """
  if len(use_teacher) != plan.num_steps:
    raise ValueError(f"use_teacher has {len(use_teacher)} entries; the plan has "
                     f"{plan.num_steps} grid steps")
  times, marks = fine_grid(plan.grid, substeps, shift_value)
  route = plan.expert_of_step()
  traj, x = [z], z
  for i, (a, b) in enumerate(zip(marks[:-1], marks[1:])):
    x = (euler(teacher, teacher_params, times[a:b + 1], x, y)[-1] if use_teacher[i]
         else _expert_step(plan, route, apply, experts, i, x, y))
    traj.append(x)
  return traj
