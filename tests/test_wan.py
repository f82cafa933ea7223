"""Wan transformer (Flax NNX): shapes, full-size parameter count, scan/remat/bf16 equivalences."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pdmd_jax.models import wan

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _random_params(cfg, seed=0):
  """N(0, 0.1) leaves (norm scales 1 + N(0, 0.1)) on the abstract tree: no module init."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(rng.normal(0.0, 0.1, s.shape)
                                  + (path[-1].key == "scale"), s.dtype),
      wan.abstract_params(cfg))


def _apply(cfg):
  graphdef = nnx.graphdef(wan.abstract_model(cfg))
  return jax.jit(lambda p, *a: nnx.merge(graphdef, nnx.State(p))(*a))


def _stack_blocks(params, num_layers):
  blocks = [params["blocks"][i] for i in range(num_layers)]
  return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def _inputs(cfg, b=2, fhw=(3, 4, 6), n_txt=5, n_img=0, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, cfg.in_channels, *fhw), np.float32)
  t = np.linspace(0.05, 0.95, b).astype(np.float32)
  ctx = rng.standard_normal((b, n_txt, cfg.text_dim), np.float32)
  img = rng.standard_normal((b, n_img, cfg.image_dim), np.float32) if n_img else None
  return x, t, ctx, img


def test_forward_shapes_and_config():
  # I2V-A14B-like channel concat (in != out) + a CLIP image branch, in one tiny model.
  cfg = wan.tiny(in_channels=9, out_channels=4, image_dim=24, added_kv_proj_dim=32)
  out = _apply(cfg)(_random_params(cfg), *_inputs(cfg, n_img=3))
  assert out.shape == (2, 4, 3, 4, 6) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  model = wan.abstract_model(cfg)
  with pytest.raises(ValueError, match="not divisible"):
    model(jnp.zeros((1, 9, 1, 5, 4)), jnp.zeros(1), jnp.zeros((1, 2, 32)))
  assert wan.WanConfig.from_diffusers(cfg.to_diffusers(), dtype="bfloat16").image_dim == 24
  with pytest.raises(ValueError, match="window_size"):
    wan.WanConfig.from_diffusers({"window_size": [-1, -1]})
  assert wan.WAN22_I2V_A14B.in_channels == 36 and wan.WAN22_I2V_A14B.image_dim is None


def test_logical_axis_names():
  specs = wan.param_specs(wan.tiny(scan_layers=True))
  assert specs["blocks"]["attn1"]["to_q"]["kernel"] == P("layers", "embed", "heads")
  assert specs["blocks"]["ffn"]["fc2"]["kernel"] == P("layers", "mlp", "embed")
  assert specs["time_proj"]["kernel"] == P("embed", "mlp")
  specs = wan.param_specs(wan.tiny())
  assert specs["blocks"][1]["attn2"]["to_out"]["kernel"] == P("heads", "embed")
  is_p = lambda x: isinstance(x, P)  # noqa: E731
  assert (jax.tree.structure(specs, is_leaf=is_p)
          == jax.tree.structure(wan.abstract_params(wan.tiny())))


def test_param_count_equals_diffusers():
  """Full-size Wan2.2 A14B experts: eval_shape count == diffusers (meta device) count."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  for cfg in (wan.WAN22_A14B, wan.WAN22_I2V_A14B):
    ours = wan.param_count(dataclasses.replace(cfg, scan_layers=True))
    with torch.device("meta"):
      ref = diffusers.WanTransformer3DModel(**cfg.to_diffusers())
    theirs = sum(p.numel() for p in ref.parameters())
    print(f"params in_channels={cfg.in_channels}: ours {ours:,} diffusers {theirs:,}")
    assert ours == theirs
  assert wan.param_count(wan.WAN22_A14B) == 14_288_491_584  # unscanned tree, same count


def test_scan_equals_loop():
  cfg = wan.tiny(image_dim=24, added_kv_proj_dim=32)
  params = _random_params(cfg)
  args = _inputs(cfg, n_img=3)
  loop = _apply(cfg)(params, *args)
  scfg = dataclasses.replace(cfg, scan_layers=True)
  scan = _apply(scfg)(_stack_blocks(params, cfg.num_layers), *args)
  np.testing.assert_allclose(np.asarray(scan), np.asarray(loop), atol=1e-6)


def _eqns(jaxpr):
  """All equations, recursing into sub-jaxprs (scan bodies, remat, custom rules)."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)


