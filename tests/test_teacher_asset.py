"""The shipped MNIST teacher: loads, matches its card, and reproduces its recorded metrics."""

import json
import os

import jax
import pytest

from pdmd_jax import assets
from pdmd_jax import configs
from pdmd_jax import teacher_training

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(assets.path("mnist_teacher"), "card.json")),
    reason="the shipped teacher asset is missing")


@pytest.mark.xla_optimized     # 500 guided 8-step samples: execution-bound
def test_teacher_loads_and_reproduces_its_check_metrics():
  cfg, net, params, card = teacher_training.load_teacher()
  assert sum(p.size for p in jax.tree.leaves(params)) == card["num_params"]
  got = teacher_training.check_metrics(net.apply, params, cfg)
  want = card["check"]["metrics"]
  assert got["accuracy"] == pytest.approx(want["accuracy"], abs=0.02)
  for k in ("fd_real", "feature_cosine", "pixel_l2"):
    assert got[k] == pytest.approx(want[k], rel=0.02), k
  # A teacher worth distilling, recomputed here (not read from the card): its guided 8-step
  # samples are read as their class by the shipped classifier.
  assert got["accuracy"] >= 0.9


def test_card_was_evaluated_with_the_distillation_cfg():
  """The card's metrics describe the teacher as configs/mnist.py uses it (the same CFG)."""
  card = assets.load_card(assets.path("mnist_teacher"))
  cfg = configs.load("configs/mnist.py").teacher.guidance_scale
  assert card["eval"]["guidance_scale"] == card["check"]["guidance_scale"] == cfg


def test_missing_or_mismatched_teacher_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="mnist_teacher.py"):
    teacher_training.load_teacher(str(tmp_path))
  _, _, params, card = teacher_training.load_teacher()
  bad = dict(params)
  bad.pop("embed")
  assets.save(str(tmp_path), bad, card)
  with pytest.raises(ValueError, match="missing embed.kernel"):
    teacher_training.load_teacher(str(tmp_path))


def test_training_budget_is_validated_before_anything_runs(tmp_path):
  c = configs.load("configs/mnist_teacher.py:runlocal")
  c.train.num_steps, c.train.warmup_steps = 5, 5
  with pytest.raises(ValueError, match=r"train.num_steps=5 / train.warmup_steps=5.*num_steps=0"):
    teacher_training.train_teacher(c, str(tmp_path / "work"), verbose=False)
  assert not (tmp_path / "work").exists()


def test_fingerprint_names_the_card(tmp_path):
  """Experiment caches key on the card's fingerprint: equal cards agree, any change differs."""
  params = {"w": jax.numpy.ones((2,))}
  for name, card in (("a", {"metrics": {"fd": 1.0}, "steps": 5}),
                     ("b", {"steps": 5, "metrics": {"fd": 1.0}}),
                     ("c", {"metrics": {"fd": 1.5}, "steps": 5})):
    assets.save(str(tmp_path / name), params, card)
  fp = {n: assets.fingerprint(str(tmp_path / n)) for n in "abc"}
  assert fp["a"] == fp["b"] != fp["c"] and len(fp["a"]) == 8


def test_cards_record_repository_paths_relative():
  """A card names a shipped asset by its repository path, never by this machine's checkout."""
  assert assets.portable(assets.path("mnist_teacher")) == os.path.join("assets", "mnist_teacher")
  assert assets.portable("/elsewhere/teacher") == "/elsewhere/teacher"
  assert assets.portable("") == ""


def test_a_retrained_teacher_keeps_the_one_it_replaced_in_its_card(tmp_path):
  """Training into the directory of an earlier teacher makes the next version, with the earlier
  one's run and metrics under "previous"; resuming or re-evaluating the same run does not."""
  c = configs.load("configs/mnist_teacher.py:runlocal")
  c.out_dir = str(tmp_path / "teacher")
  first = teacher_training.train_teacher(c, str(tmp_path / "w1"), verbose=False)
  assert first["version"] == 1 and "previous" not in first
  again = teacher_training.train_teacher(c, str(tmp_path / "w1"), verbose=False)  # resumed: done
  assert again["version"] == 1 and "previous" not in again
  # the wall time is the run's, summed over sessions: resuming at the last step adds nothing
  assert again["train_wall_time_s"] == first["train_wall_time_s"] > 0
  c.seed = 1
  second = teacher_training.train_teacher(c, str(tmp_path / "w2"), verbose=False)
  assert second["version"] == 2 and second["previous"]["version"] == 1
  assert second["previous"]["metrics"] == first["metrics"]
  assert second["previous"]["train"] == first["train"]
  assert assets.load_card(c.out_dir) == json.loads(json.dumps(second, default=float))
  # A third run (other settings) nests the whole history; lineage() is what train_teacher
  # calls on the card it is about to write.
  third = teacher_training.lineage(c.out_dir, {**second, "train": {**second["train"], "lr": 2.0}})
  assert third["version"] == 3 and third["previous"]["version"] == 2
  assert third["previous"]["previous"]["metrics"] == first["metrics"]
