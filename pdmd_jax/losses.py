"""Losses: DMD generator surrogate on a subinterval and the subinterval fake-score loss.

Shapes: x_s, eps, velocities are [B, ...]; t and s are [B] or scalars. All schedule math in
float32. Teacher and fake velocities enter under stop_gradient: no gradient ever flows
through a score network into the generator (DMD, spec §3.4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdmd_jax import schedule as S

GENERATOR_WEIGHTINGS = ("exact", "dmd_normalized")
LOSS_REDUCTIONS = ("sample_sum", "element_mean")
FAKE_TARGETS = ("eq13", "eq11", "naive")
ANCHOR_DISTANCES = ("mse", "features")
GAN_SOURCES = ("fake", "teacher")

sg = jax.lax.stop_gradient


def _per_sample_mean(x):
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def surrogate(x, g):
  """½‖x − stopgrad(x − g)‖² summed over elements; its gradient w.r.t. x is g (spec §7 item 10)."""
  return 0.5 * jnp.sum((x - sg(x - g))**2)


def generator_grad_direction(sched: S.Schedule, x_s, s, t, x_t, v_teacher, v_fake,
                             weighting: str = "exact", norm_floor: float = 1e-4):
  """The per-sample vector g with dLoss/dx_s = g for the phase-k DMD objective.

  exact: g = w_{t|s} (v_T - v_F), the unbiased gradient of KL(p_fake(x_t) || p_real(x_t))
    w.r.t. x_s per unit of batch (Eq. 10; w_{t|0} = w_t gives Eq. 7).
  dmd_normalized: DMD's per-sample normalisation carried to a subinterval [DERIVED]: the
    teacher's and fake's x_s-posterior means xs_hat = E[x_s | x_t] (affine in x0_hat, with
    slope alpha_s sigma_{t|s}^2 / sigma_t^2), g = (xs_hat_F - xs_hat_T) / mean|x_s - xs_hat_T|,
    the normaliser floored at ``norm_floor``. At s = 0 this is DMD2's code exactly; for any s
    it has the direction of the exact g per sample.
  """
  v_teacher, v_fake = sg(v_teacher), sg(v_fake)
  if weighting == "exact":
    return S.bcast(S.dmd_weight(sched, t, s), x_s) * (v_teacher - v_fake)
  if weighting == "dmd_normalized":
    x0_t = S.v_to_x0(sched, x_t, t, v_teacher)
    x0_f = S.v_to_x0(sched, x_t, t, v_fake)
    _, s_t = S.alpha_sigma(sched, t)
    _, s_s = S.alpha_sigma(sched, s)
    a_ts, _ = S.transition(sched, t, s)
    # Gaussian bridge: E[x_s | x_t, x_0] = c_x0 x_0 + (sigma_s^2 alpha_{t|s} / sigma_t^2) x_t.
    c_x0 = S.bcast(S.posterior_xs_coeff(sched, t, s), x_s)
    c_xt = S.bcast(s_s**2 * a_ts / s_t**2, x_s)
    xs_t = c_x0 * x0_t + c_xt * x_t
    diff = c_x0 * (x0_f - x0_t)
    norm = jnp.maximum(_per_sample_mean(jnp.abs(sg(x_s) - xs_t)), norm_floor)
    return diff / S.bcast(norm, x_s)
  raise ValueError(f"generator.weighting={weighting!r} is unknown; allowed: {list(GENERATOR_WEIGHTINGS)}")


def generator_loss(x_s, g, reduction: str = "sample_sum"):
  """The surrogate reduced over the batch, d/dx_s = g / B ("sample_sum": summed over a sample's
  D elements, averaged over samples), or g / (B D) ("element_mean": averaged over every
  element, the reduction of DMD2's, LightX2V's and Self-Forcing's code). The direction is the
  same; the scale sets what a gradient-norm clip means."""
  if reduction == "sample_sum":
    return surrogate(x_s, sg(g)) / x_s.shape[0]
  if reduction == "element_mean":
    return surrogate(x_s, sg(g)) / x_s.size
  raise ValueError(f"generator.loss_reduction={reduction!r} is unknown; allowed: "
                   f"{list(LOSS_REDUCTIONS)}")


def anchor_loss(x, target, reduction: str = "sample_sum", features=None):
  """The ODE anchor (DMD's regression loss, LightX2V's diversity term): squared distance of the
  generator's output x to the teacher's ODE solution from the same input, no gradient into
  the target. Reduced as the DMD surrogate (``generator_loss``), so the anchor's weight is
  relative to the DMD term in the same units: summed over a sample's elements (or features)
  and averaged over the batch, or averaged over every element. ``features``: a map applied
  to both sides first (e.g. a classifier's features), None = pixels/latents."""
  if features is not None:
    x, target = features(x), features(target)
  d2 = (x - sg(target))**2
  if reduction == "sample_sum":
    return jnp.sum(d2) / x.shape[0]
  if reduction == "element_mean":
    return jnp.mean(d2)
  raise ValueError(f"generator.loss_reduction={reduction!r} is unknown; allowed: "
                   f"{list(LOSS_REDUCTIONS)}")


def gan_gen_loss(logits_fake):
  """Non-saturating generator loss of DMD2 / FastGen: mean softplus(-D(G(z)))."""
  return jnp.mean(jax.nn.softplus(-logits_fake))


def gan_disc_loss(logits_fake, logits_real):
  """Non-saturating logistic discriminator loss: mean softplus(D(fake)) + mean softplus(-D(real))."""
  return jnp.mean(jax.nn.softplus(logits_fake)) + jnp.mean(jax.nn.softplus(-logits_real))


def fake_target(sched: S.Schedule, x_s, s, t, eps, target: str = "eq13"):
  """Subinterval fake-score regression (spec §3.5): returns (weight [B], prediction scale, target).

  The loss per sample is weight * mean((scale * psi - target)^2):
    eq11:  weight 1, scale 1,           target (a_s^2 s_t + a_t s_s^2)/(a_s^2 s_{t|s}) eps - x_s/a_s
    eq13:  weight clamp(1/s_{t|s}^2, 0, 10), scale s_{t|s},
           target (a_s^2 s_t + a_t s_s^2)/a_s^2 eps - s_{t|s}/a_s x_s   (the paper's form)
    naive: weight 1, scale 1,           target eps - x_s   (biased; ablation only)
  eq11 and eq13 have the same minimiser, the true velocity; naive does not.
  """
  a_t, s_t = S.alpha_sigma(sched, t)
  a_s, s_s = S.alpha_sigma(sched, s)
  _, s_ts = S.transition(sched, t, s)
  c = (a_s**2 * s_t + a_t * s_s**2) / a_s**2
  one = jnp.ones((x_s.shape[0],), jnp.float32)  # t is per sample [B]; s may be a scalar
  b = lambda v: S.bcast(v * one, x_s)
  if target == "eq11":
    return one, b(one), b(c / s_ts) * eps - x_s / b(a_s)
  if target == "eq13":
    w = jnp.clip(1.0 / s_ts**2, 0.0, 10.0) * one
    return w, b(s_ts), b(c) * eps - b(s_ts / a_s) * x_s
  if target == "naive":
    return one, b(one), eps - x_s
  raise ValueError(f"fake.target={target!r} is unknown; allowed: {list(FAKE_TARGETS)}")


def fake_loss(psi, weight, scale, target):
  """Batch mean of weight * mean_over_elements((scale psi - target)^2)."""
  return jnp.mean(weight * _per_sample_mean((scale * psi - sg(target))**2))


def flow_matching_loss(sched: S.Schedule, v_pred, x0, eps):
  """Eq. 4: E||psi(x_t, t) - (eps - x0)||^2, the teacher's own objective (= eq11 at s = 0)."""
  return jnp.mean(_per_sample_mean((v_pred - (eps - x0))**2))


def frame_difference_loss(v_pred, x0, eps):
  """E||D(psi(x_t, t) - (eps - x0))||^2 with D the difference of consecutive frames (axis 1 of
  a clip [B, F, ...]): the part of Eq. 4's error that differs from frame to frame. Eq. 4's own
  error sum per frame pair is |e_f|^2 + |e_f+1|^2; this term is that minus 2 <e_f, e_f+1>, so
  adding it leaves the regression's minimiser (the conditional mean) unchanged and, at finite
  capacity, prices an error the frames do not share above one they do: a per-frame error
  samples as flicker, a shared one as a slightly different digit in every frame."""
  if v_pred.ndim < 3:
    raise ValueError(f"frame_difference_loss needs clips [B, F, ...], got shape {v_pred.shape}")
  e = v_pred - (eps - x0)
  return jnp.mean(_per_sample_mean((e[:, 1:] - e[:, :-1])**2))
