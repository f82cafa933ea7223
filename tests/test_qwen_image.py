"""Qwen-Image transformer (Flax NNX): float32 parity with diffusers, 20B parameter count,
scan/remat/blockwise equivalences, logical axes, config and state-dict errors."""

import dataclasses
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from pdmd_jax.models import qwen_image as qi  # noqa: E402

# joint_attention_dim (24) != inner dim (32); head_dim 16 = rope axes 4 + 6 + 6.
TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
SIGMAS = np.array([0.0, 0.3, 0.7, 1.0], np.float32)
# Ragged text masks: full, right-padded, a hole in the middle, a single valid token.
MASKS = np.array([[1, 1, 1, 1, 1, 1, 1],
                  [1, 1, 1, 0, 0, 0, 0],
                  [1, 1, 0, 1, 1, 0, 0],
                  [1, 0, 0, 0, 0, 0, 0]], bool)


@pytest.fixture(scope="module")
def ref():
  """(float32 diffusers model with every parameter perturbed off its init, its config)."""
  torch.manual_seed(0)
  model = diffusers.QwenImageTransformer2DModel(**TINY).eval()
  with torch.no_grad():  # norms at 1 and zero biases would hide swapped or dropped keys
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model, qi.QwenImageConfig.from_diffusers(dict(model.config))


def _pack(x):
  """The pipeline's _pack_latents (pipeline_qwenimage.py): [B, C, H, W] -> [B, hw, C*2*2]."""
  b, c, h, w = x.shape
  return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)


def _unpack(tokens, h, w):
  """The pipeline's _unpack_latents (without its frame axis): -> [B, C, H, W]."""
  b, _, c4 = tokens.shape
  return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
      b, c4 // 4, h, w)


