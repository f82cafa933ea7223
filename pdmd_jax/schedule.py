"""Noise schedules, subinterval transitions, parameterisation changes and t-samplers.

Everything here is a pure function of arrays (spec §1, §2.4, §3.1-3.5). The schedule is a
general Gaussian diffusion ``x_t = alpha_t x_0 + sigma_t eps`` so that the spec's general
identities are testable; flow matching (``alpha = 1 - t``, ``sigma = t``) is the default.

Velocity convention: ``v := eps - x_0`` for every schedule (the target of Eq. 4).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Floor of sigma_{t|s}^2, as in ModelTC's trainer (spec §3.8).
SIGMA2_FLOOR = 1e-8


class Schedule(NamedTuple):
  """alpha(t), sigma(t) for t in [0, 1]; SNR alpha^2/sigma^2 strictly decreasing."""
  name: str
  alpha: Callable[[Array], Array]
  sigma: Callable[[Array], Array]


def flow_matching() -> Schedule:
  """Rectified flow / flow matching: alpha_t = 1 - t, sigma_t = t (Wan, Qwen-Image)."""
  return Schedule("flow_matching", lambda t: 1.0 - t, lambda t: t)


def variance_preserving_cosine() -> Schedule:
  """alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2); used to test the general identities."""
  return Schedule("vp_cosine", lambda t: jnp.cos(0.5 * jnp.pi * t),
                  lambda t: jnp.sin(0.5 * jnp.pi * t))


SCHEDULES = {"flow_matching": flow_matching, "vp_cosine": variance_preserving_cosine}


def get_schedule(name: str) -> Schedule:
  if name not in SCHEDULES:
    raise ValueError(f"schedule={name!r} is unknown; allowed: {sorted(SCHEDULES)}")
  return SCHEDULES[name]()


# ---------------------------------------------------------------------------------------------
# Timestep shift and grids (spec §1.3)
# ---------------------------------------------------------------------------------------------

def shift(u, s: float):
  """shift_s(u) = s u / (1 + (s - 1) u); maps [0, 1] onto [0, 1], monotone increasing."""
  return s * u / (1.0 + (s - 1.0) * u)


def unshift(t, s: float):
  """Inverse of ``shift``: u = t / (s - (s - 1) t)."""
  return t / (s - (s - 1.0) * t)


def grid(num_steps: int, shift_value: float) -> Array:
  """Few-step grid 1 = t_0 > t_1 > ... > t_N = 0: uniform in u, then shifted."""
  u = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
  return shift(u, shift_value)


def phase_boundaries(grid_times: Array, num_phases: int) -> Array:
  """Boundaries t_(1) > ... > t_(K) = 0 ending each phase (spec §3.1); K must divide N."""
  num_steps = grid_times.shape[0] - 1
  if num_steps % num_phases:
    raise ValueError(f"num_phases={num_phases} must divide num_steps={num_steps}")
  per = num_steps // num_phases
  return grid_times[per::per]


# ---------------------------------------------------------------------------------------------
# Transitions p(x_t | x_s) (spec §1.1, Eq. 2)
# ---------------------------------------------------------------------------------------------

def alpha_sigma(sched: Schedule, t):
  return sched.alpha(t), sched.sigma(t)


def transition(sched: Schedule, t, s):
  """(alpha_{t|s}, sigma_{t|s}) with alpha_{t|s} = alpha_t/alpha_s, sigma^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.

  sigma_{t|s}^2 is floored at SIGMA2_FLOOR so that t -> s stays finite.
  """
  a_t, s_t = alpha_sigma(sched, t)
  a_s, s_s = alpha_sigma(sched, s)
  a_ts = a_t / a_s
  var = jnp.maximum(s_t**2 - a_ts**2 * s_s**2, SIGMA2_FLOOR)
  return a_ts, jnp.sqrt(var)


def renoise(sched: Schedule, x_s, s, t, eps):
  """x_t = alpha_{t|s} x_s + sigma_{t|s} eps; t and s broadcast against the batch axis."""
  a_ts, s_ts = transition(sched, t, s)
  return bcast(a_ts, x_s) * x_s + bcast(s_ts, x_s) * eps


def bcast(v, like):
  """Broadcasts a per-sample value [B] (or a scalar) against x of shape [B, ...]."""
  v = jnp.asarray(v, dtype=like.dtype)
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


# ---------------------------------------------------------------------------------------------
# Parameterisation changes (spec §1.2, §7 item 8); v := eps - x0
# ---------------------------------------------------------------------------------------------

def v_to_x0(sched: Schedule, x_t, t, v):
  """x0_hat = (x_t - sigma_t v) / (alpha_t + sigma_t)."""
  a, s = alpha_sigma(sched, bcast(t, x_t))
  return (x_t - s * v) / (a + s)


def v_to_eps(sched: Schedule, x_t, t, v):
  """eps_hat = (x_t + alpha_t v) / (alpha_t + sigma_t)."""
  a, s = alpha_sigma(sched, bcast(t, x_t))
  return (x_t + a * v) / (a + s)


def v_to_score(sched: Schedule, x_t, t, v):
  """score = -eps_hat / sigma_t = -(x_t + alpha_t v) / (sigma_t (alpha_t + sigma_t))."""
  _, s = alpha_sigma(sched, bcast(t, x_t))
  return -v_to_eps(sched, x_t, t, v) / s


def x0_eps_to_v(x0, eps):
  return eps - x0


def score_to_v(sched: Schedule, x_t, t, score):
  """Eq. 5 form: v = -(sigma_t + sigma_t^2/alpha_t) score - x_t/alpha_t."""
  a, s = alpha_sigma(sched, bcast(t, x_t))
  return -(s + s**2 / a) * score - x_t / a


# ---------------------------------------------------------------------------------------------
# DMD weights (spec §2.4 Eq. 7, §3.4 Eq. 10)
# ---------------------------------------------------------------------------------------------

def dmd_weight(sched: Schedule, t, s):
  """w_{t|s} = alpha_t alpha_{t|s} / (alpha_t sigma_t + sigma_t^2); w_{t|0} = w_t.

  Multiplies (v_teacher - v_fake) to give the gradient of KL(p_fake(x_t) || p_real(x_t))
  with respect to the phase output x_s. Flow matching: (1 - t)^2 / ((1 - s) t).
  """
  a_t, s_t = alpha_sigma(sched, t)
  a_ts, _ = transition(sched, t, s)
  return a_t * a_ts / (a_t * s_t + s_t**2)


def posterior_xs_coeff(sched: Schedule, t, s):
  """d E[x_s | x_t] / d E[x_0 | x_t] = alpha_s sigma_{t|s}^2 / sigma_t^2 (Gaussian bridge).

  Used by the DMD-normalised surrogate to express the x0-space score difference in the
  phase output's space (it is 1 at s = 0, where the surrogate is exactly DMD's).
  """
  _, s_t = alpha_sigma(sched, t)
  a_s, _ = alpha_sigma(sched, s)
  _, s_ts = transition(sched, t, s)
  return a_s * s_ts**2 / s_t**2


# ---------------------------------------------------------------------------------------------
# Euler (spec §1.2, §3.3)
# ---------------------------------------------------------------------------------------------

def euler_step(x_t, t, t_next, v):
  """x_{t'} = x_t + (t' - t) v; t, t' are scalars or per-sample [B]."""
  return x_t + bcast(t_next - t, x_t) * v


