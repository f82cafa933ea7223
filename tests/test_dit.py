"""The DiT (shapes, parameter counts, scan = loop, logical axes) and LoRA (zero-init, merge)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdmd_jax import models
from pdmd_jax.models import dit
from pdmd_jax.models import lora


def _perturbed(params, seed=0, scale=0.05):
  """Random non-zero weights everywhere (a fresh DiT outputs exactly 0: adaLN-Zero)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def _expected_params(cfg: dit.DiTConfig) -> int:
  d, m, pd = cfg.hidden, cfg.mlp_ratio * cfg.hidden, cfg.patch**2 * cfg.channels
  block = (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + (d * 6 * d + 6 * d)
  return ((pd * d + d) + (cfg.time_dim * d + d) + (d * d + d) + (cfg.num_classes + 1) * d
          + cfg.depth * block + (d * 2 * d + 2 * d) + (d * pd + pd))


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_shapes_and_parameter_counts(variant):
  cfg = dit.config_for(variant)
  _, params = models.abstract_dit(cfg)
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert n == _expected_params(cfg)
  assert {"tiny": 50_640, "small": 1_275_408}[variant] == n
  net, p = models.build_dit(cfg)
  x = jnp.zeros((3,) + cfg.sample_shape)
  out = net.apply(p, x, jnp.array([0.1, 0.5, 1.0]), jnp.array([0, 5, cfg.num_classes]))
  assert out.shape == x.shape
  np.testing.assert_array_equal(out, 0.0)   # adaLN-Zero: a fresh DiT is the zero field


def test_video_dit_shapes():
  cfg = dit.config_for("tiny", frames=4, temporal_patch=2)
  net, p = models.build_dit(cfg)
  p = _perturbed(p)
  x = jax.random.normal(jax.random.PRNGKey(0), (2,) + cfg.sample_shape)
  out = net.apply(p, x, jnp.array([0.3, 0.8]), jnp.array([1, 2]))
  assert cfg.sample_shape == (4, 32, 32, 1) and out.shape == x.shape
  assert cfg.grid == (2, 8, 8)
  assert np.all(np.isfinite(out))


def test_pos_embed_is_distinct_per_token():
  pe = dit.sincos_pos_embed((2, 4, 4), 48)
  assert pe.shape == (32, 48)
  d = np.linalg.norm(pe[:, None] - pe[None], axis=-1)
  assert np.all(d[~np.eye(32, dtype=bool)] > 1e-3)


@pytest.mark.parametrize("temporal_patch", [1, 2])
def test_inflated_video_dit_is_the_image_dit_on_static_clips(temporal_patch):
  icfg = dit.config_for("tiny")
  inet, ip = models.build_dit(icfg)
  ip = _perturbed(ip, seed=3)
  vcfg = dataclasses.replace(icfg, frames=4, temporal_patch=temporal_patch)
  vnet, vp = models.build_dit(vcfg, seed=1)
  vp = dit.inflate(ip, vcfg, vp)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(k1, (3,) + icfg.sample_shape)
  t, y = jnp.array([0.1, 0.5, 0.97]), jnp.array([0, 7, icfg.num_classes])
  want = inet.apply(ip, x, t, y)
  got = vnet.apply(vp, jnp.repeat(x[:, None], 4, axis=1), t, y)
  assert float(jnp.abs(want).max()) > 0.1
  np.testing.assert_allclose(got, jnp.repeat(want[:, None], 4, axis=1), atol=2e-5)
  # frames that differ are not processed independently: attention mixes them
  xs = jnp.repeat(x[:, None], 4, axis=1).at[:, 1:].add(jax.random.normal(k2, (3, 3) + x.shape[1:]))
  assert float(jnp.abs(vnet.apply(vp, xs, t, y)[:, 0] - want).max()) > 1e-3


def test_inflate_names_the_mismatched_field():
  from pdmd_jax import teacher_training  # pylint: disable=import-outside-toplevel
  vcfg = dit.config_for("tiny", frames=4, temporal_patch=2)   # the shipped image DiT is "small"
  _, vp = models.build_dit(vcfg)
  with pytest.raises(ValueError, match="hidden: 128 vs 32"):
    teacher_training.inflate_from(None, vcfg, vp)


def test_scan_over_layers_equals_the_loop():
  cfg = dit.config_for("tiny")
  net, p = models.build_dit(cfg)
  p = _perturbed(p)
  scfg = dataclasses.replace(cfg, scan_layers=True, remat=True)
  snet, sp = models.build_dit(scfg)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[p["blocks"][i] for i in range(cfg.depth)])
  sp = {**p, "blocks": stacked}
  assert jax.tree.structure(sp) == jax.tree.structure(models.build_dit(scfg)[1])
  x = jax.random.normal(jax.random.PRNGKey(1), (2,) + cfg.sample_shape)
  t, y = jnp.array([0.2, 0.9]), jnp.array([3, 10])
  np.testing.assert_allclose(jax.jit(snet.apply)(sp, x, t, y), jax.jit(net.apply)(p, x, t, y),
                             atol=1e-5)
  g1 = jax.jit(jax.grad(lambda q: jnp.sum(snet.apply(q, x, t, y)**2)))(sp)
  g0 = jax.jit(jax.grad(lambda q: jnp.sum(net.apply(q, x, t, y)**2)))(p)
  np.testing.assert_allclose(g1["blocks"]["qkv"]["kernel"][1], g0["blocks"][1]["qkv"]["kernel"],
                             rtol=1e-4, atol=1e-6)