def _loss_fn(cfg, args):
  graphdef = nnx.graphdef(wan.abstract_model(cfg))
  return lambda p: jnp.sum(nnx.merge(graphdef, nnx.State(p))(*args) ** 2)


@pytest.mark.parametrize("scan", [True, False])
def test_remat_policies(scan):
  """Each remat option wraps every block in jax.checkpoint with its policy (none: no wrap)."""
  cfg = wan.tiny(scan_layers=scan)
  params, args = _random_params(cfg), _inputs(cfg, b=1, fhw=(1, 2, 4))
  for remat, policy in wan.REMAT_POLICIES.items():
    loss = _loss_fn(dataclasses.replace(cfg, remat=remat), args)
    found = [e.params["policy"] for e in _eqns(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
             if e.primitive.name == "remat2"]
    assert found == [policy] * (0 if policy is None else 1 if scan else cfg.num_layers), remat


def test_remat_same_grads():
  """The selective policy changes what the backward recomputes, never the numbers."""
  cfg = wan.tiny(num_layers=1)
  params, args = _random_params(cfg), _inputs(cfg, b=1, fhw=(1, 2, 4))
  (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(_loss_fn(
      dataclasses.replace(cfg, remat=r), args)))(params) for r in ("none", "dots"))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g1, g0)


def test_bf16_compute_and_params():
  cfg = wan.tiny()
  params = _random_params(cfg)
  args = _inputs(cfg)
  ref = np.asarray(_apply(cfg)(params, *args))
  bcfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
  bparams = jax.tree.map(lambda x, s: x.astype(s.dtype), params, wan.abstract_params(bcfg))
  # fp32 where diffusers keeps fp32: time embedder, AdaLN tables, LayerNorms.
  assert bparams["time_embedder"]["linear_1"]["kernel"].dtype == jnp.float32
  assert bparams["scale_shift_table"].dtype == jnp.float32
  assert bparams["blocks"][0]["norm2"]["scale"].dtype == jnp.float32
  assert bparams["blocks"][0]["attn1"]["to_q"]["kernel"].dtype == jnp.bfloat16
  out = _apply(bcfg)(bparams, *args)
  assert out.dtype == jnp.bfloat16
  rel = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
  print(f"bf16 vs fp32 relative max error: {rel:.3e}")
  assert rel < 5e-2


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])
def test_lora_merged_per_layer_inside_the_scan(scan):
  """lora.Deferred kernels (merged in each block's body) give the up-front merge's output and
  LoRA gradients; scanned, the step never holds every layer's merged kernels at once."""
  from pdmd_jax.models import lora  # pylint: disable=import-outside-toplevel
  cfg = wan.tiny(num_layers=6, ffn_dim=256, scan_layers=scan)
  params = _random_params(dataclasses.replace(cfg, scan_layers=False))
  if scan:
    params = _stack_blocks(params, cfg.num_layers)
  spec = lora.LoraSpec(((r"blocks\.(\d+\.)?(attn1\.to_q|ffn\.fc1|ffn\.fc2)\.kernel", 4, 4.0),))
  factors = lora.init(spec, params, jax.random.PRNGKey(0))
  factors = jax.tree.map(lambda a: a + 0.05, factors)            # B != 0: the LoRA acts
  graphdef = nnx.graphdef(wan.abstract_model(cfg))
  net = lambda p, x, t, y: nnx.merge(graphdef, nnx.State(p))(x, t, y)
  args = _inputs(cfg)[:3]
  fns = {d: jax.jit(jax.value_and_grad(lambda f, d=d: jnp.sum(
      lora.apply_on(net, spec, params, d)(f, *args) ** 2))) for d in (None, r"blocks\..*")}
  (v_up, g_up), (v_in, g_in) = (fns[None](factors), fns[r"blocks\..*"](factors))
  np.testing.assert_allclose(v_in, v_up, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_in), jax.tree.leaves(g_up)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if scan:
    temp = lambda d: fns[d].lower(factors).compile().memory_analysis().temp_size_in_bytes
    assert temp(r"blocks\..*") < temp(None)
