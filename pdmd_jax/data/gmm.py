"""Gaussian-mixture data with exact scores: the analytic teachers' ground truth.

A mixture sum_i pi_i N(mu_i, tau_i^2 I), each mode tagged with a class label. Under any
Gaussian diffusion its marginal at time t is again a mixture,
sum_i pi_i N(alpha_t mu_i, (alpha_t^2 tau_i^2 + sigma_t^2) I), so the velocity, score and
posterior means are closed forms (``pdmd_jax.teachers.gmm_velocity``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DATASETS = ("ring", "random")


class GaussianMixture(NamedTuple):
  """A pytree: means [M, D], stds [M] (isotropic), weights [M] (sum 1), classes [M] int32."""
  means: jax.Array
  stds: jax.Array
  weights: jax.Array
  classes: jax.Array

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def num_modes(self) -> int:
    return self.means.shape[0]


def ring(num_modes: int = 8, radius: float = 2.0, std: float = 0.15,
         num_classes: int = 2) -> GaussianMixture:
  """Equal-weight modes on a circle in 2-D; mode i has class i % num_classes."""
  ang = 2 * np.pi * np.arange(num_modes) / num_modes
  means = radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)
  return _make(means, np.full(num_modes, std), np.full(num_modes, 1.0 / num_modes),
               np.arange(num_modes) % num_classes)


def random_mixture(dim: int = 16, num_modes: int = 12, radius: float = 2.0, std: float = 0.15,
                   num_classes: int = 4, seed: int = 0) -> GaussianMixture:
  """Modes at random directions on a sphere of ``radius`` with unequal weights pi_i ∝ 1/(i+1).

  Means are re-drawn until every pair is at least 6 * std * sqrt(2) apart, so that modes are
  well separated and nearest-mode assignment is unambiguous.
  """
  rng = np.random.default_rng(seed)
  for _ in range(1000):
    d = rng.normal(size=(num_modes, dim))
    means = radius * d / np.linalg.norm(d, axis=1, keepdims=True)
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.eye(num_modes) * 1e9
    if gaps.min() > 6 * std * np.sqrt(2):
      break
  else:
    raise ValueError(f"cannot place {num_modes} separated modes of std {std} on a sphere of "
                     f"radius {radius} in {dim} dims; lower num_modes or std")
  w = 1.0 / np.arange(1, num_modes + 1)
  return _make(means, np.full(num_modes, std), w / w.sum(), np.arange(num_modes) % num_classes)


def _make(means, stds, weights, classes) -> GaussianMixture:
  return GaussianMixture(jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32),
                         jnp.asarray(weights, jnp.float32), jnp.asarray(classes, jnp.int32))


def class_prior(gmm: GaussianMixture, num_classes: int) -> jax.Array:
  """p(y) = sum of the weights of the modes of class y."""
  return jnp.zeros((num_classes,), jnp.float32).at[gmm.classes].add(gmm.weights)


def mode_weights_given_class(gmm: GaussianMixture, y: jax.Array) -> jax.Array:
  """[B, M]: p(mode | y); y == num_classes (the null class) means the whole mixture."""
  num_classes = jnp.max(gmm.classes) + 1
  member = (gmm.classes[None, :] == y[:, None]) | (y[:, None] >= num_classes)
  w = jnp.where(member, gmm.weights[None, :], 0.0)
  return w / jnp.sum(w, axis=1, keepdims=True)


def sample(key, gmm: GaussianMixture, y: jax.Array):
  """Exact data samples x_0 ~ p(x_0 | y); returns (x0 [B, D], mode index [B])."""
  k_mode, k_noise = jax.random.split(key)
  logits = jnp.log(mode_weights_given_class(gmm, y) + 1e-30)
  mode = jax.random.categorical(k_mode, logits, axis=-1)
  z = jax.random.normal(k_noise, (y.shape[0], gmm.dim))
  return gmm.means[mode] + gmm.stds[mode][:, None] * z, mode


def sample_marginal(key, gmm: GaussianMixture, y: jax.Array, alpha, sigma):
  """Exact x_t ~ p_t(x | y) = alpha x_0 + sigma eps; returns (x_t, mode index)."""
  k0, k1 = jax.random.split(key)
  x0, mode = sample(k0, gmm, y)
  return alpha * x0 + sigma * jax.random.normal(k1, x0.shape), mode


def sample_labels(key, gmm: GaussianMixture, num_classes: int, shape) -> jax.Array:
  """Conditioning labels y ~ p(y) (the 'prompts' of data-free distillation)."""
  return jax.random.categorical(key, jnp.log(class_prior(gmm, num_classes)), shape=shape)


def make(name: str, *, dim: int, num_modes: int, num_classes: int, radius: float, std: float,
         seed: int = 0) -> GaussianMixture:
  if name == "ring":
    if dim != 2:
      raise ValueError(f"teacher.dim={dim} is not allowed for dataset 'ring'; allowed: [2]")
    return ring(num_modes, radius, std, num_classes)
  if name == "random":
    return random_mixture(dim, num_modes, radius, std, num_classes, seed)
  raise ValueError(f"teacher.dataset={name!r} is unknown; allowed: {list(DATASETS)}")