def test_every_parameter_has_logical_axes():
  axes = models.logical_axes(dit.config_for("tiny", scan_layers=True))
  _, params = models.abstract_dit(dit.config_for("tiny", scan_layers=True))
  for names, p in zip(jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple)),
                      jax.tree.leaves(params)):
    assert len(names) == len(p.shape)
  assert axes["blocks"]["qkv"]["kernel"] == ("layers", "embed", "heads")
  assert axes["blocks"]["fc2"]["kernel"] == ("layers", "mlp", "embed")


@pytest.mark.parametrize("scan", [False, True])
def test_lora_zero_init_is_the_base_model_and_merges_exactly(scan):
  cfg = dit.config_for("tiny", scan_layers=scan)
  net, p = models.build_dit(cfg)
  p = _perturbed(p)
  spec = lora.LoraSpec(((lora.DIT_TARGETS, 4, 8.0),))
  lo = lora.init(spec, p, jax.random.PRNGKey(0))
  assert len(lo) == (1 if scan else cfg.depth) * 4
  x = jax.random.normal(jax.random.PRNGKey(2), (2,) + cfg.sample_shape)
  t, y = jnp.array([0.4, 0.7]), jnp.array([1, 2])
  np.testing.assert_array_equal(net.apply(lora.merge(spec, p, lo), x, t, y), net.apply(p, x, t, y))
  # A non-zero B: the merged kernel is W + (alpha / r) A B, and only targeted kernels move.
  lo = jax.tree.map(lambda a: a + 0.1, lo)
  merged = lora.merge(spec, p, lo)
  path = "blocks.qkv.kernel" if scan else "blocks.1.qkv.kernel"
  w = merged["blocks"]["qkv"]["kernel"] if scan else merged["blocks"][1]["qkv"]["kernel"]
  w0 = p["blocks"]["qkv"]["kernel"] if scan else p["blocks"][1]["qkv"]["kernel"]
  expect = w0 + 2.0 * np.einsum("...ir,...ro->...io", lo[path]["a"], lo[path]["b"])
  np.testing.assert_allclose(w, expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(merged["embed"]["kernel"], p["embed"]["kernel"])
  assert lora.num_params(lo) < 0.2 * sum(a.size for a in jax.tree.leaves(p))


def test_lora_targets_that_match_nothing_name_the_field():
  _, p = models.build_dit(dit.config_for("tiny"))
  with pytest.raises(ValueError, match="generator.lora targets"):
    lora.init(lora.LoraSpec((("nothing", 4, 4.0),)), p, jax.random.PRNGKey(0))


@pytest.mark.parametrize("frames", [1, 4])
def test_features_on_the_token_grid_and_the_gan_head(frames):
  """apply_features(layer) returns the unchanged velocity and the tokens after block ``layer``
  on the grid [B, *grid, hidden] (image [8, 8], video [2, 8, 8]); a token changed at one grid
  cell moves only that cell's features before any attention (layer 0). The GAN head maps them
  to one logit per sample that depends on its input (not a constant: no norm over a 1 x 1 map)."""
  from pdmd_jax.models import gan_head  # pylint: disable=import-outside-toplevel
  cfg = dit.config_for("tiny", frames=frames, temporal_patch=2 if frames > 1 else 1)
  net, p = models.build_dit(cfg)
  p = _perturbed(p)
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + cfg.sample_shape)
  t, y = jnp.array([0.2, 0.5, 0.9]), jnp.array([1, 2, 3])
  feats = jax.jit(net.apply_features, static_argnums=4)
  v, f = feats(p, x, t, y, 1)
  np.testing.assert_allclose(v, jax.jit(net.apply)(p, x, t, y), rtol=1e-6, atol=1e-6)
  assert f.shape == (3,) + cfg.grid + (cfg.hidden,)
  _, f0 = feats(p, x, t, y, 0)
  _, f0b = feats(p, x.at[..., :4, :4, :].add(1.0), t, y, 0)   # patch (0, 0)
  moved = np.any(np.abs(np.asarray(f0b - f0)) > 1e-6, axis=-1)            # [B, *grid]
  assert moved[..., 0, 0].all() and moved.sum() == moved[..., 0, 0].sum()  # (every frame's)
  head = gan_head.Head(cfg.grid, cfg.hidden, 32, seed=0)
  logits = jax.jit(head.apply)(head.params, f)
  assert logits.shape == (3,) and np.all(np.isfinite(logits))
  assert np.ptp(np.asarray(logits)) > 1e-4


