"""Resume equals not stopping; half-written checkpoints are ignored; NaN stops the run."""

import os
import re
import shutil
import signal

import chex
import jax
import pytest

from pdmd_jax import checkpointing
from pdmd_jax import trainer


def _config(gmm_config):
  config = gmm_config("method=phased_dmd_sgts,steps=4,phases=2,runlocal")
  config.init_fit.steps = 20
  config.train.num_steps = 8
  config.train.ckpt_every = 2
  config.mesh.data = 1
  return config


def _saved_steps(workdir):
  ckdir = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())


@pytest.mark.long
def test_resume_is_bit_identical(gmm_config, tmp_path, monkeypatch):
  """Stop exactly at the phase boundary (step 4 of 2 x 4), resume, preempt with SIGTERM at 5
  (phase 2, frozen expert 0 read back from checkpoints_frozen), resume to 8: every leaf equals
  the uninterrupted run's, bit for bit.

  Catches: randomness that depends on history rather than (rng, step), optimizer state or the
  rng not saved/restored, dtype changes across a save/restore, a resume from the wrong step or
  in the wrong layout, and a phase start that differs from the uninterrupted run's.
  """
  config = _config(gmm_config)
  # Every recipe term the mixture family has (the GAN's resume: test_image_distill, slow).
  config.generator.ema_decay, config.generator.ema_start = 0.5, 1   # the EMA is state too
  config.generator.loss_reduction = "element_mean"
  config.anchor.weight, config.anchor.teacher_steps = 0.5, 2
  config.fake.ida_lambda = 0.97
  dev = jax.devices()[:1]
  a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
  keep = config.copy_and_resolve_references()
  keep.train.keep_finished_fakes = True      # the dropped fake is written for analysis
  trainer.train_and_evaluate(keep, a, devices=dev, final_eval=False, evaluate_phases=False,
                             verbose=False)
  assert sorted(os.listdir(os.path.join(a, "checkpoints_frozen"))) == ["ema_0", "expert_0",
                                                                       "fake_0"]
  out = trainer.train_and_evaluate(config, b, devices=dev, stop_at_step=4, final_eval=False,
                                   evaluate_phases=False, verbose=False)
  assert out == {"stopped_at_step": 4}
  # Preemption: SIGTERM arrives while update 5 (step 4 -> 5) is being dispatched; that update
  # finishes, is saved (5 is no regular checkpoint step) and the run returns naming it.
  batch_for_step = trainer.batch_for_step

  def sigterm_at_4(run, step, *a):
    if step == 4:
      signal.raise_signal(signal.SIGTERM)
    return batch_for_step(run, step, *a)

  monkeypatch.setattr(trainer, "batch_for_step", sigterm_at_4)
  handler = signal.getsignal(signal.SIGTERM)
  out = trainer.train_and_evaluate(config, b, devices=dev, final_eval=False,
                                   evaluate_phases=False, verbose=False)
  monkeypatch.setattr(trainer, "batch_for_step", batch_for_step)
  assert out == {"stopped_at_step": 5, "preempted": "SIGTERM"}
  assert signal.getsignal(signal.SIGTERM) is handler       # the run's handler is removed again
  assert _saved_steps(b) == [2, 4, 5]          # ckpt_every = 2, each phase end, the stops
  # Phase 1's checkpoints hold phase 1's trees; from the boundary on, only phase 2's (expert 0
  # is frozen and written once, outside the step directories).
  items = lambda s: sorted(n for n in os.listdir(os.path.join(b, "checkpoints", str(s)))
                           if os.path.isdir(os.path.join(b, "checkpoints", str(s), n)))
  assert items(2) == ["config", "ema_0", "expert_0", "expert_opt_0", "fake_0", "fake_opt_0",
                      "meta"]
  assert items(4) == ["config", "ema_1", "expert_1", "expert_opt_1", "fake_1", "fake_opt_1",
                      "meta"]
  frozen = os.path.join(b, "checkpoints_frozen", "expert_0")
  written = os.stat(frozen).st_mtime_ns
  trainer.train_and_evaluate(config, b, devices=dev, final_eval=False, evaluate_phases=False,
                             verbose=False)
  assert os.stat(frozen).st_mtime_ns == written       # a finished expert is written once
  (_, sa), (_, sb) = trainer.restore_latest(config, a, dev), trainer.restore_latest(config, b, dev)
  assert int(sa.step) == int(sb.step) == 8
  sa, sb = jax.device_get(sa), jax.device_get(sb)
  assert sa.fakes[0] is None and sa.expert_opt[0] is None    # the finished phase's are dropped
  # Every expert, fake score, optimizer state and the rng: same structure, shapes, dtypes, bits.
  chex.assert_trees_all_equal(sa, sb, strict=True)
  # Training did something (so the equality above is not that of two untouched initial states).
  init = jax.device_get(trainer.initial_state(trainer.build(config, None, devices=dev)))
  assert not bool((jax.tree.leaves(init.experts[0])[0] == jax.tree.leaves(sa.experts[0])[0]).all())

  # A save killed mid-write leaves orbax's temporary directory: it must be ignored.
  ckdir = os.path.join(b, "checkpoints")
  shutil.copytree(os.path.join(ckdir, "8"), os.path.join(ckdir, "10.orbax-checkpoint-tmp-1"))
  for item in ("expert_1", "fake_1", "ema_1"):
    shutil.rmtree(os.path.join(ckdir, "10.orbax-checkpoint-tmp-1", item))
  _, sc = trainer.restore_latest(config, b, dev)
  assert int(sc.step) == 8
  chex.assert_trees_all_equal(jax.device_get(sc), sb, strict=True)


