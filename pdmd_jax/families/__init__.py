"""Teacher families: the only code that knows a model.

A family is a package ``pdmd_jax/families/<name>/`` with two functions:

  validate(config, plan, *, files=True) -> None; raises ValueError (FileNotFoundError for
      missing weights or data, checked only with ``files``) naming the field; called by
      ``validation.validate`` after the generic checks, with the run's PhasePlan
  build(config, plan, mesh, *, abstract=False, workdir=None) -> Family
      the teacher and the initial trees; ``workdir`` may cache work (the mixture's MLP fit)

and optionally ``has_features(config) -> bool`` (``Family.features`` is set: the ODE anchor
may use the "features" distance) and ``has_gan(config) -> bool`` (``score_features`` and
``real_data`` are set: the GAN term may run).

``config.teacher.type`` names the package; ``get(name)`` imports it. Nothing outside a
family's package branches on family names: the trainer, the AOT planner, the evaluation and
the health monitor read the ``Family`` below. ``abstract=True`` returns ShapeDtypeStruct
parameter trees (nothing allocated, no weight file read), which the AOT planner lowers
through the very assembly the trainer uses (``pdmd_jax.assembly``).

Adding a family = one package here + one config file (docs/architecture.md has the checklist).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from types import MappingProxyType
from typing import Any, Callable, Mapping

from pdmd_jax import teachers

# Evaluators: modules of pdmd_jax.evaluation with evaluate(run, state, workdir, *, tag, verbose).
EVALUATORS = ("gmm_eval", "image_eval", "latent_eval")


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
  """What a teacher family hands the engine (hashable by identity: safe as a jit static).

  Parameter trees are arrays, or ShapeDtypeStructs when built with ``abstract=True``. Axes
  trees mirror their parameter trees with tuples of logical axis names (sharding.py's rules);
  ``None`` means "no annotations": the rule-free FSDP tactic (``sharding.tree_shardings``).
  """
  name: str
  teacher: teachers.Teacher                # guided, frozen velocity v(params, x_t, t, y)
  teacher_params: Any
  teacher_axes: Any
  apply: Callable                          # apply(params, x, t, y) of a full-parameter copy
  fake_init: Any                           # a fake score's initial tree (full copy or LoRA)
  fake_axes: Any
  expert_init: Any                         # a generator expert's initial tree
  expert_axes: Any
  sample_shape: tuple[int, ...]            # one sample, no batch axis
  sample_cond: Callable                    # (key, shape) -> conditioning (labels or a pytree)
  evaluator: str                           # one of EVALUATORS
  num_classes: int = 0                     # class-conditional families; 0 for text
  # A class-conditional teacher distilled on its null class only (its unconditional branch):
  # sample_cond draws the null label ``num_classes``; the evaluation and the health monitor
  # generate from it too and measure class coverage instead of accuracy.
  unconditional: bool = False
  # (tokens, heads) of one sample's self-attention (0, 0: none); the assembly refuses dense
  # attention whose [heads, L, L] logits cannot fit a device.
  attention_shape: tuple[int, int] = (0, 0)
  # teacher_params -> apply of the experts (or a tuple, one per phase); None: ``apply``.
  # LoRA experts read their frozen backbone from the teacher's parameters this way.
  expert_apply: Callable | None = None
  # teacher_params -> apply of the fakes; None: ``apply`` (full copies).
  fake_apply: Callable | None = None
  # teacher_params -> (expert tree -> its full parameters); None: experts are full copies.
  # IDA (fake <- lam fake + (1 - lam) expert) mixes these into the fake.
  expert_merge: Callable | None = None
  # teacher_params -> (fake tree -> its full parameters); None: fakes are full copies.
  fake_merge: Callable | None = None
  # (full params, x, t, y) -> (velocity, tokens [B, *grid, D] after config.gan.layer): the GAN
  # head's input. None: no GAN term.
  score_features: Callable | None = None
  # (batch_size, seed) -> a random-access grain MapDataset whose element i is real batch i,
  # {"x": [N, *sample_shape] float32, "y": [N] int32} (the GAN's real data). None: data-free.
  real_data: Callable | None = None
  # (batch_shape, seed, columns) -> a random-access grain MapDataset whose element i is update
  # i's conditioning (numpy, sample_cond's structure), columns ``columns`` of axis 1 only (this
  # process's batch shard), read from disk (data.stream). None: sample_cond draws it in the step.
  cond_data: Callable | None = None
  # x [B, *sample_shape] -> features [B, F] of clean samples (the ODE anchor's "features"
  # distance); None: the family has none.
  features: Callable | None = None
  # x [B, *sample_shape] in the engine's coordinates -> the family's samples. The engine samples
  # z ~ N(0, I) and every equation assumes i.i.d. noise; a teacher trained under another Gaussian
  # prior N(0, Sigma) runs in whitened coordinates u = Sigma^{-1/2} x (its apply wrapped by
  # ``noise.whitened_apply``) and ``decode`` = Sigma^{1/2} maps its samples (and trajectory
  # points) back to pixels before any metric. None: the identity.
  decode: Callable | None = None
  # What only this family's evaluator reads (e.g. the mixture, a teacher card, embeddings).
  extras: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

  def __post_init__(self):
    if self.evaluator not in EVALUATORS:
      raise ValueError(f"Family {self.name!r}: evaluator={self.evaluator!r}; allowed: "
                       f"{list(EVALUATORS)}")


def decode(family: Family | None, x):
  """``family.decode(x)`` (pixels of engine-coordinate samples); x itself without a decode."""
  fn = getattr(family, "decode", None)
  return x if fn is None else fn(x)


def names() -> tuple[str, ...]:
  """Every family package under pdmd_jax/families/."""
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg))


def get(name: str):
  """The family package ``name`` (its module exposes ``validate`` and ``build``)."""
  if name not in names():
    raise ValueError(f"config.teacher.type={name!r} is not allowed; allowed: {list(names())} "
                     "(packages under pdmd_jax/families/)")
  return importlib.import_module(f"{__name__}.{name}")