# ---------------------------------------------------------------------------------------------
# t-samplers: uniform in unshifted u on (u_k, 1), then shifted (spec §3.1, Fig. 9)
# ---------------------------------------------------------------------------------------------

CLAMP_MODES = ("clamp", "resample")


class TimeSampler(NamedTuple):
  """Samples t in (low, high]: u ~ U(unshift(low), unshift(high)), t = shift(u).

  ``floor`` (optional) restricts t to [floor, high], either by torch.clamp-style clamping
  (the paper's Wan2.2 phase 1: a point mass of (u* - u_low)/(u_high - u_low) at the floor,
  spec §7 item 9) or by resampling u inside (unshift(floor), unshift(high)).
  """
  low: float
  high: float
  shift_value: float
  floor: float | None = None
  floor_mode: str = "clamp"

  def __call__(self, key, shape):
    u_low = unshift(self.low, self.shift_value)
    u_high = unshift(self.high, self.shift_value)
    if self.floor is not None and self.floor_mode == "resample":
      u_low = max(u_low, unshift(self.floor, self.shift_value))
    # uniform() is [0, 1): flip it so that t = low (where w_{t|0} = 1/0) is never drawn.
    u = u_high - (u_high - u_low) * jax.random.uniform(key, shape)
    t = shift(u, self.shift_value)
    if self.floor is not None and self.floor_mode == "clamp":
      t = jnp.maximum(t, self.floor)
    return t

  def point_mass_at_floor(self) -> float:
    """Fraction of samples that clamping puts exactly on the floor (0 when resampling)."""
    if self.floor is None or self.floor_mode != "clamp":
      return 0.0
    u_low = unshift(self.low, self.shift_value)
    u_high = unshift(self.high, self.shift_value)
    u_star = unshift(self.floor, self.shift_value)
    return float(min(max((u_star - u_low) / (u_high - u_low), 0.0), 1.0))
