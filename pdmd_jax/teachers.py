"""Teachers: frozen velocity fields v(x_t, t, y) with classifier-free guidance.

A Teacher is static (hashable) and its parameters travel separately, as an argument of every
step: the teacher is never part of the training state, never donated, optimised or saved.
Every output is under stop_gradient.

- ``gmm_teacher``: the exact velocity of a Gaussian mixture under any Gaussian diffusion.
- ``network_teacher``: any NNX velocity network (``apply(params, x, t, y)``), CFG against a
  null class or a negative-prompt embedding, optionally norm-rescaled per sample or per token.
- ``moe_teacher``: Wan2.2's two experts routed by t (high noise at t >= boundary), with CFG
  against a negative-prompt embedding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pdmd_jax import schedule as S
from pdmd_jax.data import gmm as gmm_lib

ROUTES = ("switch", "where")
CFG_NORMS = ("none", "sample", "token")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """v_guided = v(null) + w (v(y) - v(null)); w = 1 is the plain conditional teacher.

  apply: (params, x_t [B, ...], t [B], y [B] int) -> velocity; y == null_class is the
    unconditional branch.
  cfg_norm: "sample" rescales v_guided to the conditional velocity's norm per sample,
    v_guided ||v(y)|| / ||v_guided|| (the released recipes' CFG norm rescale; against CFG's
    over-saturation); "token" does the same per token, the norms taken over one token's block
    of ``token_block`` (Qwen-Image's pipeline and LightX2V's ``cfg_norm``: per packed 2 x 2
    patch of 16 channels); "none": plain CFG.
  token_block: for cfg_norm="token", the token's extent along each sample axis (channels
    included): a sample [C, H, W] in 2 x 2 patches is (C, 2, 2), [H, W, C] in p x p patches
    (p, p, C). The family knows its tokens, so it sets this.
  """
  apply: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
  null_class: int
  guidance_scale: float = 1.0
  # y -> the unconditional branch's conditioning; None: the null class label. Text-conditioned
  # teachers pass e.g. the negative-prompt embedding here.
  null_cond: Callable[[Any], Any] | None = None
  cfg_norm: str = "none"
  token_block: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.cfg_norm not in CFG_NORMS:
      raise ValueError(f"cfg_norm={self.cfg_norm!r} is unknown; allowed: {list(CFG_NORMS)}")
    if self.cfg_norm == "token" and not self.token_block:
      raise ValueError("cfg_norm='token' needs token_block (one token's extent along each "
                       "sample axis, channels included), which the teacher family sets")

  def unconditional(self, y):
    return jnp.full_like(y, self.null_class) if self.null_cond is None else self.null_cond(y)

  def normed(self, v_guided, v_cond):
    """The CFG norm rescale of ``cfg_norm`` (v_guided itself for "none")."""
    if self.cfg_norm == "none":
      return v_guided
    return rescale(v_guided, v_cond, self.token_block if self.cfg_norm == "token" else None)

  def velocity(self, params, x_t, t, y):
    v_c = self.apply(params, x_t, t, y)
    if self.guidance_scale != 1.0:
      v_u = self.apply(params, x_t, t, self.unconditional(y))
      v_c = self.normed(v_u + self.guidance_scale * (v_c - v_u), v_c)
    return jax.lax.stop_gradient(v_c)


def rescale(v_guided, v_cond, block: tuple[int, ...] | None = None, eps: float = 1e-12):
  """v_guided with the norm of each block set to v_cond's: v_g ||v_c||_blk / ||v_g||_blk.

  block: None = the whole sample; else the block's extent along each sample axis (each
  dividing that axis), e.g. (16, 2, 2) for 2 x 2 patch tokens of a [16, H, W] latent: the
  norm of each token over its 64 packed channels (diffusers' QwenImagePipeline).
  """
  if block is None:
    block = v_guided.shape[1:]
  b, dims = v_guided.shape[0], v_guided.shape[1:]
  if len(block) != len(dims) or any(d % k for d, k in zip(dims, block)):
    raise ValueError(f"CFG norm block {tuple(block)} does not tile a sample of shape {dims}")
  split = (b,) + tuple(x for d, k in zip(dims, block) for x in (d // k, k))
  inner = tuple(range(2, len(split), 2))          # the within-block axes

  def norm(v):
    return jnp.sqrt(jnp.sum(v.reshape(split).astype(jnp.float32)**2, inner, keepdims=True) + eps)
  ratio = (norm(v_cond) / norm(v_guided)).astype(v_guided.dtype)
  return (v_guided.reshape(split) * ratio).reshape(v_guided.shape)


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


def network_teacher(apply, num_classes: int, guidance_scale: float = 1.0,
                    cfg_norm: str = "none", token_block: tuple[int, ...] | None = None,
                    null_cond=None) -> Teacher:
  """A velocity network (e.g. the shipped DiT, Qwen-Image); its params travel as the argument.

  null_cond: y -> the unconditional branch's conditioning (e.g. the negative-prompt embedding
  of a text teacher); None: the null class label ``num_classes``.
  """
  return Teacher(apply=apply, null_class=num_classes, guidance_scale=guidance_scale,
                 null_cond=null_cond, cfg_norm=cfg_norm, token_block=token_block)


def skip_guidance_teacher(apply, null_class: int, guidance_scale: float, scale: float,
                          interval: tuple[float, float]) -> Teacher:
  """Spatiotemporal skip guidance (STG, Hyun et al. 2024) as a Teacher whose params are
  (params, skipped params) (e.g. ``dit.temporal_skipped``): v = v_u + s (v_c - v_u) +
  w (v_c - v_c^skip), with w = ``scale`` for t in ``interval`` and 0 elsewhere."""
  lo, hi = interval

  def velocity(both, x, t, y):
    params, skipped = both
    v_c = apply(params, x, t, y)
    v = apply(params, x, t, jnp.full_like(y, null_class))
    v = v + guidance_scale * (v_c - v)
    w = S.bcast(jnp.where((t >= lo) & (t <= hi), scale, 0.0), x)
    return v + w * (v_c - apply(skipped, x, t, y))
  return Teacher(apply=velocity, null_class=null_class)


# ---------------------------------------------------------------------------------------------
# Mixture of experts (Wan2.2 A14B: a high-noise and a low-noise expert, spec §1.3, §3.4)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class MoE:
  """apply((high, low), x, t, y): each sample's velocity from the expert owning its t.

  Sample i uses ``apply_high`` if t_i >= boundary (Wan: timestep >= boundary * 1000), else
  ``apply_low``. No shape-static program can send half a batch to each expert, so a batch
  that straddles the boundary runs both experts on all of it and selects per sample (2x the
  FLOPs and activations of one expert). Cost choice (``route``):
  - "switch" (default): ``lax.switch`` on the batch: all t >= boundary -> the high expert
    only, all below -> the low expert only, mixed -> both + select. The few-step sampler, the
    teacher reference and the phase-1 losses (t clamped to >= boundary) pay for one expert;
    only straddling batches (the last phase's re-noise t in (0, 1)) pay for two. The
    predicate is a reduction over the (sharded) batch: one tiny all-reduce.
  - "where": always both experts + select (no control flow; 2x cost everywhere).
  Gradients (the fake-score update) reach only the expert that produced each sample; take
  them with ``value_and_grad``, not by differentiating the call.
  """
  apply_high: Callable
  apply_low: Callable
  boundary: float
  route: str = "switch"

  def __post_init__(self):
    if self.route not in ROUTES:
      raise ValueError(f"route={self.route!r} is unknown; allowed: {list(ROUTES)}")

  def _both(self, params, x, t, y):
    high = S.bcast(t >= self.boundary, x)
    return jnp.where(high, self.apply_high(params[0], x, t, y), self.apply_low(params[1], x, t, y))

  def index(self, t):
    """0: every t on the high expert, 1: every t on the low one, 2: the batch straddles."""
    is_high = t >= self.boundary
    return jnp.where(jnp.all(is_high), 0, jnp.where(jnp.any(is_high), 2, 1))

  def __call__(self, params, x, t, y):
    if self.route == "where":
      return self._both(params, x, t, y)
    branches = (lambda p, x, t, y: self.apply_high(p[0], x, t, y),
                lambda p, x, t, y: self.apply_low(p[1], x, t, y), self._both)
    return jax.lax.switch(self.index(t), branches, params, x, t, y)

  def value_and_grad(self, loss_of_pred, params, x, t, y):
    """(loss, grads) of ``loss_of_pred(self(params, x, t, y))`` w.r.t. params = (high, low).

    Same value and gradient as ``jax.value_and_grad`` of the call, with the routing outside
    the differentiation: differentiating through ``lax.switch`` keeps the residuals of every
    branch (one expert's, the other's, both) live at once, four stacks of per-layer
    activations; here each branch differentiates on its own. A straddling batch takes the two
    experts' gradients one after the other (the low expert's prediction computed once more
    without gradient), so at most one expert's activations are held for a backward pass.
    """
    sg = jax.lax.stop_gradient
    high = S.bcast(t >= self.boundary, x)
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)

    def single(i):
      fn = (self.apply_high, self.apply_low)[i]

      def branch(params):
        loss, g = jax.value_and_grad(lambda q: loss_of_pred(fn(q, x, t, y)))(params[i])
        return loss, ((g, zeros(params[1])) if i == 0 else (zeros(params[0]), g))
      return branch

    def both(params):
      low = sg(self.apply_low(params[1], x, t, y))

      def loss_high(q):
        pred_high = self.apply_high(q, x, t, y)
        return loss_of_pred(jnp.where(high, pred_high, low)), pred_high

      (loss, pred_high), g_high = jax.value_and_grad(loss_high, has_aux=True)(params[0])
      pred_high = sg(pred_high)
      g_low = jax.grad(lambda q: loss_of_pred(
          jnp.where(high, pred_high, self.apply_low(q, x, t, y))))(params[1])
      return loss, (g_high, g_low)

    if self.route == "where":
      return both(params)
    return jax.lax.switch(self.index(t), (single(0), single(1), both), params)


def moe_apply(apply_high, apply_low, boundary: float, route: str = "switch") -> MoE:
  """The two-expert router (see ``MoE``)."""
  return MoE(apply_high, apply_low, boundary, route)


@dataclasses.dataclass(frozen=True)
class MoETeacher(Teacher):
  """Two experts routed by t, CFG scale per expert, cond + uncond in one batched call.

  params: (high-noise expert params, low-noise expert params).
  guidance_scale / guidance_scale_low: CFG of the high / low expert (low None: the same).
  """
  boundary: float = 0.875
  guidance_scale_low: float | None = None

  def velocity(self, params, x_t, t, y):
    w_high = self.guidance_scale
    w_low = w_high if self.guidance_scale_low is None else self.guidance_scale_low
    if w_high == 1.0 and w_low == 1.0:
      return jax.lax.stop_gradient(self.apply(params, x_t, t, y))
    b = x_t.shape[0]
    cat = lambda a, c: jnp.concatenate([a, c], axis=0)
    v = self.apply(params, cat(x_t, x_t), cat(t, t),
                   jax.tree.map(cat, y, self.unconditional(y)))
    v_c, v_u = v[:b], v[b:]
    w = w_high if w_high == w_low else jnp.where(t >= self.boundary, w_high, w_low)
    return jax.lax.stop_gradient(self.normed(v_u + S.bcast(w, v_c) * (v_c - v_u), v_c))


def moe_teacher(apply_high, apply_low, boundary: float, guidance_scale: float = 1.0,
                null_cond=None, *, guidance_scale_low: float | None = None,
                route: str = "switch") -> MoETeacher:
  """Wan2.2-style MoE teacher; its params are the tuple (high, low).

  Args:
    apply_high, apply_low: (expert params, x, t, y) -> velocity of each expert.
    boundary: t at which the high-noise expert takes over (0.875 T2V-A14B, 0.9 I2V-A14B).
    guidance_scale: CFG scale (of the high expert if ``guidance_scale_low`` is given).
    null_cond: y -> the unconditional branch's conditioning, e.g. the negative-prompt
      embedding swapped in for the prompt's; required when any scale != 1.
    guidance_scale_low: CFG scale of the low-noise expert (Wan2.2's ``guidance_scale_2``).
    route: "switch" or "where" (see ``moe_apply``).
  """
  if null_cond is None and (guidance_scale != 1.0 or guidance_scale_low not in (None, 1.0)):
    raise ValueError("moe_teacher: CFG (guidance_scale != 1) needs null_cond, e.g. the "
                     "negative-prompt embedding")
  return MoETeacher(apply=moe_apply(apply_high, apply_low, boundary, route), null_class=-1,
                    guidance_scale=guidance_scale, null_cond=null_cond, boundary=boundary,
                    guidance_scale_low=guidance_scale_low)
