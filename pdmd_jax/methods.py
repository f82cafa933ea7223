"""A method is a phase plan (DESIGN.md, "One idea that organises the code").

| method               | phases | steps/phase | gradient inside a phase         | re-noise t |
|----------------------|--------|-------------|---------------------------------|------------|
| dmd                  | 1      | 1           | the step                        | T(0, 1)    |
| dmd_multistep        | 1      | N           | through all N steps             | T(0, 1)    |
| dmd2_sgts            | 1      | N           | random stop j, Euler jump to 0  | T(0, 1)    |
| phased_dmd           | N      | 1           | the step                        | T(t_k, 1)  |
| phased_dmd_sgts      | K      | N/K         | random stop, Euler jump to t_k  | T(t_k, 1)  |
| phased_dmd_multistep | K      | N/K         | through all N/K steps           | T(t_k, 1)  |

With boundary s = 0 every subinterval formula reduces to plain DMD, so all six methods run
through one rollout, one loss and one train step; only the plan differs. phased_dmd_multistep
is the ablation of SGTS inside phases: the same K experts and the same grid, with the phase's
gradient through every step (memory grows with N/K, as dmd_multistep's with N). The K phases
take N/K grid steps each (the paper) unless ``steps_per_phase`` gives each its own count.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pdmd_jax import schedule as sched_lib

METHODS = ("dmd", "dmd_multistep", "dmd2_sgts", "phased_dmd", "phased_dmd_sgts",
           "phased_dmd_multistep")
PHASE_ORDERS = ("progressive", "interleaved")
GRAD_MODES = ("full", "sgts")


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase: expert ``index`` maps x at ``times[0]`` to x at ``boundary``.

  times: the grid times at which this phase's expert is evaluated (descending).
  boundary: s = t_k, where the phase output lives; 0 for the last phase.
  grad_mode: "full" backpropagates through every step of the phase; "sgts" draws a stop
    step uniformly and Euler-jumps from it to the boundary with the only gradient.
  t_sampler: re-noising times for the generator and fake losses, in (boundary, 1].
  """
  index: int
  times: tuple[float, ...]
  boundary: float
  grad_mode: str
  t_sampler: sched_lib.TimeSampler

  @property
  def num_steps(self) -> int:
    return len(self.times)


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  method: str
  grid: tuple[float, ...]          # t_0 = 1 > ... > t_N = 0
  phases: tuple[Phase, ...]
  order: str                       # "progressive" | "interleaved"

  @property
  def num_phases(self) -> int:
    return len(self.phases)

  @property
  def num_steps(self) -> int:
    return len(self.grid) - 1

  def boundary_index(self, k: int) -> int:
    """Index in ``grid`` of phase k's boundary (N/K (k + 1) with the even split)."""
    return sum(p.num_steps for p in self.phases[:k + 1])

  def expert_of_step(self) -> tuple[int, ...]:
    """Which expert runs grid step i (the MoE routing of the few-step sampler)."""
    return tuple(p.index for p in self.phases for _ in p.times)

  def describe(self) -> str:
    lines = [f"{self.method}: {self.num_steps} steps, {self.num_phases} phase(s), "
             f"order={self.order}, grid={[round(t, 4) for t in self.grid]}"]
    for p in self.phases:
      ts = p.t_sampler
      floor = "" if ts.floor is None else f", floor {ts.floor} ({ts.floor_mode})"
      lines.append(f"  phase {p.index + 1}: expert G{p.index + 1} at t={[round(t, 4) for t in p.times]}"
                   f" -> x at s={p.boundary:.4f}; grad={p.grad_mode}; re-noise t in "
                   f"({ts.low:.4f}, {ts.high:.4f}], shift {ts.shift_value}{floor}")
    return "\n".join(lines)


