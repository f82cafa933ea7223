"""diffusers WanTransformer3DModel <-> pdmd_jax Wan: parity, round trips, errors, sharding."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from pdmd_jax import sharding  # noqa: E402
from pdmd_jax.convert import wan as cw  # noqa: E402
from pdmd_jax.models import wan  # noqa: E402

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
            rope_max_seq_len=64)
# name -> (extra diffusers kwargs, text tokens, image tokens per sample, image batch factor).
# diffusers' I2V attention takes the last 512 context tokens as text, hence L = 512 there.
VARIANTS = {
    "t2v": ({}, 7, 0, 0),
    "i2v": (dict(image_dim=24, added_kv_proj_dim=32), 512, 5, 1),
    "flf2v": (dict(image_dim=24, added_kv_proj_dim=32, pos_embed_seq_len=10), 512, 5, 2),
}
TIMES = np.array([0.0, 1e-3, 0.5, 0.999, 1.0], np.float32)  # flow-matching t; timestep 1000 t


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
  """name -> (saved dir, float32 torch model with every parameter perturbed off its init)."""
  out = {}
  for i, (name, (extra, *_)) in enumerate(VARIANTS.items()):
    torch.manual_seed(i)
    model = diffusers.WanTransformer3DModel(**TINY, **extra).eval()
    with torch.no_grad():  # norms at 1/0 and zero biases would hide swapped or dropped keys
      for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    d = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(d)
    out[name] = (d, model)
  return out


def _inputs(name, shape, seed=0):
  _, n_txt, n_img, img_factor = VARIANTS[name]
  rng, b = np.random.default_rng(seed), len(TIMES)
  x = rng.standard_normal((b, 4, *shape), np.float32)
  ctx = rng.standard_normal((b, n_txt, 32), np.float32)
  img = rng.standard_normal((b * img_factor, n_img, 24), np.float32) if n_img else None
  return x, TIMES, ctx, img


def _torch_out(model, x, t, ctx, img):
  with torch.no_grad():
    return model(torch.from_numpy(x), torch.from_numpy(1000 * t), torch.from_numpy(ctx),
                 None if img is None else torch.from_numpy(img), return_dict=False)[0].numpy()


def _apply(cfg):
  graphdef = nnx.graphdef(wan.abstract_model(cfg))
  return jax.jit(lambda p, *a: nnx.merge(graphdef, nnx.State(p))(*a))


@pytest.mark.parametrize("name,shape", [
    ("t2v", (1, 8, 8)), ("t2v", (3, 16, 12)), ("t2v", (2, 6, 10)),
    ("i2v", (1, 8, 8)), ("i2v", (3, 16, 12)), ("flf2v", (2, 8, 6)),
])
def test_parity_with_diffusers(refs, name, shape):
  """Batch of 5 timesteps t in {0, 1e-3, 0.5, 0.999, 1}; diffusers gets timestep = 1000 t."""
  d, model = refs[name]
  cfg = wan.WanConfig.from_diffusers(cw.read_config(d))
  args = _inputs(name, shape)
  ref, ours = _torch_out(model, *args), np.asarray(_apply(cfg)(cw.load_expert(d), *args))
  err = np.abs(ours - ref).max()
  print(f"parity {name} FHW={shape}: max-abs {err:.3e}, rel {err / np.abs(ref).max():.3e} "
        f"(max |ref| {np.abs(ref).max():.2f})")
  assert err <= 1e-5


def test_scanned_load_and_export_roundtrip(refs, tmp_path):
  """Scanned and unscanned loads agree; the export is the source state dict bit for bit, in
  shards, and diffusers loads it back to the same outputs."""
  d, model = refs["i2v"]
  cfg = wan.WanConfig.from_diffusers(cw.read_config(d), scan_layers=True)
  params = cw.load_expert(d, cfg)
  assert params["blocks"]["attn1"]["to_q"]["kernel"].shape == (2, 32, 32)
  args = _inputs("i2v", (2, 4, 4))
  unscanned = _apply(dataclasses.replace(cfg, scan_layers=False))(cw.load_expert(d), *args)
  np.testing.assert_allclose(np.asarray(_apply(cfg)(params, *args)), np.asarray(unscanned),
                             atol=1e-6)
  cw.export_diffusers(params, cfg, tmp_path, max_shard_bytes=20_000)
  assert os.path.exists(tmp_path / (cw.WEIGHTS + ".index.json"))
  jax.tree.map(np.testing.assert_array_equal, cw.load_expert(tmp_path, cfg), params)
  back = diffusers.WanTransformer3DModel.from_pretrained(tmp_path).eval()
  src, new = model.state_dict(), back.state_dict()
  assert sorted(src) == sorted(new)
  for k in src:
    assert torch.equal(src[k], new[k]), k
  np.testing.assert_allclose(_torch_out(back, *args), _torch_out(model, *args), atol=1e-6)


def test_two_expert_root(refs, tmp_path):
  """A Wan2.2 root: transformer/ (high noise) and transformer_2/ (low noise) + boundary."""
  for sub, name in (("transformer", "t2v"), ("transformer_2", "t2v")):
    shutil.copytree(refs[name][0], tmp_path / sub)
  (tmp_path / "model_index.json").write_text(json.dumps({"boundary_ratio": 0.875}))
  experts = cw.load_experts(tmp_path)
  assert set(experts) == {"transformer", "transformer_2"}
  assert cw.boundary_ratio(tmp_path) == 0.875
  assert set(cw.load_experts(tmp_path / "transformer")) == {"transformer"}


def _variant(src, dst, edit):
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  sd = load_file(os.path.join(src, cw.WEIGHTS))
  edit(sd)
  save_file(sd, os.path.join(dst, cw.WEIGHTS))
  return dst


def test_errors_name_the_key(refs, tmp_path):
  d = refs["t2v"][0]
  bad = _variant(d, tmp_path / "missing", lambda sd: sd.pop("blocks.1.attn2.to_k.bias"))
  with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.attn2\.to_k\.bias'\]"):
    cw.load_expert(bad)
  bad = _variant(d, tmp_path / "extra", lambda sd: sd.update(
      {"blocks.0.attn1.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.0\.attn1\.extra\.weight'\]"):
    cw.load_expert(bad)
  ok = _variant(d, tmp_path / "ignored", lambda sd: sd.update(
      {"blocks.0.attn2.norm_added_q.weight": np.zeros(32, np.float32)}))
  cw.load_expert(ok)  # ignored, as diffusers' _keys_to_ignore_on_load_unexpected
  bad = _variant(d, tmp_path / "shape", lambda sd: sd.update(
      {"blocks.0.ffn.net.0.proj.weight": np.zeros((65, 32), np.float32)}))
  with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.net\.0\.proj\.weight: checkpoint shape "
                     r"\(65, 32\) != expected shape \(64, 32\)"):
    cw.load_expert(bad)
  with pytest.raises(ValueError, match="num_layers"):
    cw.load_expert(d, wan.tiny(num_layers=3))


def test_bf16_read_bit_exact(refs, tmp_path):
  d, model = refs["i2v"]
  model_bf16 = diffusers.WanTransformer3DModel(**TINY, **VARIANTS["i2v"][0])
  model_bf16.load_state_dict(model.state_dict())
  model_bf16.to(torch.bfloat16).save_pretrained(tmp_path)
  cfg = wan.WanConfig.from_diffusers(cw.read_config(d), param_dtype="bfloat16",
                                     dtype="bfloat16")
  params = cw.load_expert(tmp_path, cfg)
  stored = model_bf16.state_dict()
  n_bf16 = 0
  for e in cw.key_map(cfg):
    ours = np.asarray(cw._get(params, e.path))  # pylint: disable=protected-access
    ours = cw._to_diffusers(e.kind, ours, e.shape)  # pylint: disable=protected-access
    ref = stored[e.key]
    assert ref.dtype == torch.bfloat16
    if ours.dtype == jnp.bfloat16:  # bits equal
      n_bf16 += 1
      assert np.array_equal(ours.view(np.uint16), ref.view(torch.int16).numpy().view(np.uint16))
    else:  # fp32-kept leaves (time embedder, tables, LayerNorms): exact upcast
      assert np.array_equal(ours, ref.float().numpy()), e.key
  assert n_bf16 > 20


def test_sharded_load_8_devices(refs):
  """Each leaf lands directly on its logical-axis sharding (embed -> fsdp over 8 devices)."""
  assert jax.device_count() == 8
  d = refs["t2v"][0]
  cfg = wan.WanConfig.from_diffusers(cw.read_config(d), scan_layers=True)
  mesh = sharding.make_mesh(1, 8)
  rules = {"embed": "fsdp"}
  specs = wan.param_specs(cfg)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, P(*[rules.get(n) for n in s])), specs,
                           is_leaf=lambda x: isinstance(x, P))
  params = cw.load_expert(d, cfg, shardings)
  plain = cw.load_expert(d, cfg)
  n_split = 0
  for (path, x), s, y in zip(jax.tree_util.tree_leaves_with_path(params),
                             jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, P)),
                             jax.tree.leaves(plain)):
    assert x.sharding == s, path
    if "fsdp" in s.spec:
      n_split += 1
      assert all(sh.data.size == x.size // 8 for sh in x.addressable_shards), path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert n_split >= 20


def test_lora_merge_and_export(refs, tmp_path):
  d, _ = refs["t2v"]
  cfg = wan.WanConfig.from_diffusers(cw.read_config(d))
  params = cw.load_expert(d)
  rng = np.random.default_rng(0)
  lora = {path: {"a": jnp.asarray(rng.normal(size=(32, 4)), jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(4, out)), jnp.float32)}
          for path, out in (("blocks/0/attn1/to_q/kernel", 32), ("blocks/1/ffn/fc1/kernel", 64))}
  scale = 0.5
  merged = cw.merge_lora(params, lora, scale)
  # Merged export loads into diffusers and reproduces our merged model.
  cw.export_diffusers(params, cfg, tmp_path / "merged", lora=(lora, scale))
  back = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
  args = _inputs("t2v", (1, 4, 4))
  np.testing.assert_allclose(_torch_out(back, *args), np.asarray(_apply(cfg)(merged, *args)),
                             atol=1e-5)
  # LoRA-only file: PEFT keys/shapes; W + B A equals the merged kernel.
  cw.export_lora(lora, tmp_path / "lora", scale=scale)
  sd = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
  assert sorted(sd) == sorted(f"transformer.{m}.lora_{ab}.weight" for m in
                              ("blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj") for ab in "AB")
  assert sd["transformer.blocks.1.ffn.net.0.proj.lora_A.weight"].shape == (4, 32)
  assert sd["transformer.blocks.1.ffn.net.0.proj.lora_B.weight"].shape == (64, 4)
  src, new = load_file(os.path.join(d, cw.WEIGHTS)), back.state_dict()
  for m in ("blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj"):
    lora_b, lora_a = (sd[f"transformer.{m}.lora_{ab}.weight"] for ab in "BA")
    w = src[m + ".weight"] + lora_b @ lora_a
    np.testing.assert_allclose(w, new[m + ".weight"].numpy(), atol=1e-5)
  # Stacked (scan_layers) LoRA: one PEFT entry per layer, same merge.
  scfg = wan.WanConfig.from_diffusers(cw.read_config(d), scan_layers=True)
  q = lora["blocks/0/attn1/to_q/kernel"]
  stacked = {"blocks/attn1/to_q/kernel": {k: jnp.stack([q[k]] * 2) for k in "ab"}}
  smerged = cw.merge_lora(cw.load_expert(d, scfg), stacked, scale)
  np.testing.assert_allclose(smerged["blocks"]["attn1"]["to_q"]["kernel"][0],
                             merged["blocks"][0]["attn1"]["to_q"]["kernel"], atol=1e-6)
  cw.export_lora(stacked, tmp_path / "slora", scale=scale)
  keys = load_file(tmp_path / "slora" / "pytorch_lora_weights.safetensors")
  assert {k.split(".lora")[0] for k in keys} == {"transformer.blocks.0.attn1.to_q",
                                                 "transformer.blocks.1.attn1.to_q"}
  with pytest.raises(ValueError, match="not a parameter"):
    cw.merge_lora(params, {"blocks/7/attn1/to_q/kernel": lora["blocks/0/attn1/to_q/kernel"]}, 1.0)