def test_uneven_phase_budget_ends_phase_one_where_it_says(gmm_config, tmp_path):
  """train.phase_steps = (3, 5): phase 1 ends after update 3 (an even split would end it at
  4): expert 1 is written to checkpoints_frozen and step 3's checkpoint holds phase 2's trees;
  the resumed run goes on in phase 2. A checkpoint refuses another budget; one written before
  the field existed resumes the even split."""
  config = _config(gmm_config)
  config.train.phase_steps = (3, 5)
  dev, w = jax.devices()[:1], str(tmp_path / "uneven")
  out = trainer.train_and_evaluate(config, w, devices=dev, stop_at_step=3, final_eval=False,
                                   evaluate_phases=False, verbose=False)
  assert out == {"stopped_at_step": 3} and _saved_steps(w) == [2, 3]
  assert os.path.isdir(os.path.join(w, "checkpoints_frozen", "expert_0"))
  assert os.path.isdir(os.path.join(w, "checkpoints", "3", "expert_1"))
  assert not os.path.exists(os.path.join(w, "checkpoints", "3", "expert_0"))
  run = trainer.build(config, None, devices=dev)
  assert run.asm.phase_starts == (0, 3, 8)
  assert [run.phase_of(s) for s in range(9)] == [0, 0, 0, 1, 1, 1, 1, 1, 1]
  even = config.copy_and_resolve_references()
  even.train.phase_steps = ()
  with pytest.raises(ValueError, match=r"train.phase_steps=\[\] \(checkpoint: \[3, 5\]\)"):
    trainer.train_and_evaluate(even, w, devices=dev, final_eval=False, verbose=False)
  old = even.to_dict()
  del old["train"]["phase_steps"]
  checkpointing.check_resumable(old, even, w)      # written before the field: an even split
  out = trainer.train_and_evaluate(config, w, devices=dev, stop_at_step=5, final_eval=False,
                                   evaluate_phases=False, verbose=False)
  assert out == {"stopped_at_step": 5}
  _, state = trainer.restore_latest(config, w, dev)
  assert int(state.step) == 5 and state.fakes[0] is None and state.experts[1] is not None


def test_non_finite_stops_with_step_and_metric(gmm_config, tmp_path):
  """Two good updates (checkpoint at step 2), then a resume with lr = 1e37 blows up.

  The first huge update is step 2's (its own metrics are computed before the update, so they
  are finite); the overflowed expert makes step 3's losses non-finite. The run must raise
  naming step 3 and the metric, keep the step-2 checkpoint untouched, and save nothing after
  it (the save due at step 4 comes after the bad step). Catches: a save before the queued
  metrics are checked (a NaN checkpoint at step 4), a silent NaN run, an error without the step
  or metric, and (unlike a run that blows up at step 0) a vacuous "nothing was saved" pass.
  """
  config = _config(gmm_config)
  dev = jax.devices()[:1]
  w = str(tmp_path / "nan")
  out = trainer.train_and_evaluate(config, w, devices=dev, stop_at_step=2, final_eval=False,
                                   evaluate_phases=False, verbose=False)
  assert out == {"stopped_at_step": 2}
  assert _saved_steps(w) == [2]
  _, good = trainer.restore_latest(config, w, dev)
  good = jax.device_get(good)
  chex.assert_tree_all_finite(good)
  # A checkpoint resumes only the plan that wrote it: another one is refused before compiling,
  # naming each differing field, and nothing is written.
  other = config.copy_and_resolve_references()
  other.num_steps, other.train.num_steps = 2, 4
  with pytest.raises(ValueError, match=r"another run: num_steps=2 \(checkpoint: 4\), "
                                       r"train.num_steps=4 \(checkpoint: 8\)"):
    trainer.train_and_evaluate(other, w, devices=dev, verbose=False)
  assert _saved_steps(w) == [2]

  config.generator.lr = 1e37               # the first update after the resume overflows
  with pytest.raises(trainer.NonFiniteError, match=r"non-finite \w+=.* at step \d+") as err:
    trainer.train_and_evaluate(config, w, devices=dev, evaluate_phases=False, verbose=False)
  bad_step = int(re.search(r" at step (\d+)", str(err.value)).group(1))
  assert bad_step == 3, str(err.value)
  saved = _saved_steps(w)
  assert saved, "no checkpoint was written before the non-finite step"
  assert all(s <= bad_step for s in saved), (saved, bad_step)   # nothing saved after it
  assert saved == [2]
  _, state = trainer.restore_latest(config, w, dev)
  state = jax.device_get(state)
  assert int(state.step) == 2
  chex.assert_tree_all_finite(state.experts)
  chex.assert_tree_all_finite(state)
  chex.assert_trees_all_equal(state, good, strict=True)   # the last good checkpoint, untouched


def test_checkpoint_refuses_other_phase_sizes(gmm_config):
  """steps_per_phase moves the phase boundaries (which expert owns which grid step): a checkpoint
  of the (1, 3) plan does not resume the even split, nor (3, 1); a checkpoint written before the
  field existed is an even split."""
  config = gmm_config("method=phased_dmd_sgts,steps=4,phases=2,runlocal")
  config.steps_per_phase = (1, 3)
  saved = config.to_dict()
  checkpointing.check_resumable(saved, config, "w")
  for other in ((), (3, 1)):
    changed = config.copy_and_resolve_references()
    changed.steps_per_phase = other
    with pytest.raises(ValueError, match=re.escape(
        f"steps_per_phase={list(other)!r} (checkpoint: [1, 3])")):
      checkpointing.check_resumable(saved, changed, "w")
  even = config.copy_and_resolve_references()
  even.steps_per_phase = ()
  old = even.to_dict()
  del old["steps_per_phase"]
  checkpointing.check_resumable(old, even, "w")