def make_plan(method: str, num_steps: int, num_phases: int, shift: float, *,
              order: str = "progressive", t_min: float = 0.0, t_max: float = 1.0,
              phase1_floor: float | None = None, floor_mode: str = "clamp",
              grid_times: Sequence[float] | None = None,
              renoise_shift: float | None = None,
              steps_per_phase: Sequence[int] | None = None) -> PhasePlan:
  """Builds the PhasePlan of ``method``.

  Args:
    method: one of METHODS.
    num_steps: N sampling steps of the distilled generator (1 for ``dmd``).
    num_phases: K phases (forced to 1 for the single-phase baselines, N for phased_dmd).
    shift: timestep shift of the grid and of the t-samplers.
    order: "progressive" (phase k trains after k-1 is frozen, the paper) or "interleaved"
      (phases alternate per generator update, ModelTC's released trainer).
    t_min, t_max: optional margins of the re-noise range (DMD uses 0.02, 0.98); the phase-k
      range is (max(t_k, t_min), t_max].
    phase1_floor: Wan2.2 clamp of phase 1's re-noise t to the high-noise expert range.
    floor_mode: "clamp" (the paper) or "resample".
    grid_times: explicit grid (descending, 1 ... 0) instead of the shifted uniform one.
    renoise_shift: shift of the re-noise t-samplers if it should differ from the grid's.
    steps_per_phase: grid steps of each phase (K integers >= 1 summing to N), e.g. (1, 3) puts
      the 4-step 2-phase boundary at the first grid time instead of the middle one; None = N/K
      each (the paper's even split).
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown; allowed: {list(METHODS)}")
  if order not in PHASE_ORDERS:
    raise ValueError(f"phase_order={order!r} is unknown; allowed: {list(PHASE_ORDERS)}")
  if floor_mode not in sched_lib.CLAMP_MODES:
    raise ValueError(f"floor_mode={floor_mode!r} is unknown; allowed: {list(sched_lib.CLAMP_MODES)}")
  if method == "dmd":
    num_steps, num_phases = 1, 1
  elif method in ("dmd_multistep", "dmd2_sgts"):
    num_phases = 1
  elif method == "phased_dmd":
    num_phases = num_steps
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1")
  if steps_per_phase is None:
    if num_phases < 1 or num_steps % num_phases:
      raise ValueError(f"num_phases={num_phases} must divide num_steps={num_steps}; allowed: "
                       f"{[k for k in range(1, num_steps + 1) if num_steps % k == 0]} (or set "
                       "steps_per_phase)")
    sizes = (num_steps // num_phases,) * num_phases
  else:
    sizes = tuple(steps_per_phase)
    if (len(sizes) != num_phases or sum(sizes) != num_steps
        or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in sizes)):
      raise ValueError(f"steps_per_phase={list(sizes)} must be num_phases={num_phases} integers "
                       f">= 1 summing to num_steps={num_steps} (for {method!r})")
  if grid_times is None:
    g = np.asarray(sched_lib.grid(num_steps, shift), dtype=np.float64)
    g[0], g[-1] = 1.0, 0.0
  else:
    g = np.asarray(grid_times, dtype=np.float64)
    if g.shape != (num_steps + 1,) or g[0] != 1.0 or g[-1] != 0.0 or np.any(np.diff(g) >= 0):
      raise ValueError(f"grid_times={list(g)} must be {num_steps + 1} strictly decreasing "
                       "times from 1 to 0")
  grad_mode = {"dmd": "full", "dmd_multistep": "full", "dmd2_sgts": "sgts",
               "phased_dmd": "full", "phased_dmd_sgts": "sgts",
               "phased_dmd_multistep": "full"}[method]
  ends = np.cumsum((0,) + sizes)
  phases = []
  for k in range(num_phases):
    boundary = float(g[ends[k + 1]])
    floor = phase1_floor if (k == 0 and phase1_floor is not None and num_phases > 1) else None
    sampler = sched_lib.TimeSampler(low=max(boundary, t_min), high=t_max,
                                    shift_value=shift if renoise_shift is None else renoise_shift,
                                    floor=floor, floor_mode=floor_mode)
    phases.append(Phase(index=k, times=tuple(float(t) for t in g[ends[k]:ends[k + 1]]),
                        boundary=boundary, grad_mode=grad_mode, t_sampler=sampler))
  return PhasePlan(method=method, grid=tuple(float(t) for t in g), phases=tuple(phases),
                   order=order)
