"""The MLP fit to the exact mixture teacher: where experts and fake scores start.

DMD initialises the generator and the fake score from the teacher. With an analytic teacher
there are no network weights to copy, so we first regress an MLP onto the exact teacher
velocity (cheap, data-free) and copy that fit into every expert and every per-phase fake
score (``train_step.create_state``). Each phase's fake score thus starts from the teacher at
the start of its phase, as the paper prescribes (spec §3.7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from pdmd_jax import schedule as S
from pdmd_jax import teachers
from pdmd_jax.data import gmm as gmm_lib


def fit_to_gmm_teacher(apply, params, teacher: teachers.Teacher, gmm: gmm_lib.GaussianMixture,
                       sched: S.Schedule, *, num_classes: int, steps: int, batch_size: int,
                       lr: float, seed: int, p_uncond: float = 0.1, shift: float = 1.0):
  """Regresses apply(params, x_t, t, y) onto the exact conditional velocity v*(x_t, t, y).

  x_t is drawn from the true marginal p_t(x | y); t is a 50/50 mixture of U(0, 1) and the
  shifted sampler (so the few-step grid's high-noise times are well covered); y is the null
  label with probability ``p_uncond`` so that the fit also knows the unconditional field.
  Returns (params, final mean-squared error on a fresh batch).
  """
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
  opt = tx.init(params)

  def batch(key):
    k_y, k_u, k_t, k_x, k_m = jax.random.split(key, 5)
    y = gmm_lib.sample_labels(k_y, gmm, num_classes, (batch_size,))
    y = jnp.where(jax.random.uniform(k_u, (batch_size,)) < p_uncond, num_classes, y)
    u = jax.random.uniform(k_t, (batch_size,))
    t = jnp.where(jax.random.uniform(k_m, (batch_size,)) < 0.5, u, S.shift(u, shift))
    a, s = S.alpha_sigma(sched, t)
    x_t, _ = gmm_lib.sample_marginal(k_x, gmm, y, a[:, None], s[:, None])
    return x_t, t, y, teacher.apply(gmm, x_t, t, y)

  def loss_fn(p, x_t, t, y, v):
    return jnp.mean((apply(p, x_t, t, y) - v)**2)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run(params, opt, key):
    def body(i, carry):
      p, o = carry
      g = jax.grad(loss_fn)(p, *batch(jax.random.fold_in(key, i)))
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o
    params, opt = jax.lax.fori_loop(0, steps, body, (params, opt))
    return params, opt, loss_fn(params, *batch(jax.random.fold_in(key, steps)))

  params, _, mse = run(params, opt, jax.random.PRNGKey(seed))
  return params, float(mse)
