"""Skip guidance (experiments/skip_guidance.py): dit.temporal_skipped and the STG teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdmd_jax import models
from pdmd_jax import teachers
from pdmd_jax.families import common
from pdmd_jax.models import dit


def _video_dit():
  """(config, jitted apply, perturbed params) of a tiny divided-layout video DiT."""
  cfg = dit.config_for("tiny", frames=4, layout="divided")
  net, p = models.build_dit(cfg)
  return cfg, jax.jit(net.apply), common.perturbed(p, seed=3)


def test_temporal_skip_denoises_each_frame_alone():
  """With the temporal branches off, a change in one frame's input reaches no other frame."""
  cfg, apply, p = _video_dit()
  x = jax.random.normal(jax.random.PRNGKey(0), (1,) + cfg.sample_shape)
  t, y = jnp.array([0.7]), jnp.array([3])
  x2 = x.at[:, 1].add(1.0)
  for params, others_move in ((p, True), (dit.temporal_skipped(p), False)):
    d = jnp.abs(apply(params, x2, t, y) - apply(params, x, t, y)).max(axis=(0, 2, 3, 4))
    assert float(d[1]) > 1e-3
    assert (float(jnp.delete(d, 1).max()) > 1e-3) == others_move
  image_cfg = dit.config_for("tiny")
  with pytest.raises(ValueError, match="layout='divided'"):
    dit.temporal_skipped(models.build_dit(image_cfg)[1])


def test_stg_velocity():
  """w = 0 is the CFG teacher; w applies only inside the interval, as w (v_c - v_c^skip)."""
  cfg, apply, p = _video_dit()
  both = (p, dit.temporal_skipped(p))
  x = jax.random.normal(jax.random.PRNGKey(1), (2,) + cfg.sample_shape)
  t, y = jnp.array([0.9, 0.3]), jnp.array([1, 4])
  cfg_teacher = teachers.network_teacher(apply, cfg.num_classes, 3.0)
  want = cfg_teacher.velocity(p, x, t, y)
  plain = teachers.skip_guidance_teacher(apply, cfg.num_classes, 3.0, 0.0, (0.0, 1.0))
  np.testing.assert_allclose(plain.velocity(both, x, t, y), want, atol=1e-5)
  stg = teachers.skip_guidance_teacher(apply, cfg.num_classes, 3.0, 2.0, (0.6, 1.0))
  got = stg.velocity(both, x, t, y)
  push = 2.0 * (apply(p, x, t, y) - apply(both[1], x, t, y))
  np.testing.assert_allclose(got[0], want[0] + push[0], atol=1e-5)   # t = 0.9: inside
  np.testing.assert_allclose(got[1], want[1], atol=1e-5)             # t = 0.3: outside
  assert float(jnp.abs(push[0]).max()) > 1e-3