def _torch_out(model, x, t, ctx, mask):
  b, _, h, w = x.shape
  dt = next(model.parameters()).dtype
  with torch.no_grad():
    out = model(hidden_states=_pack(torch.from_numpy(x)).to(dt),
                encoder_hidden_states=torch.from_numpy(ctx).to(dt),
                # 0/1 integers, as the pipeline passes the tokenizer's mask
                encoder_hidden_states_mask=None if mask is None else torch.from_numpy(
                    mask.astype(np.int64)),
                timestep=torch.from_numpy(t).to(dt), img_shapes=[[(1, h // 2, w // 2)]] * b,
                return_dict=False)[0]
  return _unpack(out.float(), h, w).numpy()


def _inputs(hw, n_txt=7, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((len(SIGMAS), 4, *hw), np.float32)
  ctx = rng.standard_normal((len(SIGMAS), n_txt, 24), np.float32)
  return x, SIGMAS, ctx


def _apply(cfg):
  graphdef = nnx.graphdef(qi.abstract_model(cfg))
  return jax.jit(lambda p, *a: nnx.merge(graphdef, nnx.State(p))(*a))


@pytest.mark.parametrize("hw,masked", [((6, 10), True), ((10, 4), False)])
def test_parity_with_diffusers(ref, hw, masked):
  """Latents 6x10 (3x5 patches) with ragged masks, and 10x4 (5x2) without a mask; the batch
  carries sigma in {0, 0.3, 0.7, 1}."""
  model, cfg = ref
  params = qi.params_from_state_dict(model.state_dict(), cfg)
  mask = MASKS if masked else None
  args = _inputs(hw)
  want = _torch_out(model, *args, mask)
  got = np.asarray(_apply(cfg)(params, *args, mask))
  assert got.shape == want.shape == (4, 4, *hw)
  err = np.abs(got - want).max()
  print(f"parity HW={hw} masks={masked}: max-abs {err:.3e}, rel {err / np.abs(want).max():.3e} "
        f"(max |ref| {np.abs(want).max():.2f})")
  assert err <= 1e-5


def test_param_count_equals_diffusers():
  """Full-size Qwen-Image 20B: eval_shape count == diffusers (meta device) count."""
  ours = qi.param_count(dataclasses.replace(qi.QWEN_IMAGE_20B, scan_layers=True))
  with torch.device("meta"):
    model = diffusers.QwenImageTransformer2DModel(**qi.QWEN_IMAGE_20B.to_diffusers())
  theirs = sum(p.numel() for p in model.parameters())
  print(f"Qwen-Image 20B params: ours {ours:,} diffusers {theirs:,}")
  assert ours == theirs


def test_scan_equals_loop(ref):
  """Stacked blocks + lax.scan == the loop; params_from_state_dict stacks for scan_layers."""
  model, cfg = ref
  sd = model.state_dict()
  scfg = dataclasses.replace(cfg, scan_layers=True)
  stacked = qi.params_from_state_dict(sd, scfg)
  assert stacked["transformer_blocks"]["attn"]["to_q"]["kernel"].shape == (2, 32, 32)
  args = (*_inputs((4, 6)), MASKS)
  loop = _apply(cfg)(qi.params_from_state_dict(sd, cfg), *args)
  np.testing.assert_allclose(np.asarray(_apply(scfg)(stacked, *args)), np.asarray(loop),
                             atol=1e-6)


def test_blockwise_masked_equals_dense_and_padding_is_ignored(ref):
  model, cfg = ref
  params = qi.params_from_state_dict(model.state_dict(), cfg)
  x, t, ctx = _inputs((4, 6))
  dense = np.asarray(_apply(cfg)(params, x, t, ctx, MASKS))
  block = _apply(dataclasses.replace(cfg, attention="blockwise"))
  np.testing.assert_allclose(np.asarray(block(params, x, t, ctx, MASKS)), dense, atol=1e-5)
  # Padded text tokens are never attended to: their content cannot reach the output...
  noisy = np.where(MASKS[..., None], ctx, 100 * ctx[::-1]).astype(np.float32)
  np.testing.assert_allclose(np.asarray(block(params, x, t, noisy, MASKS)), dense, atol=1e-5)
  # ...but the mask is used: without it the padded samples change.
  unmasked = np.asarray(block(params, x, t, ctx, np.ones_like(MASKS)))
  assert np.abs(unmasked[0] - dense[0]).max() < 1e-5           # the full-mask sample
  assert np.abs(unmasked[1:] - dense[1:]).max() > 1e-3


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
  graphdef = nnx.graphdef(qi.abstract_model(cfg))
  return lambda p: jnp.sum(nnx.merge(graphdef, nnx.State(p))(*args) ** 2)


def _random_params(cfg, seed=0):
  """N(0, 0.1) leaves (norm scales 1 + N(0, 0.1)) on the abstract tree: no module init."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(rng.normal(0.0, 0.1, s.shape)
                                  + (path[-1].key == "scale"), s.dtype),
      qi.abstract_params(cfg))


@pytest.mark.parametrize("scan", [True, False])
def test_remat_policies(scan):
  """Each remat option wraps every block in jax.checkpoint with its policy (none: no wrap)."""
  cfg = qi.tiny(scan_layers=scan)
  params, args = _random_params(cfg), (*_inputs((2, 4))[:3], MASKS)
  for remat, policy in qi.REMAT_POLICIES.items():
    loss = _loss_fn(dataclasses.replace(cfg, remat=remat), args)
    found = [e.params["policy"] for e in _eqns(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
             if e.primitive.name == "remat2"]
    assert found == [policy] * (0 if policy is None else 1 if scan else cfg.num_layers), remat


def test_remat_same_grads():
  """The selective policy changes what the backward recomputes, never the numbers."""
  cfg = qi.tiny(num_layers=1)
  params, args = _random_params(cfg), (*_inputs((2, 4))[:3], MASKS)
  (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(_loss_fn(
      dataclasses.replace(cfg, remat=r), args)))(params) for r in ("none", "dots"))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g1, g0)


def test_logical_axis_names():
  specs = qi.param_specs(qi.tiny(scan_layers=True))
  blocks = specs["transformer_blocks"]
  assert blocks["attn"]["add_k_proj"]["kernel"] == P("layers", "embed", "heads")
  assert blocks["attn"]["to_add_out"]["kernel"] == P("layers", "heads", "embed")
  assert blocks["txt_mlp"]["fc2"]["kernel"] == P("layers", "mlp", "embed")
  assert blocks["img_mod"]["kernel"] == P("layers", "embed", "mlp")
  assert specs["txt_in"]["kernel"] == P(None, "embed")
  for scan in (True, False):
    cfg = qi.tiny(scan_layers=scan)
    flat_specs = jax.tree_util.tree_leaves_with_path(
        qi.param_specs(cfg), is_leaf=lambda x: isinstance(x, P))
    flat_params = jax.tree.leaves(qi.abstract_params(cfg))
    assert len(flat_specs) == len(flat_params)
    for (path, spec), leaf in zip(flat_specs, flat_params):
      assert isinstance(spec, P) and len(spec) == leaf.ndim, path
      assert leaf.ndim - scan < 2 or any(n not in (None, "layers") for n in spec), path


def test_config_and_state_dict_errors(ref):
  model, cfg = ref
  assert qi.QwenImageConfig.from_diffusers(cfg.to_diffusers()) == cfg
  assert cfg.latent_channels == 4 and cfg.dim == 32
  with pytest.raises(ValueError, match="zero_cond_t"):
    qi.tiny(zero_cond_t=True)
  with pytest.raises(ValueError, match="sum to"):
    qi.tiny(axes_dims_rope=(4, 6, 4))
  with pytest.raises(ValueError, match=r"unsupported .* config keys: \['foo'\]"):
    qi.QwenImageConfig.from_diffusers({"foo": 1})
  sd = dict(model.state_dict())
  sd.pop("transformer_blocks.1.attn.norm_added_k.weight")
  sd["transformer_blocks.0.attn.extra.weight"] = torch.zeros(3)
  sd["transformer_blocks.0.img_mlp.net.0.proj.weight"] = torch.zeros(32, 128)
  with pytest.raises(ValueError) as e:
    qi.params_from_state_dict(sd, cfg)
  msg = str(e.value)
  assert "missing keys ['transformer_blocks.1.attn.norm_added_k.weight']" in msg
  assert "unexpected keys ['transformer_blocks.0.attn.extra.weight']" in msg
  assert ("transformer_blocks.0.img_mlp.net.0.proj.weight: checkpoint shape (32, 128) != "
          "expected shape (128, 32)") in msg
  with pytest.raises(ValueError, match="channels"):
    qi.abstract_model(cfg)(jnp.zeros((1, 16, 4, 4)), jnp.zeros(1), jnp.zeros((1, 2, 24)))



def test_bf16_follows_diffusers_bf16(ref):
  """bf16 params and compute. diffusers rounds sigma to the compute dtype before embedding
  1000 sigma (0.3 -> 0.30078: 0.8 timesteps off, 10% of this model's output); so do we, so
  our bf16 output is near diffusers' bf16 output, not near the fp32 one, at such sigmas."""
  model, cfg = ref
  args = (*_inputs((4, 6)), MASKS)
  fp32 = np.asarray(_apply(cfg)(qi.params_from_state_dict(model.state_dict(), cfg), *args))
  bcfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
  bparams = qi.params_from_state_dict(model.state_dict(), bcfg)
  assert {x.dtype for x in jax.tree.leaves(bparams)} == {jnp.dtype(jnp.bfloat16)}
  out = _apply(bcfg)(bparams, *args)
  assert out.dtype == jnp.bfloat16
  theirs = _torch_out(_torch_bf16(model), *args)
  scale = np.abs(fp32).max()
  vs_diffusers = np.abs(np.asarray(out, np.float32) - theirs).max((1, 2, 3)) / scale
  vs_fp32 = np.abs(np.asarray(out, np.float32) - fp32).max((1, 2, 3)) / scale
  print(f"bf16 relative max error per sigma {SIGMAS}: vs diffusers bf16 {vs_diffusers}, "
        f"vs fp32 {vs_fp32}")
  assert vs_diffusers.max() < 3e-2
  assert (vs_fp32[1:3] > 2 * vs_diffusers[1:3]).all()   # sigma 0.3, 0.7: not bf16-exact


def _torch_bf16(model):
  bf16 = diffusers.QwenImageTransformer2DModel(**TINY).eval()
  bf16.load_state_dict(model.state_dict())
  for p in bf16.parameters():   # (ModelMixin.to warns about fp32-kept modules; there are none)
    p.data = p.data.to(torch.bfloat16)
  return bf16
