"""The Gaussian prior of a video teacher: i.i.d., or correlated across frames (PYoCo's mixed noise).

A mixed-noise prior (Ge et al. 2023, "Preserve Your Own Correlation") gives every frame the same
share of noise: eps_f = sqrt(rho) eps_shared + sqrt(1 - rho) eps_f', so each pixel's noise has
covariance Sigma = (1 - rho) I + rho 11^T over the F frames (unit variance, correlation rho).
A teacher trained on x_t = (1 - t) x_0 + t eps with this eps has the forward process
x_t | x_0 ~ N((1 - t) x_0, t^2 Sigma).

Every equation of the spec assumes eps ~ N(0, I). They hold unchanged in whitened coordinates
u = Sigma^{-1/2} x, where the same process reads u_t = (1 - t) u_0 + t xi with xi ~ N(0, I) and
the teacher's velocity is Sigma^{-1/2} v(Sigma^{1/2} u): ``whitened_apply`` wraps a network so
the distillation engine runs in u unchanged, and ``color`` maps its samples back to pixels.
The reverse KL is invariant under the change of coordinates, so the DMD gradient computed in u
is the exact one; in pixels its score difference carries a Sigma^{-1} that an engine fed
correlated eps in pixel coordinates would silently drop.

Sigma^{±1/2} act per pixel along the frame axis (axis 1 of [B, F, ...]) through the two
eigenspaces of Sigma: the frame mean (eigenvalue 1 - rho + F rho) and its complement (1 - rho).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FRAME_AXIS = 1


def check(rho: float, frames: int, field: str = "model.noise_frame_corr") -> None:
  """Raises ValueError unless 0 <= rho < 1 (and rho = 0 for an image model)."""
  if not 0.0 <= rho < 1.0:
    raise ValueError(f"{field}={rho}: must be in [0, 1) (0: i.i.d. frames)")
  if rho and frames <= 1:
    raise ValueError(f"{field}={rho} needs a video model (frames > 1, got {frames})")


def _sigma_power(x, rho: float, power: float):
  """Sigma^power x along the frame axis."""
  if not rho:
    return x
  f = x.shape[FRAME_AXIS]
  lam_mean, lam_rest = 1.0 - rho + f * rho, 1.0 - rho
  mean = jnp.mean(x, axis=FRAME_AXIS, keepdims=True)
  return lam_rest ** power * x + (lam_mean ** power - lam_rest ** power) * mean


def color(u, rho: float):
  """Sigma^{1/2} u: i.i.d. N(0, I) -> the frame-correlated prior (whitened -> pixel coordinates)."""
  return _sigma_power(u, rho, 0.5)


def whiten(x, rho: float):
  """Sigma^{-1/2} x (pixel -> whitened coordinates)."""
  return _sigma_power(x, rho, -0.5)


def sample(key, shape, rho: float = 0.0, dtype=jnp.float32):
  """eps ~ N(0, Sigma): i.i.d. when rho = 0, else correlated across axis 1 (frames)."""
  return color(jax.random.normal(key, shape, dtype), rho)


def whitened_apply(apply, rho: float):
  """apply(params, x, t, y) -> v in pixels  ->  the same network in whitened coordinates:
  u -> Sigma^{-1/2} v(Sigma^{1/2} u); exact, as x_t and v = eps - x_0 are linear in (x_0, eps)."""
  if not rho:
    return apply
  return lambda params, u, t, y: whiten(apply(params, color(u, rho), t, y), rho)
