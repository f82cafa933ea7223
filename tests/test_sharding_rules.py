"""Logical-axis sharding rules, and the trainer's DiT phase step on 8 simulated devices.

The step: phased_dmd_sgts (4 steps, 2 phases; phase 2, so the frozen phase-1 prefix and the
SGTS stop both run), LoRA experts on a random DiT teacher (CFG 3), full-copy fake scores,
TTUR 1, assembled by ``assembly.build`` exactly as the trainer does (the models constrain their
batch and token activations under the mesh). On every mesh it must give the single-device state
to |a - b| <= 1e-5 + 1e-4 |b|: batch reductions are split across devices, so float sums differ
in the last bits, and Adam with beta1 = 0 divides by sqrt(v), which magnifies that for
near-zero gradient entries.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pdmd_jax import assembly
from pdmd_jax import models
from pdmd_jax import sharding as sh
from pdmd_jax.families import dit as dit_family
from pdmd_jax.models import dit

MESHES = {"data2_fsdp4": {"data": 2, "fsdp": 4}, "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
          "data2_context4": {"data": 2, "context": 4}}
# Small enough to compile quickly: 8x8 images, 4 tokens, width 16 (divisible by 8), one block.
CFG = dit.config_for("tiny", image_size=8, patch=4, hidden=16, depth=1, heads=2, time_dim=32)
B = 8
PHASE = 1


def _asm(mesh_sizes=None, abstract=False):
  sizes = {"data": 1, "fsdp": 1, "tensor": 1, "context": 1, **(mesh_sizes or {})}
  n = int(np.prod(list(sizes.values())))
  c = dit_family.random_config(CFG, "runlocal", {
      "fake.ttur": 1, "train.batch_size": B, "generator.lora_rank": 4,
      "generator.lora_alpha": 4.0, **{f"mesh.{k}": v for k, v in sizes.items()}})
  return assembly.build(c, devices=jax.devices()[:n], abstract=abstract)


def _two_steps(asm, state, teacher, batch):
  step = asm.lower(PHASE, state, teacher, batch).compile()   # the trainer's program
  for _ in range(2):
    state, metrics = step(state, teacher, batch)
  return state, metrics


@pytest.fixture(scope="module")
def reference():
  asm = _asm()
  state0 = jax.device_get(asm.initial_state(PHASE))
  teacher, batch = jax.device_get(asm.teacher_params()), jax.device_get(asm.batch_fn()(0))
  out = _two_steps(asm, asm.initial_state(PHASE), asm.teacher_params(), asm.batch_fn()(0))
  return state0, teacher, batch, jax.device_get(out)


def _specs(tree):
  return jax.tree.map(lambda x: x.sharding.spec, tree)


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_matches_single_device(reference, name):
  state0, teacher_params, batch, (s_ref, m_ref) = reference
  asm = _asm(MESHES[name], abstract=True)
  state_sh, teacher_sh, batch_sh = asm.state_shardings[PHASE], asm.teacher_sharding, asm.batch_sharding
  state = jax.device_put(state0, state_sh)
  teacher = jax.device_put(teacher_params, teacher_sh)
  # Lowered under the mesh (Assembly.lower), the models' batch and per-block token constraints
  # are live (without one they are the identity).
  state, metrics = _two_steps(asm, state, teacher, jax.device_put(batch, batch_sh))
  # Outputs keep the rule shardings (out_shardings = in_shardings; the state is donated).
  for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
    assert leaf.sharding.is_equivalent_to(s, leaf.ndim)
  state, metrics = jax.device_get((state, metrics))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for k in ("fake_loss", "fake_grad_norm", "gen_surrogate", "gen_grad_norm", "dmd_grad_norm"):
    np.testing.assert_allclose(metrics[k], m_ref[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert int(metrics["stop_index"]) == int(m_ref["stop_index"])
  assert not np.allclose(state.experts[PHASE]["blocks.0.qkv.kernel"]["b"], 0.0)   # it trained


def test_every_parameter_follows_the_rules():
  """Every fake/teacher leaf gets logical_spec(axes); named leaves on (fsdp 4 x tensor 2)."""
  asm = _asm(MESHES["fsdp4_tensor2"], abstract=True)
  mesh, state_sh, teacher_sh = asm.mesh, asm.state_shardings[PHASE], asm.teacher_sharding
  axes = models.logical_axes(CFG)
  expected = jax.tree.map(lambda n, x: sh.logical_spec(n, shape=x.shape, mesh=mesh), axes,
                          asm.family.teacher_params, is_leaf=lambda n: isinstance(n, tuple))
  for tree in (teacher_sh, state_sh.fakes[PHASE]):
    assert jax.tree.map(lambda s: s.spec, tree) == expected
  fake, blk = state_sh.fakes[PHASE], state_sh.fakes[PHASE]["blocks"][0]
  assert blk["qkv"]["kernel"].spec == P("fsdp", "tensor")        # (embed, heads) [16, 48]
  assert blk["qkv"]["bias"].spec == P("tensor")
  assert blk["fc2"]["kernel"].spec == P("tensor", "fsdp")         # (mlp, embed) [64, 16]
  assert fake["y_embed"]["embedding"].spec == P(None, "fsdp")     # (vocab, embed): vocab -> None
  assert fake["out"]["kernel"].spec == P("fsdp")                  # (embed, None) [16, 16]
  lora = state_sh.experts[PHASE]["blocks.0.qkv.kernel"]
  assert lora["a"].spec == P("fsdp") and lora["b"].spec == P(None, "tensor")
  # Optimizer states: mu/nu like their parameters, the step count replicated.
  for tree, params in ((state_sh.expert_opt[PHASE], state_sh.experts[PHASE]),
                       (state_sh.fake_opt[PHASE], fake)):
    paths = dict(jax.tree_util.tree_leaves_with_path(tree))
    for path, s in paths.items():
      key = jax.tree_util.keystr(path)
      if ".mu" in key or ".nu" in key:
        continue
      assert s.spec == P(), key
    mus = [s for p, s in paths.items() if ".mu" in jax.tree_util.keystr(p)]
    assert [s.spec for s in mus] == [s.spec for s in jax.tree.leaves(params)]
  assert state_sh.step.spec == P() and state_sh.rng.spec == P()


def test_rules_fall_back_to_replication():
  mesh = sh.make_mesh(1, 4, tensor=2)
  assert sh.logical_spec(("embed", "heads"), shape=(6, 8), mesh=mesh) == P(None, "tensor")
  assert sh.logical_spec(("embed", "heads"), shape=(8, 3), mesh=mesh) == P("fsdp")
  # batch takes (data, fsdp); embed cannot reuse fsdp in the same array.
  assert sh.logical_spec(("batch", "length", "embed"), shape=(8, 4, 16),
                         mesh=sh.make_mesh(2, 4)) == P(("data", "fsdp"))
  assert sh.logical_spec(("layers", "embed", "mlp")) == P(None, ("fsdp", "context"), "tensor")
  # Parameters: a large leaf the rules leave unsplit over fsdp gets its largest free dim split.
  m8 = sh.make_mesh(1, 8)
  lora_a = dict(names=("layers", "mlp", None), shape=(4, 1024, 64), mesh=m8)
  assert sh.logical_spec(**lora_a) == P()
  assert sh.logical_spec(**lora_a, fsdp_min_size=2**16) == P(None, "fsdp")
  assert sh.logical_spec(("mlp",), shape=(1024,), mesh=m8, fsdp_min_size=2**16) == P()  # small
  custom = (("embed", ("fsdp", "tensor")),)
  assert sh.logical_spec(("embed",), custom, (16,), mesh) == P(("fsdp", "tensor"))
  assert sh.mesh_sizes({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "tensor": 2,
                                                         "context": 1}
  with pytest.raises(ValueError, match="at most one -1"):
    sh.mesh_sizes({"data": -1, "fsdp": -1}, 8)


def test_context_axis_also_splits_parameters():
  asm = _asm(MESHES["data2_context4"], abstract=True)
  mesh, state_sh, teacher_sh, batch_sh = (asm.mesh, asm.state_shardings[PHASE], asm.teacher_sharding,
                                          asm.batch_sharding)
  assert teacher_sh["blocks"][0]["qkv"]["kernel"].spec == P("context")   # embed -> context
  assert state_sh.experts[PHASE]["blocks.0.fc2.kernel"]["b"].spec == P(None, "context")
  assert batch_sh["y"].is_equivalent_to(NamedSharding(mesh, P(None, "data")), 2)   # fsdp is 1


def test_shard_tokens_on_context():
  mesh = sh.mesh_from_sizes(MESHES["data2_context4"])
  x = jnp.ones((4, 16, 8))
  f = jax.jit(lambda x: sh.shard_tokens(x * 2, mesh=mesh))
  assert f(x).sharding.is_equivalent_to(NamedSharding(mesh, P("data", "context")), 3)
  with jax.set_mesh(mesh):   # the mesh from context, as the models would call it
    y = jax.jit(lambda x: sh.shard_tokens(x * 2))(x)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "context")), 3)
  assert sh.shard_tokens(x) is x   # no mesh: identity