@pytest.mark.parametrize("grid", [(8, 8), (2, 8, 8)])
def test_gan_head_convs_equal_nnx_conv(grid):
  """The head's slice-and-matmul convolutions (fast inside the TTUR loop on XLA:CPU) give
  nnx.Conv's numbers with nnx.Conv's parameters, for every layer of the pyramid."""
  from pdmd_jax.models import gan_head  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  module = gan_head.GanHead(grid, 16, 8, rngs=nnx.Rngs(0))
  h = jax.random.normal(jax.random.PRNGKey(1), (3, *grid, 16))

  @jax.jit
  def both(h):                      # every layer: (ours, nnx.Conv's) on the same input
    out = []
    for layer, (strides, padding) in zip(module.convs, module.specs):
      got = gan_head.conv(h, layer.kernel[...], layer.bias[...], strides, padding)
      out.append((got, layer(h)))
      h = jax.nn.silu(got)
    return out

  for got, want in both(h):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape[-1] == 8


def test_divided_layout_inflates_to_the_image_dit_on_any_clip():
  """layout="divided": an inflated image DiT is the image DiT frame by frame on moving clips too
  (attention within a frame; the temporal branch's output projection starts at zero); once the
  temporal branch is non-zero, frames see each other. "joint" mixes moving frames at init."""
  icfg = dit.config_for("tiny")
  inet, ip = models.build_dit(icfg)
  ip = _perturbed(ip, seed=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4) + icfg.sample_shape)   # 4 different frames
  t, y = jnp.array([0.3, 0.8]), jnp.array([2, icfg.num_classes])
  want = jax.vmap(lambda f: jax.jit(inet.apply)(ip, f, t, y), in_axes=1, out_axes=1)(x)
  got = {}
  for layout in ("joint", "divided"):
    vcfg = dataclasses.replace(icfg, frames=4, layout=layout)
    vnet, vp = models.build_dit(vcfg, seed=1)
    vp = dit.inflate(ip, vcfg, vp)
    got[layout] = jax.jit(vnet.apply)(vp, x, t, y)
  assert "qkv_t" in vp["blocks"][0] and float(jnp.abs(vp["blocks"][0]["qkv_t"]["kernel"]).max()) > 0
  np.testing.assert_allclose(got["divided"], want, atol=2e-5)
  assert float(jnp.abs(got["joint"] - want).max()) > 1e-3
  # a non-zero temporal branch: frame 0's output depends on frame 3's input (and at init not)
  dep = lambda p: jax.jit(jax.grad(lambda x3: jnp.sum(vnet.apply(
      p, x.at[:, 3].set(x3), t, y)[:, 0] ** 2)))(x[:, 3])
  assert float(jnp.abs(dep(vp)).max()) == 0.0
  assert float(jnp.abs(dep(_perturbed(vp, seed=4))).max()) > 1e-4
  with pytest.raises(ValueError, match="model.layout='spatial' is unknown"):
    models.build_dit(dataclasses.replace(icfg, frames=4, layout="spatial"))


