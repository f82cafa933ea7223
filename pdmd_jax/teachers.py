"""Teachers: frozen velocity fields v(x_t, t, y) with classifier-free guidance.

A Teacher is static (hashable) and its parameters travel separately, as an argument of every
step: the teacher is never part of the training state, never donated, optimised or saved.
Every output is under stop_gradient.

- ``gmm_teacher``: the exact velocity of a Gaussian mixture under any Gaussian diffusion.
- ``network_teacher``: any NNX velocity network (``apply(params, x, t, y)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pdmd_jax import schedule as S
from pdmd_jax.data import gmm as gmm_lib

TEACHERS = ("gmm", "dit")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """v_guided = v(null) + w (v(y) - v(null)); w = 1 is the plain conditional teacher.

  apply: (params, x_t [B, ...], t [B], y [B] int) -> velocity; y == null_class is the
    unconditional branch.
  """
  apply: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
  null_class: int
  guidance_scale: float = 1.0
  # y -> the unconditional branch's conditioning; None: the null class label. Text-conditioned
  # teachers pass e.g. the negative-prompt embedding here.
  null_cond: Callable[[Any], Any] | None = None

  def unconditional(self, y):
    return jnp.full_like(y, self.null_class) if self.null_cond is None else self.null_cond(y)

  def velocity(self, params, x_t, t, y):
    v_c = self.apply(params, x_t, t, y)
    if self.guidance_scale != 1.0:
      v_u = self.apply(params, x_t, t, self.unconditional(y))
      v_c = v_u + self.guidance_scale * (v_c - v_u)
    return jax.lax.stop_gradient(v_c)


def gmm_posterior(sched: S.Schedule, gmm: gmm_lib.GaussianMixture, x_t, t, y):
  """Exact E[x_0 | x_t, y] and E[eps | x_t, y] for the mixture (both [B, D]).

  Mode i's marginal is N(alpha mu_i, (alpha^2 tau_i^2 + sigma^2) I); within mode i,
  E[x_0|x_t] = mu_i + alpha tau_i^2 (x_t - alpha mu_i) / var_i and
  E[eps|x_t] = sigma (x_t - alpha mu_i) / var_i. Both stay finite at t = 1 (alpha = 0).
  """
  a, s = S.alpha_sigma(sched, t.astype(jnp.float32))
  a, s = a[:, None], s[:, None]                                # [B, 1]
  var = a**2 * gmm.stds[None, :]**2 + s**2                     # [B, M]
  d = x_t.shape[-1]
  sq = (jnp.sum(x_t**2, -1, keepdims=True) - 2 * a * (x_t @ gmm.means.T)
        + a**2 * jnp.sum(gmm.means**2, -1)[None, :])           # ||x - a mu_i||^2
  w = gmm_lib.mode_weights_given_class(gmm, y)
  # -inf (not log(1e-30)) for other classes' modes: far from every mode of y, a finite floor
  # would let an out-of-class mode win the softmax.
  logw = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
  logp = logw - 0.5 * (sq / var + d * jnp.log(var))
  r = jax.nn.softmax(logp, axis=-1)                            # p(mode | x_t, y)
  rc_x0 = r * a * gmm.stds[None, :]**2 / var                   # weights of (x - a mu_i) in x0
  rc_eps = r * s / var
  resid = lambda c: jnp.sum(c, -1, keepdims=True) * x_t - a * (c @ gmm.means)
  x0 = r @ gmm.means + resid(rc_x0)
  eps = resid(rc_eps)
  return x0, eps


def gmm_velocity(sched: S.Schedule, gmm: gmm_lib.GaussianMixture, x_t, t, y):
  """Exact v*(x_t, t, y) = E[eps - x_0 | x_t, y]."""
  x0, eps = gmm_posterior(sched, gmm, x_t, t, y)
  return eps - x0


def gmm_teacher(sched: S.Schedule, num_classes: int, guidance_scale: float = 1.0) -> Teacher:
  """Exact mixture teacher; its params are the GaussianMixture pytree."""
  return Teacher(apply=lambda p, x, t, y: gmm_velocity(sched, p, x, t, y),
                 null_class=num_classes, guidance_scale=guidance_scale)


def network_teacher(apply, num_classes: int, guidance_scale: float = 1.0) -> Teacher:
  """A trained velocity network (e.g. the shipped DiT); its params travel as the argument."""
  return Teacher(apply=apply, null_class=num_classes, guidance_scale=guidance_scale)
