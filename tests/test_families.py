"""The family contract: every family builds abstractly and concretely through one function.

``assembly.build(config, abstract=...)`` is what the trainer (concrete) and the AOT planner
(abstract) call. For every family the two must give the same trees (structure, shapes,
dtypes), axes that cover every parameter, and a conditioning sampler of the run's batch shape;
and the registry must find each family from its config alone.
"""

import glob
import importlib
import os

import chex
import jax
import numpy as np
import pytest

from pdmd_jax import assembly
from pdmd_jax import configs
from pdmd_jax import families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"gmm": "configs/gmm.py:runlocal", "dit": "configs/mnist.py:runlocal",
           "wan22": "configs/wan22.py:tiny", "qwen_image": "configs/qwen_image.py:tiny"}


def test_every_family_package_has_a_config():
  assert set(families.names()) == set(CONFIGS)
  types = set()
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
    c = configs.load(path)
    if "teacher" in c and "type" in c.teacher:
      types.add(c.teacher.type)
  assert types == set(families.names())
  with pytest.raises(ValueError, match=r"teacher.type='qwen'.*allowed: \['dit', 'gmm', "
                                       r"'qwen_image', 'wan22'\]"):
    families.get("qwen")


def _is_abstract(tree):
  return all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _is_concrete(tree):
  return all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_abstract_and_concrete_builds_agree(name):
  c = configs.load(CONFIGS[name])
  c.mesh.data, c.mesh.fsdp = 1, 1
  dev = jax.devices()[:1]
  abstract = assembly.build(c, devices=dev, abstract=True)
  concrete = assembly.build(c, devices=dev)
  a, k = abstract.family, concrete.family
  assert a.name == k.name == name
  for field in ("teacher_params", "fake_init", "expert_init"):
    ta, tk = getattr(a, field), getattr(k, field)
    assert _is_abstract(ta), field
    assert _is_concrete(tk), field
    chex.assert_trees_all_equal_structs(ta, tk)
    chex.assert_trees_all_equal_shapes_and_dtypes(ta, jax.tree.map(np.asarray, tk))
  # Axes cover every parameter (or are None: the rule-free FSDP tactic).
  for params, axes in ((k.teacher_params, k.teacher_axes), (k.fake_init, k.fake_axes),
                       (k.expert_init, k.expert_axes)):
    if axes is not None:
      names = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple) and all(
          n is None or isinstance(n, str) for n in x))
      for leaf, n in zip(jax.tree.leaves(params), names, strict=True):
        assert len(n) == leaf.ndim
  # The same step config and shardings either way; the state's tree follows its shardings.
  assert abstract.step_cfg.sample_shape == concrete.step_cfg.sample_shape == tuple(k.sample_shape)
  for phase in range(abstract.plan.num_phases):
    chex.assert_trees_all_equal_structs(abstract.abstract_state(phase),
                                        concrete.state_shardings[phase])
  assert jax.tree.map(lambda s: s.spec, abstract.state_shardings) == \
      jax.tree.map(lambda s: s.spec, concrete.state_shardings)
  # Conditioning of the batch's shape, a function of (seed, step) only.
  batch = concrete.batch_fn()(3)
  rows, b = concrete.batch_shape
  for leaf in jax.tree.leaves(batch["y"]):
    assert leaf.shape[:2] == (rows, b)
  chex.assert_trees_all_equal(batch, concrete.batch_fn()(3))
  chex.assert_trees_all_equal_structs(batch, abstract.abstract_batch())
  evaluator = importlib.import_module(f"pdmd_jax.evaluation.{k.evaluator}")
  assert callable(evaluator.evaluate)


def test_abstract_build_reads_no_weight_file(tmp_path):
  """Planning Wan2.2 A14B needs neither weights nor embeddings: the published architecture."""
  c = configs.load("configs/wan22.py")
  c.teacher.path, c.data.embeddings = str(tmp_path / "none"), str(tmp_path / "none.safetensors")
  c.model.num_layers = 1
  c.train.batch_size = 1
  asm = assembly.build(c, devices=jax.devices()[:1], abstract=True)
  cfg = asm.family.extras["wan_config"]
  assert (cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers) == (5120, 1)
  assert asm.family.sample_shape == (16, 21, 60, 104)      # 81 frames at 480 x 832
  y = asm.abstract_batch()["y"]
  assert y["context"].shape == (6, 1, 512, 4096) and y["context"].dtype == np.dtype("bfloat16")
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    assembly.build(c, devices=jax.devices()[:1])           # the trainer needs the files