def _token_dependence(apply, params, h, c, token):
  """|d out[token] / d h[j]| summed over features, per input token j ([tokens])."""
  g = jax.jit(jax.grad(lambda h, params: jnp.sum(apply(params, h, c)[0, token] ** 2)))(h, params)
  return np.asarray(jnp.abs(g[0]).sum(-1))


def test_joint_branch_reaches_other_frames_at_other_positions():
  """joint_blocks: the temporal branch links a token only to its own position in other frames;
  the all-frames branch links it to every position of every frame (a digit that moved)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg = dit.config_for("tiny", image_size=16, frames=4, layout="divided", joint_blocks=1)
  graphdef, state = nnx.split(dit.Block(cfg, rngs=nnx.Rngs(0), joint=True), nnx.Param)
  p = state.to_pure_dict()
  apply = lambda params, h, c: nnx.merge(graphdef, nnx.State(params))(h, c)
  n = 16                                    # tokens per frame (4 x 4 patches)
  h = jax.random.normal(jax.random.PRNGKey(1), (1, 4 * n, cfg.hidden))
  c = jax.random.normal(jax.random.PRNGKey(2), (1, cfg.hidden))
  only = lambda name: {**p, name: _perturbed(p[name], seed=5, scale=0.3)}
  at_init = _token_dependence(apply, p, h, c, 5)
  np.testing.assert_array_equal(np.nonzero(at_init)[0], [5])          # residual path only
  temporal = _token_dependence(apply, only("proj_t"), h, c, 5)
  np.testing.assert_array_equal(np.nonzero(temporal)[0], [5, n + 5, 2 * n + 5, 3 * n + 5])
  joint = _token_dependence(apply, only("proj_j"), h, c, 5)
  assert (joint > 0).all()                   # frame 3, position 9 included


def test_extend_adds_joint_blocks_exactly_and_names_mismatches():
  cfg = dit.config_for("tiny", frames=4, layout="divided")
  net, p = models.build_dit(cfg)
  p = _perturbed(p, seed=3)
  cfg2 = dataclasses.replace(cfg, joint_blocks=1)
  net2, p2 = models.build_dit(cfg2, seed=1)
  p2 = dit.extend(p, cfg2, p2)
  assert "qkv_j" in p2["blocks"][1] and "qkv_j" not in p2["blocks"][0]
  x = jax.random.normal(jax.random.PRNGKey(0), (2,) + cfg.sample_shape)
  t, y = jnp.array([0.3, 0.8]), jnp.array([2, cfg.num_classes])
  want = net.apply(p, x, t, y)
  np.testing.assert_array_equal(net2.apply(p2, x, t, y), want)
  p2["blocks"][1]["proj_j"] = _perturbed(p2["blocks"][1]["proj_j"], seed=4)
  assert float(jnp.abs(net2.apply(p2, x, t, y) - want).max()) > 1e-3
  with pytest.raises(ValueError, match="the new DiT has no place for"):   # would drop weights
    dit.extend(p2, cfg, models.build_dit(cfg)[1])
  with pytest.raises(ValueError, match="model.joint_blocks=1 needs a video DiT with "
                                       "layout='divided' \\(got 'joint'\\)"):
    models.build_dit(dataclasses.replace(cfg2, layout="joint"))
  with pytest.raises(ValueError, match="model.joint_blocks=3"):
    models.build_dit(dataclasses.replace(cfg2, joint_blocks=3))


def test_extend_appends_blocks_as_the_identity():
  """model.depth above the trained DiT's: the new blocks start as the identity (adaLN-Zero), so
  the deeper model computes exactly the trained one, and each new block is live to training."""
  cfg = dit.config_for("tiny", frames=4, layout="divided")
  net, p = models.build_dit(cfg)
  p = _perturbed(p, seed=3)
  cfg2 = dataclasses.replace(cfg, depth=cfg.depth + 2)
  net2, p2 = models.build_dit(cfg2, seed=1)
  p2 = dit.extend(p, cfg2, _perturbed(p2, seed=6))   # extend must zero what makes them identity
  assert len(p2["blocks"]) == cfg.depth + 2
  x = jax.random.normal(jax.random.PRNGKey(0), (2,) + cfg.sample_shape)
  t, y = jnp.array([0.3, 0.8]), jnp.array([2, cfg.num_classes])
  want = net.apply(p, x, t, y)
  np.testing.assert_array_equal(net2.apply(p2, x, t, y), want)
  apply2 = jax.jit(net2.apply)
  g = jax.jit(jax.grad(lambda q: jnp.sum(apply2(q, x, t, y) ** 2)))(p2)
  for i in (cfg.depth, cfg.depth + 1):
    assert float(jnp.abs(g["blocks"][i]["ada"]["kernel"]).max()) > 0   # the gates get gradient
    q = {**p2, "blocks": {**p2["blocks"], i: {**p2["blocks"][i], "ada": _perturbed(
        p2["blocks"][i]["ada"], seed=7)}}}
    assert float(jnp.abs(apply2(q, x, t, y) - want).max()) > 1e-3
  with pytest.raises(ValueError, match="the new DiT has no place for"):
    dit.extend(p2, cfg, models.build_dit(cfg)[1])


def test_temporal_modulation_extends_exactly_and_is_live():
  """model.temporal_ada on a trained divided DiT: zero modulation, so the extended model is the
  trained one; its weights get gradient and, once moved, change the output."""
  cfg = dit.config_for("tiny", frames=4, layout="divided")
  net, p = models.build_dit(cfg)
  p = _perturbed(p, seed=3)
  cfg2 = dataclasses.replace(cfg, temporal_ada=True)
  net2, p2 = models.build_dit(cfg2, seed=1)
  p2 = dit.extend(p, cfg2, _perturbed(p2, seed=6))   # extend must zero the new modulation
  x = jax.random.normal(jax.random.PRNGKey(0), (2,) + cfg.sample_shape)
  t, y = jnp.array([0.3, 0.8]), jnp.array([2, cfg.num_classes])
  want = net.apply(p, x, t, y)
  np.testing.assert_array_equal(net2.apply(p2, x, t, y), want)
  apply2 = jax.jit(net2.apply)
  g = jax.jit(jax.grad(lambda q: jnp.sum(apply2(q, x, t, y) ** 2)))(p2)
  for i in range(cfg.depth):
    assert float(jnp.abs(g["blocks"][i]["ada_t"]["kernel"]).max()) > 0
    q = {**p2, "blocks": {**p2["blocks"], i: {**p2["blocks"][i], "ada_t": _perturbed(
        p2["blocks"][i]["ada_t"], seed=7)}}}
    assert float(jnp.abs(apply2(q, x, t, y) - want).max()) > 1e-3
  with pytest.raises(ValueError, match="temporal_ada=True needs a video DiT"):
    models.build_dit(dit.config_for("tiny", temporal_ada=True))


def test_shipped_video_teacher_extends_to_joint_blocks_exactly():
  """train.init_from=<video teacher> + model.joint_blocks: fine-tuning starts at the teacher."""
  from pdmd_jax import assets  # pylint: disable=import-outside-toplevel
  from pdmd_jax import teacher_training  # pylint: disable=import-outside-toplevel
  directory = assets.path("video_teacher")
  cfg, net, params, _ = teacher_training.load_teacher(directory)
  cfg2 = dataclasses.replace(cfg, joint_blocks=2)
  net2, p2 = models.build_dit(cfg2, seed=1)
  p2 = teacher_training.inflate_from(directory, cfg2, p2)
  x = jax.random.normal(jax.random.PRNGKey(0), (1,) + cfg.sample_shape)
  t, y = jnp.array([0.6]), jnp.array([3])
  want = jax.jit(net.apply)(params, x, t, y)
  np.testing.assert_array_equal(jax.jit(net2.apply)(p2, x, t, y), want)
  cfg3 = dataclasses.replace(cfg, depth=cfg.depth + 2)       # model.depth: appended blocks
  net3, p3 = models.build_dit(cfg3, seed=1)
  p3 = teacher_training.inflate_from(directory, cfg3, p3)
  np.testing.assert_array_equal(jax.jit(net3.apply)(p3, x, t, y), want)
  shallow = dataclasses.replace(cfg, depth=cfg.depth - 1)
  with pytest.raises(ValueError, match=f"depth: {cfg.depth} vs {cfg.depth - 1}"):
    teacher_training.inflate_from(directory, shallow, models.build_dit(shallow)[1])
  with pytest.raises(ValueError, match="widening needs model.hidden a multiple k of 128, model."
                                       "heads = k x 4 and model.pos_dim=128 \\(got hidden 256, "
                                       "heads 4"):
    teacher_training.inflate_from(directory, dataclasses.replace(cfg, hidden=256), None)
  with pytest.raises(ValueError, match="does not match model \\(frames: 8 vs 4"):
    teacher_training.inflate_from(directory, dataclasses.replace(cfg2, frames=4),
                                  models.build_dit(dataclasses.replace(cfg2, frames=4))[1])


def test_widen_is_exact_and_breaks_the_copies_symmetry(k=2):
  """dit.widen: k x hidden, heads and MLP computes the trained DiT (LayerNorm statistics and
  per-head attention unchanged), and one gradient step moves the k copies of a channel apart
  (without the zero-sum noise they would get identical gradients forever)."""
  cfg = dit.config_for("tiny", frames=4, image_size=8, layout="divided", temporal_ada=True,
                       joint_blocks=1)
  net, p = models.build_dit(cfg)
  p = _perturbed(p, seed=3)
  cfg2 = dataclasses.replace(cfg, hidden=k * cfg.hidden, heads=k * cfg.heads, pos_dim=cfg.hidden)
  net2, shapes = models.abstract_dit(cfg2)
  p2 = dit.widen(p, k)
  chex.assert_trees_all_equal_shapes_and_dtypes(p2, shapes)
  x = jax.random.normal(jax.random.PRNGKey(0), (2,) + cfg.sample_shape)
  t, y = jnp.array([0.3, 0.8]), jnp.array([2, cfg.num_classes])
  apply2 = jax.jit(net2.apply)
  np.testing.assert_allclose(apply2(p2, x, t, y), jax.jit(net.apply)(p, x, t, y), atol=2e-6)
  grad = jax.jit(jax.grad(lambda q: jnp.sum(apply2(q, x, t, y) ** 2)))
  fc1 = grad(p2)["blocks"][0]["fc1"]["kernel"]   # [k d, k m]: the copies' incoming weights
  m = fc1.shape[1] // k
  assert float(jnp.abs(fc1[:, :m] - fc1[:, m:]).max()) > 1e-6
  fc1 = grad(dit.widen(p, k, noise=0.0))["blocks"][0]["fc1"]["kernel"]
  np.testing.assert_allclose(fc1[:, :m], fc1[:, m:], rtol=1e-4, atol=1e-7)   # no noise: stuck
  with pytest.raises(ValueError, match="model.pos_dim=48 must be 0"):
    models.build_dit(dataclasses.replace(cfg2, pos_dim=48))
