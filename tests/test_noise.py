"""The frame-correlated prior (noise.py): its covariance, the whitened coordinates the engine runs
in (exact against closed-form Gaussian velocities), and the DiT family wired through them."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdmd_jax import assembly
from pdmd_jax import assets
from pdmd_jax import configs
from pdmd_jax import families
from pdmd_jax import models
from pdmd_jax import noise
from pdmd_jax import sampling
from pdmd_jax import schedule as S
from pdmd_jax import trainer
from pdmd_jax.families import common
from pdmd_jax.families import dit as dit_family
from pdmd_jax.models import dit

F = 4


def _sigma(rho, f=F):
  return (1 - rho) * np.eye(f) + rho * np.ones((f, f))


def _sqrtm(a, power=0.5):
  w, v = np.linalg.eigh(a)
  return (v * w**power) @ v.T


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8])
def test_color_and_whiten_are_the_matrix_square_roots_of_sigma(rho):
  u = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, F, 5, 2)))
  # Sigma^{1/2} applied along the frame axis, pixel by pixel, from an eigendecomposition
  want = np.einsum("gf,bf...->bg...", _sqrtm(_sigma(rho)), u)
  np.testing.assert_allclose(noise.color(u, rho), want, atol=1e-5)
  want_w = np.einsum("gf,bf...->bg...", _sqrtm(_sigma(rho), -0.5), u)
  np.testing.assert_allclose(noise.whiten(u, rho), want_w, atol=1e-4)
  np.testing.assert_allclose(noise.whiten(noise.color(u, rho), rho), u, atol=1e-5)


def test_sampled_prior_has_unit_variance_and_the_frame_correlation():
  x = np.asarray(noise.sample(jax.random.PRNGKey(1), (40_000, F, 1, 1, 1), 0.6))[..., 0, 0, 0]
  np.testing.assert_allclose(np.cov(x.T), _sigma(0.6), atol=0.02)


def test_invalid_correlation_names_the_field():
  with pytest.raises(ValueError, match=r"model.noise_frame_corr=1.0.*\[0, 1\)"):
    models.build_dit(dit.DiTConfig(frames=2, noise_frame_corr=1.0, **_TINY))
  with pytest.raises(ValueError, match=r"model.noise_frame_corr=0.5 needs a video model"):
    models.build_dit(dit.DiTConfig(noise_frame_corr=0.5, **_TINY))


def _exact_velocity(mean, cov0, noise_cov):
  """v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(mean, cov0), eps ~ N(0, noise_cov) (vectors)."""
  def v(x, t):
    k = (1 - t) ** 2 * cov0 + t**2 * noise_cov
    r = np.linalg.solve(k, x - (1 - t) * mean)
    return t * noise_cov @ r - (mean + (1 - t) * cov0 @ r)
  return v


def test_whitened_apply_is_the_exact_velocity_of_the_whitened_process():
  """A Gaussian clip x0 ~ N(m, C0) noised with the correlated prior: wrapping its exact pixel
  velocity gives the exact velocity of u0 = Sigma^{-1/2} x0 under i.i.d. noise, the process
  every equation of the spec assumes."""
  rho = 0.7
  rng = np.random.default_rng(0)
  m = rng.normal(size=F)
  a = rng.normal(size=(F, F))
  c0 = a @ a.T / F + 0.1 * np.eye(F)
  w = _sqrtm(_sigma(rho), -0.5)
  v_pixel = _exact_velocity(m, c0, _sigma(rho))
  v_white = _exact_velocity(w @ m, w @ c0 @ w.T, np.eye(F))
  # the network signature: x [B, F, H, W, C], t [B]
  apply = lambda p, x, t, y: jnp.asarray(np.stack(
      [v_pixel(np.asarray(xi).reshape(F), float(ti)).reshape(xi.shape) for xi, ti in zip(x, t)]))
  wrapped = noise.whitened_apply(apply, rho)
  u = rng.normal(size=(3, F, 1, 1, 1))
  t = np.array([0.2, 0.5, 0.9])
  got = np.asarray(wrapped(None, jnp.asarray(u), t, None))
  want = np.stack([v_white(ui.reshape(F), ti).reshape(ui.shape) for ui, ti in zip(u, t)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


_TINY = dict(image_size=8, patch=4, hidden=32, depth=2, heads=2, num_classes=3)


def test_dit_family_runs_in_whitened_coordinates_and_decodes_to_pixels():
  arch = dit.DiTConfig(frames=4, layout="divided", noise_frame_corr=0.5, **_TINY)
  c = dit_family.random_config(arch, overrides={"train.batch_size": 8})
  fam = assembly.build(c, abstract=False).family
  net, _ = models.abstract_dit(arch)
  p = fam.teacher_params
  x = jax.random.normal(jax.random.PRNGKey(0), (2,) + arch.sample_shape)
  t, y = jnp.array([0.3, 0.8]), jnp.array([0, 1])
  np.testing.assert_allclose(jax.jit(fam.apply)(p, noise.whiten(x, 0.5), t, y),
                             noise.whiten(jax.jit(net.apply)(p, x, t, y), 0.5), atol=1e-5)
  np.testing.assert_allclose(families.decode(fam, noise.whiten(x, 0.5)), x, atol=1e-5)
  # the many-step teacher sampler in whitened coordinates, decoded, is the pixel sampler started
  # from the colored noise (Euler commutes with the linear change of coordinates)
  times = np.asarray(S.grid(6, 3.0), np.float32)
  xi = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  got = jax.jit(lambda p, z: families.decode(fam, sampling.euler(fam.teacher, p, times, z, y)[-1]))(
      p, xi)
  pixel_teacher = dataclasses.replace(fam.teacher, apply=net.apply)
  want = jax.jit(lambda p, z: sampling.euler(pixel_teacher, p, times, noise.color(z, 0.5), y)[-1])(
      p, xi)
  chex.assert_tree_all_finite(got)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # an i.i.d. teacher has no decode
  iid = assembly.build(dit_family.random_config(dataclasses.replace(arch, noise_frame_corr=0.0),
                                                overrides={"train.batch_size": 8})).family
  assert iid.decode is None


def test_distillation_of_a_correlated_video_teacher(tmp_path):
  """configs/video.py on a tiny video DiT trained under the prior: the experts at init sample
  exactly the pixel-space teacher from colored noise, and one phase step stays finite."""
  cfg = dit.DiTConfig(frames=4, layout="divided", noise_frame_corr=0.6, **_TINY)
  params = common.perturbed(models.build_dit(cfg, seed=3)[1], seed=0, scale=0.05)
  path = str(tmp_path / "teacher")
  assets.save(path, jax.device_get(params), {"model": dataclasses.asdict(cfg), "metrics": None})
  c = configs.load(f"configs/video.py:runlocal,teacher={path}")
  run = trainer.build(c, devices=jax.devices()[:1])
  state = trainer.initial_state(run)
  assert run.family.decode is not None
  xi = jax.random.normal(jax.random.PRNGKey(1), (4,) + run.sample_shape)
  y = jnp.array([0, 1, 2, 0])
  few = jax.jit(lambda experts, z: families.decode(run.family, sampling.few_step_sample(
      run.plan, run.experts_apply(), experts, z, y)[-1]))(state.experts, xi)
  net, _ = models.abstract_dit(cfg)
  plain = jax.jit(lambda p, z: sampling.few_step_sample(
      run.plan, net.apply, (p,) * run.plan.num_phases, noise.color(z, 0.6), y)[-1])(params, xi)
  np.testing.assert_allclose(few, plain, atol=1e-4)
  new, metrics = run.asm.jit_step(0)(state, run.teacher_params, trainer.batch_for_step(run, 0))
  chex.assert_tree_all_finite((new, metrics))
