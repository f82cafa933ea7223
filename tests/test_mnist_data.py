"""Tests of pdmd_jax.data.mnist: the offline MNIST subset, its split and its grain iterator."""

import numpy as np
import pytest

from pdmd_jax.data import mnist


def test_shapes_range_and_padding():
  for split, n in (("train", 4500), ("heldout", 500)):
    x, y = mnist.load(split)
    assert x.shape == (n, 32, 32, 1) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    assert x.min() == -1.0 and x.max() == 1.0
    border = np.ones((32, 32), bool)
    border[2:-2, 2:-2] = False
    np.testing.assert_array_equal(x[:, border], -1.0)  # the 2-px padding is background
    assert mnist.unpad(x).shape == (n, 28, 28, 1)
  assert mnist.load("train")[0] is mnist.load("train")[0]  # cached in-process


def test_pixels_are_exact():
  pixels, labels = mnist._load_all()
  idx = mnist.split_indices("heldout")
  x, y = mnist.load("heldout")
  np.testing.assert_array_equal(np.rint((mnist.unpad(x)[..., 0] + 1.0) * 127.5), pixels[idx])
  np.testing.assert_array_equal(y, labels[idx])


def test_split_is_stratified_disjoint_and_deterministic():
  train, held = mnist.split_indices("train"), mnist.split_indices("heldout")
  assert len(train) == 4500 and len(held) == 500
  assert not np.intersect1d(train, held).size
  np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(5000))
  np.testing.assert_array_equal(np.bincount(mnist.load("train")[1]), np.full(10, 450))
  np.testing.assert_array_equal(np.bincount(mnist.load("heldout")[1]), np.full(10, 50))
  np.testing.assert_array_equal(held, mnist.split_indices("heldout"))  # recomputed: same
  with pytest.raises(ValueError, match="allowed"):
    mnist.split_indices("test")


def test_iterator_batches_and_resumes_exactly():
  it = mnist.make_iterator("train", 32, seed=3)
  first = next(it)
  assert first["image"].shape == (32, 32, 32, 1) and first["label"].shape == (32,)
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = mnist.make_iterator("train", 32, seed=3)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  other = next(mnist.make_iterator("train", 32, seed=4))
  assert not np.array_equal(other["label"], first["label"])


def test_shards_partition_an_epoch():
  x, _ = mnist.load("train")
  probe = np.random.default_rng(0).normal(size=32 * 32)
  fingerprint = lambda a: np.sort(a.reshape(len(a), -1) @ probe)
  shards = [next(mnist.make_iterator("train", 2250, seed=0, shard_index=i, num_shards=2))
            for i in range(2)]
  np.testing.assert_allclose(fingerprint(np.concatenate([s["image"] for s in shards])),
                             fingerprint(x), rtol=1e-6, atol=1e-6)
