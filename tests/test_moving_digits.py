"""Tests of pdmd_jax.data.moving_digits on font-rendered stand-in digits (no MNIST download)."""

import sys
import types

import numpy as np
import pytest

from pdmd_jax.data import moving_digits as md

DIGITS, LABELS = md.glyph_digits(100, seed=0)


def _src(**kw):
  return md.MovingDigitsSource(DIGITS, LABELS, num_clips=1000, seed=3, **kw)


@pytest.mark.parametrize("size,frames", [(32, 16), (48, 8)])
def test_shapes_range_and_labels(size, frames):
  src = _src(size=size, num_frames=frames)
  for i in range(20):
    c = src.clip(i)
    assert c["video"].shape == (frames, size, size, 1) and c["video"].dtype == np.float32
    assert c["video"].min() >= -1.0 and c["video"].max() <= 1.0
    assert c["video"].min() == -1.0 and c["video"].max() > 0.5  # background and ink
    assert c["num_digits"] in (1, 2) and len(c["classes"]) == c["num_digits"]
    assert c["label"] == c["classes"][0] and 0 <= c["label"] < md.NUM_CLASSES
  b = src.batch(range(4))
  assert b["video"].shape == (4, frames, size, size, 1)
  assert b["label"].dtype == np.int32 and b["speed"].dtype == np.float32


def test_speed_mixture():
  speeds = np.array([_src().clip(i)["speed"] for i in range(300)])
  static = speeds == 0
  assert 0.13 < static.mean() < 0.27
  assert speeds[~static].min() >= 0.5 and speeds[~static].max() <= 3.0
  assert speeds[~static].max() > 2.5 and speeds[~static].min() < 1.0


def test_deterministic_random_access():
  a, b = _src(), _src()
  first = [a[i]["video"] for i in (5, 1, 7)]
  np.testing.assert_array_equal(b[7]["video"], first[2])  # order of access is irrelevant
  np.testing.assert_array_equal(b[5]["video"], first[0])
  np.testing.assert_array_equal(a[1005]["video"], first[0])  # indices wrap
  assert not np.array_equal(first[0], first[1])
  other = md.MovingDigitsSource(DIGITS, LABELS, num_clips=1000, seed=4)
  assert not np.array_equal(other[5]["video"], first[0])


def test_static_clips_have_identical_frames():
  for i in range(5):
    v = _src().clip(i, speed=0.0)["video"]
    assert np.array_equal(v, np.broadcast_to(v[:1], v.shape))


def test_bouncing_keeps_digit_in_canvas():
  src = _src(min_digits=1, max_digits=1, num_frames=16)
  for i in range(10):
    c = src.clip(i, speed=3.0)
    ink = (c["video"][..., 0] + 1) / 2
    mass = ink.sum(axis=(1, 2))
    np.testing.assert_allclose(mass, mass[0], rtol=1e-4)  # nothing crosses the border
    assert c["pos"].min() >= 0 and c["pos"].max() <= 32 - 16
    steps = np.linalg.norm(np.diff(c["pos"], axis=0), axis=-1)[:, 0]
    assert (steps < 3.0 - 1e-3).any()  # at 3 px/frame over 16 frames it must bounce


@pytest.mark.parametrize("speed", [0.7, 1.0, 2.3])
def test_centroid_displacement_matches_speed(speed):
  src = _src(min_digits=1, max_digits=1)
  for i in range(5):
    c = src.clip(i, speed=speed)
    ink = (c["video"][..., 0] + 1) / 2
    yy, xx = np.mgrid[:32, :32]
    cen = np.stack([(ink * yy).sum((1, 2)), (ink * xx).sum((1, 2))], -1) / ink.sum((1, 2))[:, None]
    d_cen = np.diff(cen, axis=0)
    # Bilinear sub-pixel rendering moves the centroid exactly with the sprite position.
    np.testing.assert_allclose(d_cen, np.diff(c["pos"][:, 0], axis=0), atol=1e-3)
    # Away from bounces every step is exactly `speed` px long; bounces only shorten steps.
    step = np.linalg.norm(d_cen, axis=-1)
    # A reflection flips a velocity component; a bounce step has a shorter component.
    free = np.all(np.abs(np.abs(np.diff(c["pos"][:, 0], axis=0)) - np.abs(c["vel"][0])) < 1e-4,
                  axis=-1)
    assert free.mean() >= 0.5
    np.testing.assert_allclose(step[free], speed, atol=1e-3)
    assert step.max() <= speed + 1e-3


def test_sprite_layouts():
  sp = md.to_sprites(DIGITS)
  assert sp.shape == (100, 28, 28) and sp.min() == 0.0 and sp.max() == 1.0
  np.testing.assert_allclose(md.to_sprites(np.rint(sp * 255).astype(np.uint8)), sp, atol=3e-3)
  np.testing.assert_allclose(md.to_sprites(sp[..., None]), sp)


def test_grain_source():
  grain = pytest.importorskip("grain")
  src = _src()
  ds = grain.MapDataset.source(src)
  assert len(ds) == 1000 and ds[3]["speed"] == src[3]["speed"]
  batch = ds.batch(4)[0]
  assert batch["video"].shape == (4, 16, 32, 32, 1) and batch["label"].shape == (4,)


def test_mnist_source_splits(monkeypatch):
  import pdmd_jax.data  # pylint: disable=import-outside-toplevel
  train, test = md.glyph_digits(50, seed=1), md.glyph_digits(50, seed=2)
  fake = types.SimpleNamespace(load=lambda split: {"train": train, "heldout": test}[split])
  monkeypatch.setitem(sys.modules, "pdmd_jax.data.mnist", fake)
  monkeypatch.setattr(pdmd_jax.data, "mnist", fake, raising=False)
  tr, ev = md.mnist_source("train", 10, seed=0), md.mnist_source("heldout", 10, seed=0)
  np.testing.assert_array_equal(tr.sprites, md.to_sprites(train[0]))
  np.testing.assert_array_equal(ev.sprites, md.to_sprites(test[0]))
  assert not np.array_equal(tr[0]["video"], ev[0]["video"])
