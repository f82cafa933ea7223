"""Pure training steps: ``fake_step``, ``generator_step`` and ``phase_step`` (TTUR k:1).

Each is ``(state, teacher_params, batch) -> (state, metrics)``; the phase index is static
(one compiled program per phase), everything else is traced. Randomness is
``fold_in(state.rng, state.step)`` split by purpose, so a resumed run draws the same numbers
as an uninterrupted one. The frozen teacher enters as an argument, never as state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from pdmd_jax import losses
from pdmd_jax import methods
from pdmd_jax import rollout
from pdmd_jax import sampling
from pdmd_jax import schedule as S
from pdmd_jax import teachers

sg = jax.lax.stop_gradient


@flax.struct.dataclass
class TrainState:
  """Everything that changes during distillation (the teacher is not here).

  step: number of generator updates done so far (over all phases).
  rng: the run's base key (uint32[2]); per-step keys are fold_in(rng, step).
  experts / expert_opt: one generator expert per phase and its optimizer state.
  fakes / fake_opt: one fake score per phase (initialised from the teacher or its fit): a
    full parameter copy, or a LoRA tree on the frozen teacher (shared-backbone mode).

  ema: an exponential moving average of each held expert, {"params", "count"} (count = that
    expert's updates so far), fp32; all None when generator.ema_decay = 0 (off).

  Each tuple has one entry per phase; an entry is ``None`` where the layout (``layout``) holds
  nothing: in the progressive order, while phase k trains, experts 0..k-1 are frozen
  parameters (no moments), expert k and fake k are the only trainable trees, and phases after
  k are not yet allocated. The interleaved order keeps every phase live.
  """
  step: jax.Array
  rng: jax.Array
  experts: tuple[Any, ...]
  expert_opt: tuple[Any, ...]
  fakes: tuple[Any, ...]
  fake_opt: tuple[Any, ...]
  ema: tuple[Any, ...]


def make_optimizer(lr: float, b1: float, b2: float, weight_decay: float = 0.0,
                   grad_clip: float = 0.0, eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW (the paper: beta1 = 0, beta2 = 0.999), optionally after global-norm clipping."""
  tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0 else tx


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which phases the state holds while one phase trains.

  frozen: phases whose expert is a finished, frozen parameter tree (no moments, no fake).
  live: phases with a trainable expert, its moments, a fake score and its moments.
  """
  num_phases: int
  frozen: tuple[int, ...]
  live: tuple[int, ...]


def layout(order: str, num_phases: int, k: int) -> Layout:
  """The state layout while phase k trains: progressive keeps phase k live and 0..k-1 frozen
  (the paper's order; each phase costs about one-step DMD); interleaved keeps every phase live."""
  if order == "interleaved":
    return Layout(num_phases, (), tuple(range(num_phases)))
  return Layout(num_phases, tuple(range(k)), (k,))


def _copy(tree):
  return jax.tree.map(jnp.array, tree)


def _ema_init(expert):
  return {"params": jax.tree.map(lambda a: jnp.array(a, jnp.float32), expert),
          "count": jnp.zeros((), jnp.int32)}


def ema_update(ema, params, decay: float, start: int):
  """One EMA step after an update of its expert: the average follows the weights exactly for
  the expert's first ``start`` updates, then avg <- decay avg + (1 - decay) params."""
  follow = ema["count"] < start
  new = jax.tree.map(lambda m, p: jnp.where(follow, p.astype(jnp.float32),
                                            decay * m + (1.0 - decay) * p.astype(jnp.float32)),
                     ema["params"], params)
  return {"params": new, "count": ema["count"] + 1}


def create_state(rng, init_params, num_phases: int, gen_tx, fake_tx, expert_init=None,
                 lay: Layout | None = None, ema: bool = False) -> TrainState:
  """A state in layout ``lay`` (default: every phase live) with every tree at its start.

  Fake scores start as a copy of ``init_params`` (the teacher or its fit, or a LoRA tree with
  B = 0 in shared-backbone mode); experts as a copy of ``expert_init`` (default
  ``init_params``: full-copy experts; a LoRA tree with B = 0 for LoRA experts on the frozen
  teacher). rng: the run's base key (uint32[2]) or an int seed. ema: hold an EMA of every
  held expert (starting at its initial tree).
  """
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  lay = lay or Layout(num_phases, (), tuple(range(num_phases)))
  expert_init = init_params if expert_init is None else expert_init
  held = set(lay.frozen) | set(lay.live)
  live = set(lay.live)
  experts = tuple(_copy(expert_init) if j in held else None for j in range(num_phases))
  fakes = tuple(_copy(init_params) if j in live else None for j in range(num_phases))
  return TrainState(
      step=jnp.zeros((), jnp.int32), rng=rng, experts=experts,
      expert_opt=tuple(gen_tx.init(e) if j in live else None for j, e in enumerate(experts)),
      fakes=fakes, fake_opt=tuple(None if f is None else fake_tx.init(f) for f in fakes),
      ema=tuple(_ema_init(e) if ema and e is not None else None for e in experts))


def start_phase(state: TrainState, k: int, init_params, gen_tx, fake_tx,
                expert_init=None, ema: bool = False) -> TrainState:
  """Progressive order, phase k > 0 begins: expert k-1 is frozen (its moments dropped), fake
  k-1 and its moments are dropped, and phase k's expert and fake start from their initial
  trees (the fake from the teacher, as the paper re-initialises it at each phase)."""
  expert_init = init_params if expert_init is None else expert_init
  new = lambda tree, value: _set(tree, k, value)
  drop = lambda tree: _set(tree, k - 1, None)
  expert = _copy(expert_init)
  fake = _copy(init_params)
  return state.replace(experts=new(state.experts, expert),
                       expert_opt=new(drop(state.expert_opt), gen_tx.init(expert)),
                       fakes=new(drop(state.fakes), fake),
                       fake_opt=new(drop(state.fake_opt), fake_tx.init(fake)),
                       ema=new(state.ema, _ema_init(expert)) if ema else state.ema)


def eval_experts(state: TrainState, use_ema: bool = True):
  """The experts a sampler runs: the EMA weights where held (and ``use_ema``), else the raw."""
  return tuple(e["params"] if use_ema and e is not None else p
               for e, p in zip(state.ema, state.experts))


def fill_experts(experts, expert_init):
  """Every phase's expert, the not-yet-trained ones (``None``) at their initial tree (which
  samples like the teacher): what a few-step sampler of a mid-run state runs."""
  return tuple(expert_init if e is None else e for e in experts)


@dataclasses.dataclass(frozen=True, eq=False)
class Anchor:
  """The ODE anchor (config.anchor): on phase ``phase``, the generator update's stop step is
  fixed at ``step`` and its output x_s is pulled toward the teacher's ODE solution from the
  same input (the no-gradient state at t_step) to the phase boundary, Euler through ``times``;
  the loss adds ``weight`` * losses.anchor_loss. With phase 0, step 0 the input is the noise z
  itself: DMD's paired regression (one-step DMD), LightX2V's diversity term (phased)."""
  weight: float
  phase: int
  step: int
  times: tuple[float, ...]       # t_step > ... > boundary: the teacher's Euler steps
  features: Any = None           # distance in this feature map (None: pixels/latents)


@dataclasses.dataclass(frozen=True, eq=False)
class Gan:
  """DMD2's GAN term (config.gan). A fake tree is then {"score": the fake score, "head": a
  discriminator head}; the head reads ``source``'s tokens after a middle block
  (``features(params, x, t, y) -> (velocity, tokens [B, *grid, D])`` of a full network) at
  diffusion-GAN inputs: generator samples and real data re-noised at the phase's t.
  Generator: gen_weight softplus(-D(G)); fake: disc_weight (softplus(D(G)) + softplus(-D(real))),
  which also trains the fake backbone when source = "fake" (DMD2; "teacher": FastGen, the
  head alone)."""
  gen_weight: float
  disc_weight: float
  source: str                    # fake | teacher
  head: Any                      # head(params, tokens) -> logits [B]
  features: Any
  fake_merge: Any = None         # teacher_params -> (fake score tree -> full params); None: full
  elements: int = 1              # the generator term's scale: D under sample_sum, else 1


@dataclasses.dataclass(frozen=True, eq=False)
class StepConfig:
  """The static side of a step: plan, networks, schedule and loss options."""
  plan: methods.PhasePlan
  apply: Any                      # apply(params, x, t, y) of the fake scores (and full-copy experts)
  teacher: teachers.Teacher
  sched: S.Schedule
  sample_shape: tuple[int, ...]   # one sample's shape (no batch axis)
  gen_tx: optax.GradientTransformation
  fake_tx: optax.GradientTransformation
  ttur: int = 5
  weighting: str = "exact"
  fake_target: str = "eq13"
  clamp_final_phase: bool = False  # Eq. 13 clamp when s = 0 (see losses.fake_target)
  norm_floor: float = 1e-4
  loss_reduction: str = "sample_sum"   # losses.generator_loss
  gen_clip: float = 0.0                # the generator's global-norm clip (for the metric)
  ema_decay: float = 0.0               # EMA of the generator experts (0: off)
  ema_start: int = 0                   # expert updates before the EMA starts averaging
  anchor: Anchor | None = None         # the ODE anchor term (None: off)
  ida_lambda: float = 1.0              # IDA: fake <- lam fake + (1 - lam) expert (1: off)
  gan: Gan | None = None               # DMD2's GAN term (None: off)
  # teacher_params -> apply (or one per expert) of the generator experts; None: ``apply``.
  # LoRA experts read their frozen backbone from the teacher's parameters this way.
  expert_apply: Any = None
  # teacher_params -> apply of the fake scores; None: ``apply`` (full fake copies). Shared-
  # backbone mode: LoRA fakes on the teacher's frozen parameters (no second full copy).
  fake_apply: Any = None
  # teacher_params -> (expert tree -> its full parameters, the fake's structure); None: the
  # experts are full copies. Read by IDA only.
  expert_merge: Any = None

  def experts_apply(self, teacher_params):
    return self.apply if self.expert_apply is None else self.expert_apply(teacher_params)

  def fakes_apply(self, teacher_params):
    return self.apply if self.fake_apply is None else self.fake_apply(teacher_params)


def _keys(key):
  k = jax.random.split(key, 4)
  return {"z": k[0], "stop": k[1], "t": k[2], "eps": k[3]}


def _renoise(cfg: StepConfig, phase: methods.Phase, x_s, keys):
  t = phase.t_sampler(keys["t"], (x_s.shape[0],))
  eps = jax.random.normal(keys["eps"], x_s.shape)
  return t, eps, S.renoise(cfg.sched, sg(x_s), phase.boundary, t, eps)


def _fake_target_kind(cfg: StepConfig, phase: methods.Phase) -> str:
  if cfg.fake_target == "eq13" and phase.boundary == 0.0 and not cfg.clamp_final_phase:
    return "eq11"  # identical target at s = 0 (= Eq. 8) without min(1, 10 t^2) down-weighting
  return cfg.fake_target


def fake_step(cfg: StepConfig, k: int, state: TrainState, teacher_params, y, key, real=None):
  """One fake-score update of phase k on fresh, gradient-free phase-k samples (Eq. 11/13);
  with the GAN term also the discriminator loss on them and on ``real`` {"x", "y"}."""
  phase = cfg.plan.phases[k]
  keys = _keys(key)
  z = jax.random.normal(keys["z"], (_batch_size(y),) + cfg.sample_shape)
  x_s, _ = rollout.phase_sample(cfg.plan, k, cfg.experts_apply(teacher_params), state.experts,
                                state.experts[k], z, y, keys["stop"])
  x_s = sg(x_s)
  t, eps, x_t = _renoise(cfg, phase, x_s, keys)
  weight, scale, target = losses.fake_target(cfg.sched, x_s, phase.boundary, t, eps,
                                             _fake_target_kind(cfg, phase))

  fake_apply = cfg.fakes_apply(teacher_params)
  loss_of_pred = lambda pred: losses.fake_loss(pred, weight, scale, target)
  aux = {}
  if cfg.gan is not None:
    eps_real = jax.random.normal(jax.random.fold_in(key, 1), real["x"].shape)
    x_real = S.renoise(cfg.sched, real["x"].astype(x_t.dtype), 0.0, t, eps_real)
    (loss, aux), grads = jax.value_and_grad(_gan_fake_loss, has_aux=True)(
        state.fakes[k], cfg, teacher_params, loss_of_pred, (x_t, y), (x_real, real["y"]), t)
  elif isinstance(fake_apply, teachers.MoE):   # routed outside the differentiation
    loss, grads = fake_apply.value_and_grad(loss_of_pred, state.fakes[k], x_t, t, y)
  else:
    loss, grads = jax.value_and_grad(lambda p: loss_of_pred(fake_apply(p, x_t, t, y)))(
        state.fakes[k])
  updates, opt = cfg.fake_tx.update(grads, state.fake_opt[k], state.fakes[k])
  params = optax.apply_updates(state.fakes[k], updates)
  state = state.replace(fakes=_set(state.fakes, k, params), fake_opt=_set(state.fake_opt, k, opt))
  return state, {"fake_loss": aux.get("fake_loss", loss), "fake_grad_norm": optax.global_norm(grads),
                 **{m: v for m, v in aux.items() if m != "fake_loss"}}


def _gan_features(cfg: StepConfig, teacher_params, score, x, t, y):
  """(velocity of the fake score or None, the GAN source's tokens) at (x, t, y)."""
  gan = cfg.gan
  if gan.source == "teacher":
    return None, gan.features(sg(teacher_params), x, t, y)[1]
  full = score if gan.fake_merge is None else gan.fake_merge(teacher_params)(score)
  return gan.features(full, x, t, y)


def _gan_fake_loss(params, cfg: StepConfig, teacher_params, loss_of_pred, fake_in, real_in, t):
  """DSM + disc_weight (softplus(D(G)) + softplus(-D(real))), batch means; the head and (source
  fake) the score are trained by it."""
  gan = cfg.gan
  (x_t, y), (x_real, y_real) = fake_in, real_in
  v, f_fake = _gan_features(cfg, teacher_params, params["score"], x_t, t, y)
  if v is None:
    v = cfg.fakes_apply(teacher_params)(params, x_t, t, y)
  _, f_real = _gan_features(cfg, teacher_params, params["score"], x_real, t, y_real)
  d_fake, d_real = gan.head(params["head"], f_fake), gan.head(params["head"], f_real)
  dsm = loss_of_pred(v)
  disc = losses.gan_disc_loss(d_fake, d_real)
  aux = {"fake_loss": dsm, "gan_disc_loss": disc, "d_real": jnp.mean(jax.nn.sigmoid(d_real)),
         "d_fake": jnp.mean(jax.nn.sigmoid(d_fake))}
  return dsm + gan.disc_weight * disc, aux


def generator_step(cfg: StepConfig, k: int, state: TrainState, teacher_params, y, key):
  """One update of expert k with the phase-k DMD gradient (Eq. 10), teacher and fake frozen."""
  phase = cfg.plan.phases[k]
  keys = _keys(key)
  z = jax.random.normal(keys["z"], (_batch_size(y),) + cfg.sample_shape)
  fake = sg(state.fakes[k])

  anchor = cfg.anchor if cfg.anchor is not None and cfg.anchor.phase == k else None
  apply = cfg.experts_apply(teacher_params)

  def loss_fn(p):
    if anchor is None:
      x_s, stop = rollout.phase_sample(cfg.plan, k, apply, state.experts, p, z, y, keys["stop"])
    else:
      x_s, x_in = rollout.phase_sample_at(cfg.plan, k, apply, state.experts, p, z, y,
                                          anchor.step)
      stop = jnp.int32(anchor.step)
    t, eps, x_t = _renoise(cfg, phase, x_s, keys)
    v_t = cfg.teacher.velocity(teacher_params, x_t, t, y)
    aux = {}
    if cfg.gan is None:
      v_f = sg(cfg.fakes_apply(teacher_params)(fake, x_t, t, y))
    else:   # the same x_t, differentiable: the head's gradient reaches x_s through the features
      x_t_g = S.renoise(cfg.sched, x_s, phase.boundary, t, eps)
      v_f, tokens = _gan_features(cfg, teacher_params, fake["score"], x_t_g, t, y)
      v_f = sg(cfg.fakes_apply(teacher_params)(fake, x_t, t, y) if v_f is None else v_f)
      aux["gan_gen_loss"] = losses.gan_gen_loss(cfg.gan.head(fake["head"], tokens))
    g = losses.generator_grad_direction(cfg.sched, x_s, phase.boundary, t, x_t, v_t, v_f,
                                        cfg.weighting, cfg.norm_floor)
    surrogate = total = losses.generator_loss(x_s, g, cfg.loss_reduction)
    aux.update({"gen_surrogate": surrogate, "t_mean": jnp.mean(t), "stop_index": stop,
                "dmd_grad_norm": jnp.mean(jnp.sqrt(jnp.sum(g.reshape(g.shape[0], -1)**2, -1)))})
    if cfg.gan is not None:
      total = total + cfg.gan.gen_weight * cfg.gan.elements * aux["gan_gen_loss"]
    if anchor is not None:
      target = sampling.euler(cfg.teacher, teacher_params, anchor.times, x_in, y)[-1]
      aux["anchor_loss"] = losses.anchor_loss(x_s, target, cfg.loss_reduction, anchor.features)
      total = total + anchor.weight * aux["anchor_loss"]
    return total, aux

  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.experts[k])
  updates, opt = cfg.gen_tx.update(grads, state.expert_opt[k], state.experts[k])
  params = optax.apply_updates(state.experts[k], updates)
  state = state.replace(experts=_set(state.experts, k, params),
                        expert_opt=_set(state.expert_opt, k, opt))
  if cfg.ema_decay > 0:
    state = state.replace(ema=_set(state.ema, k, ema_update(state.ema[k], params, cfg.ema_decay,
                                                            cfg.ema_start)))
  norm = optax.global_norm(grads)
  metrics = {"gen_grad_norm": norm, **aux}
  if cfg.gen_clip > 0:   # 1 when the clip rescaled this update's gradient
    metrics["gen_clipped"] = (norm > cfg.gen_clip).astype(jnp.float32)
  return state, metrics


def ida(cfg: StepConfig, k: int, state: TrainState, teacher_params) -> TrainState:
  """SenseFlow's implicit distribution alignment: fake_k <- lam fake_k + (1 - lam) G_k, with
  G_k expert k's full parameters (LoRA experts: merged on the teacher backbone), in fp32."""
  expert = state.experts[k]
  if cfg.expert_merge is not None:
    expert = cfg.expert_merge(teacher_params)(expert)
  lam = cfg.ida_lambda
  mix = lambda f, g: (lam * f.astype(jnp.float32) + (1.0 - lam) * sg(g).astype(jnp.float32)
                      ).astype(f.dtype)
  fake = state.fakes[k]
  if cfg.gan is not None:   # the score only; the discriminator head stays
    return state.replace(fakes=_set(state.fakes, k, {
        **fake, "score": jax.tree.map(mix, fake["score"], expert)}))
  return state.replace(fakes=_set(state.fakes, k, jax.tree.map(mix, fake, expert)))


def phase_step(cfg: StepConfig, k: int, state: TrainState, teacher_params, batch):
  """TTUR: ``cfg.ttur`` fake updates, then one generator update (then IDA when on); step += 1.

  batch["y"]: conditioning with leading axes [ttur + 1, B] (int labels, or a pytree such as
  text embeddings); row i conditions fake update i, the last row the
  generator update. batch["real"] (GAN term only): {"x": [ttur, B, ...], "y": [ttur, B]} real
  data, row i for fake update i's discriminator.
  """
  base = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), k)

  def body(i, carry):
    st, acc = carry
    real = None if cfg.gan is None else _row(batch["real"], i)
    st, m = fake_step(cfg, k, st, teacher_params, _row(batch["y"], i), jax.random.fold_in(base, i),
                      real)
    return st, jax.tree.map(lambda a, b: a + b / cfg.ttur, acc, m)

  names = ("fake_loss", "fake_grad_norm") + (() if cfg.gan is None else
                                             ("gan_disc_loss", "d_real", "d_fake"))
  zeros = {m: jnp.zeros(()) for m in names}
  state, fake_metrics = jax.lax.fori_loop(0, cfg.ttur, body, (state, zeros))
  state, gen_metrics = generator_step(cfg, k, state, teacher_params, _row(batch["y"], cfg.ttur),
                                      jax.random.fold_in(base, cfg.ttur))
  if cfg.ida_lambda < 1.0:
    state = ida(cfg, k, state, teacher_params)
  metrics = {**fake_metrics, **gen_metrics}
  watched = ("fake_loss", "fake_grad_norm", "gen_grad_norm", "dmd_grad_norm", "anchor_loss",
             "gan_disc_loss", "gan_gen_loss")
  metrics["finite"] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(metrics[m])) for m in watched
                                         if m in metrics]))
  return state.replace(step=state.step + 1), metrics


def jit_phase_step(cfg: StepConfig, k: int, state_sharding=None, teacher_sharding=None,
                   batch_sharding=None):
  """phase_step for phase k, jitted once with explicit shardings and the state donated."""
  fn = functools.partial(phase_step, cfg, k)
  if state_sharding is None:
    return jax.jit(fn, donate_argnums=(0,))
  return jax.jit(fn, in_shardings=(state_sharding, teacher_sharding, batch_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=(0,))


def _row(y, i):
  return jax.tree.map(lambda a: a[i], y)


def _batch_size(y) -> int:
  return jax.tree.leaves(y)[0].shape[0]


def _set(tup, k, value):
  return tup[:k] + (value,) + tup[k + 1:]
