"""Configs: every variant validates; bad input fails with the field named, before compiling."""

import os

import pytest

from pdmd_jax import validation
from pdmd_jax import trainer


@pytest.mark.parametrize("variant", [
    "", "runlocal", "method=dmd", "method=dmd_multistep,steps=4", "method=dmd2_sgts,steps=4",
    "method=phased_dmd,steps=4", "method=phased_dmd_sgts,steps=4,phases=2",
    "method=phased_dmd_multistep,steps=4,phases=2", "dim=16",
    "method=phased_dmd_sgts,steps=4,phases=2,dim=16,runlocal"])
def test_variants_validate(gmm_config, variant):
  config = gmm_config(variant)
  plan = validation.validate(config)
  assert plan.num_steps == config.num_steps and plan.num_phases == config.num_phases


def test_unknown_variant_is_rejected(gmm_config):
  with pytest.raises(ValueError, match="variant 'stepz'.*allowed"):
    gmm_config("stepz=4")


BAD = [
    ({"grid_times": (1.0, 0.5, 0.7, 0.2, 0.0)}, "grid_times.*strictly decreasing"),
    ({"grid_times": (1.0, 0.9, 1.2, 0.5, 0.0)}, "grid_times.*inside the open interval"),
    ({"grid_times": (1.0, 0.9, 0.5, 0.0)}, "grid_times.*5 values"),
    ({"num_phases": 3}, "num_phases.*num_steps=4"),
    ({"method": "phased_dmd_sgts", "num_phases": 3}, "num_phases=3.*divisor of num_steps=4.*\\[1, 2, 4\\]"),
    ({"method": "phased_dmd_sgts", "num_phases": 2, "steps_per_phase": (2, 1)},
     "steps_per_phase=\\(2, 1\\).*2 integers >= 1 summing to num_steps=4"),
    ({"method": "phased_dmd_sgts", "num_phases": 2, "steps_per_phase": (4,)},
     "steps_per_phase=\\(4,\\).*num_phases=2 integers"),
    ({"fake.ttur": 0}, "fake.ttur=0.*integer >= 1"),
    ({"method": "sid"}, "method='sid'.*allowed.*phased_dmd"),
    ({"teacher.type": "qwen"}, "teacher.type='qwen'.*allowed.*gmm"),
    ({"teacher.type": "wan"}, "teacher.type='wan'.*allowed.*'wan22'"),
    ({"teacher.type": "wan22"}, "teacher.type='wan22'.*every field of configs/wan22.py"),
    ({"mesh.tensor": 2}, "mesh=.*tensor = context = 1 for the mixture teacher"),
    ({"teacher.dim": 3}, "teacher.dim=3.*\\[2\\] for dataset 'ring'"),
    ({"teacher.dataset": "moons"}, "teacher.dataset='moons'.*ring"),
    ({"generator.weighting": "l2"}, "generator.weighting.*exact"),
    ({"fake.target": "x0"}, "fake.target.*eq13"),
    ({"phase_order": "random"}, "phase_order.*progressive"),
    ({"t_sampler.floor_mode": "wrap"}, "floor_mode.*clamp"),
    ({"train.num_steps": 10}, "train.num_steps=10.*multiple of num_phases=4"),
    ({"train.phase_steps": (4, 4)}, "train.phase_steps=\\(4, 4\\).*4 integers >= 1.*summing to "
     "train.num_steps=8"),
    ({"train.phase_steps": (2, 2, 2, 1)}, "train.phase_steps.*summing to train.num_steps=8"),
    ({"train.phase_steps": (2, 2, 2, 2), "phase_order": "interleaved"},
     "train.phase_steps.*\\(\\) with phase_order='interleaved'"),
    ({"generator.lr": -1.0}, "generator.lr=-1.0.*> 0"),
    ({"generator.b1": 1.0}, "generator.b1.*\\[0, 1\\)"),
    ({"shift": 0.0}, "shift=0.0.*> 0"),
    ({"anchor.weight": -1.0}, "anchor.weight=-1.0.*>= 0"),
    ({"anchor.weight": 0.5, "anchor.step": 1}, "anchor.step=1.*\\[0\\]"),
    ({"anchor.weight": 0.5, "anchor.phase": 4}, "anchor.phase=4.*\\[0, 1, 2, 3\\]"),
    ({"anchor.weight": 0.5, "anchor.distance": "features"}, "anchor.distance.*no feature map"),
    ({"anchor.distance": "lpips"}, "anchor.distance='lpips'.*mse"),
    ({"anchor.weight": 0.5, "method": "dmd_multistep", "num_phases": 1},
     "method='dmd_multistep'.*anchor.weight > 0"),
    ({"fake.ida_lambda": 0.0}, "fake.ida_lambda=0.0.*\\(0, 1\\]"),
    ({"gan.enabled": True}, "gan.enabled=True.*False for this teacher family"),
    ({"gan.source": "student"}, "gan.source='student'.*fake"),
    ({"gan.disc_weight": 0.0}, "gan.disc_weight=0.0.*> 0"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_input_names_field(gmm_config, overrides, message, tmp_path):
  config = gmm_config("runlocal")
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError, match=message):
    validation.validate(config)
  # The trainer validates first: nothing is fitted, compiled or written.
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path / "w"), verbose=False)
  assert not os.path.exists(tmp_path / "w" / "teacher_fit.msgpack")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_batch_must_divide_over_mesh(gmm_config):
  config = gmm_config("runlocal")
  config.train.batch_size = 60
  config.mesh.data, config.mesh.fsdp = 2, 4
  with pytest.raises(ValueError, match="train.batch_size=60.*multiple of data x fsdp = 8"):
    validation.mesh_sizes(config, 8)


def test_ida_refuses_lora_fakes():
  """IDA mixes full parameters: a shared-backbone LoRA fake cannot hold the mix (rank 2r)."""
  from pdmd_jax import configs  # pylint: disable=import-outside-toplevel
  config = configs.load("configs/mnist.py:runlocal")
  config.fake.lora_rank, config.fake.ida_lambda = 4, 0.97
  with pytest.raises(ValueError, match="fake.ida_lambda=0.97.*LoRA fakes"):
    validation.validate(config)
