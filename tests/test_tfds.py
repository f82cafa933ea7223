"""tensorflow-datasets as a data source (data.source = "tfds:NAME"), without TensorFlow.

The test builds a tiny dataset the way tfds' ``mnist`` is laid out (``image``: Image (28, 28, 1)
PNG, ``label``: ClassLabel(10)) from 64 of the offline digits, in the ArrayRecord format that
``tfds.data_source`` reads. Building needs no TensorFlow either: the PNGs are encoded with OpenCV
and handed to tfds as bytes (tfds encodes numpy images with TensorFlow, bytes it stores as they
are), so the ``tfds`` extra (tensorflow-datasets, array_record) is all a user installs.
"""

import os

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds    # the test extra installs it: a missing install fails

from pdmd_jax import configs
from pdmd_jax import teacher_training
from pdmd_jax import validation
from pdmd_jax.data import mnist
from pdmd_jax.data import tfds_data

NAME = "pdmd_test_digits"
NUM = 64


class PdmdTestDigits(tfds.core.GeneratorBasedBuilder):
  """64 offline MNIST digits in tfds mnist's layout."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(28, 28, 1)),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    pixels, labels = _digits()
    for i in range(NUM):
      ok, png = cv2.imencode(".png", pixels[i])
      assert ok
      yield i, {"image": png.tobytes(), "label": int(labels[i])}


def _digits():
  pixels, labels = mnist._load_all()  # pylint: disable=protected-access
  idx = np.arange(NUM) * 70         # every class
  return pixels[idx], labels[idx]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  PdmdTestDigits(data_dir=d, file_format="array_record").download_and_prepare()
  return d


def test_records_are_the_digits_padded_like_the_offline_ones(tfds_dir):
  """Every record decodes to its digit (PNG is lossless) scaled to [-1, 1] and padded 28 -> 32
  with the background -1, exactly as pdmd_jax.data.mnist pads; batches are a seeded per-epoch
  shuffle, a function of (seed, i)."""
  src = {"source": f"tfds:{NAME}", "tfds_dir": tfds_dir}
  tfds_data.check(src["source"], tfds_dir, "train")
  ds = tfds_data.dataset(src, "train", 16, seed=3, size=32)
  pixels, labels = _digits()
  want = np.pad(pixels.astype(np.float32) / 127.5 - 1.0, ((0, 0), (2, 2), (2, 2)),
                constant_values=-1.0)[..., None]
  seen = []
  for i in range(4):                        # one epoch: 64 records
    b = ds[i]
    assert b["image"].shape == (16, 32, 32, 1) and b["image"].dtype == np.float32
    for x, y in zip(b["image"], b["label"]):
      j = int(np.flatnonzero((want == x).all(axis=(1, 2, 3)))[0])
      assert labels[j] == y
      seen.append(j)
  assert sorted(seen) == list(range(NUM))
  again = tfds_data.dataset(src, "train", 16, seed=3, size=32)
  np.testing.assert_array_equal(again[5]["image"], ds[5]["image"])


def test_bad_sources_are_named_before_anything_is_written(tfds_dir, tmp_path):
  cases = [
      (f"tfds:{NAME}", str(tmp_path / "empty"), "train", r"not prepared under config.data."
       r"tfds_dir=.*tfds build pdmd_test_digits"),
      ("tfds:", tfds_dir, "train", r"config.data.source='tfds:': expected 'tfds:NAME'"),
      (f"tfds:{NAME}", "", "train", r"config.data.tfds_dir='': expected the --data_dir"),
      (f"tfds:{NAME}", tfds_dir, "test", r"config.data.split='test'.*\['train'\]"),
      (f"tfds:{NAME}:9.9.9", tfds_dir, "train", r"no prepared dataset of that name/version"),
  ]
  for source, d, split, msg in cases:
    with pytest.raises(ValueError, match=msg):
      tfds_data.check(source, d, split)
  tc = configs.load("configs/mnist_teacher.py:runlocal")
  tc.data.source, tc.data.tfds_dir = "tfds:not_there", tfds_dir
  tc.out_dir = str(tmp_path / "out")
  with pytest.raises(ValueError, match=r"config.data.source='tfds:not_there': not prepared"):
    teacher_training.train_teacher(tc, str(tmp_path / "work"), verbose=False)
  tc.data.source = "cifar10"
  with pytest.raises(ValueError, match=r"config.data.source='cifar10': expected 'mnist'"):
    teacher_training.train_teacher(tc, str(tmp_path / "work"), verbose=False)
  assert not os.path.exists(tmp_path / "work") and not os.path.exists(tc.out_dir)
  c = configs.load("configs/mnist.py")        # the GAN's real data
  c.gan.enabled, c.gan.data_source, c.gan.tfds_dir = True, "tfds:not_there", tfds_dir
  with pytest.raises(ValueError, match=r"config.gan.data_source='tfds:not_there'"):
    validation.validate(c)
  c.gan.data_source = "digits"
  with pytest.raises(ValueError, match=r"gan.data_source.*'tfds:NAME'"):
    validation.validate(c)


def test_teacher_trains_from_the_tfds_dataset(tfds_dir, tmp_path):
  """configs/mnist_teacher.py:runlocal reads its batches from the tfds dataset (the card names
  it) and resumes its data position from the checkpoint."""
  tc = configs.load("configs/mnist_teacher.py:runlocal")
  tc.data.source, tc.data.tfds_dir = f"tfds:{NAME}", tfds_dir
  tc.out_dir = str(tmp_path / "out")
  tc.train.num_steps, tc.eval.num_samples, tc.eval.steps = 2, 10, 2
  card = teacher_training.train_teacher(tc, str(tmp_path / "work"), verbose=False)
  assert card["source"]["source"] == f"tfds:{NAME}" and card["steps"] == tc.train.num_steps
  assert NAME in card["dataset"] and np.isfinite(card["metrics"]["fd_real"])
  # The iterator's state saved with the teacher's checkpoint resumes the same stream.
  cfg = teacher_training.dit_config(tc.model)
  it, key = teacher_training.make_iterator(tc, cfg)
  first = [next(it)[key] for _ in range(3)]
  again, _ = teacher_training.make_iterator(tc, cfg)
  next(again)
  state = again.get_state()
  resumed, _ = teacher_training.make_iterator(tc, cfg)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)[key], first[1])
