"""diffusers QwenImageTransformer2DModel folders <-> pdmd_jax Qwen-Image params: sharded and
single-file loads, bit-exact round trips (fp32, bf16), shard-on-load over 8 devices, errors
naming keys and files, LoRA exports loaded back by diffusers (PEFT and ComfyUI namings)."""

import os
import re
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from pdmd_jax import sharding  # noqa: E402
from pdmd_jax.convert import qwen_image as cq  # noqa: E402
from pdmd_jax.models import lora as lora_lib  # noqa: E402
from pdmd_jax.models import qwen_image as qi  # noqa: E402
# The parity tests' reference model (fixture ``ref``), diffusers call, inputs and file editing.
from test_convert_wan import _variant  # noqa: E402
from test_qwen_image import MASKS, TINY, _apply, _inputs, _torch_bf16, _torch_out  # noqa: E402
from test_qwen_image import ref  # noqa: E402,F401  (the fixture)

from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin  # noqa: E402

HW = (4, 6)


@pytest.fixture(scope="module")
def dirs(ref, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """(the float32 diffusers model of test_qwen_image, a pipeline root with it in transformer/
  as 20 kB shards + index, a folder with it as one file)."""
  model, _ = ref
  root = tmp_path_factory.mktemp("root")
  model.save_pretrained(root / "transformer", max_shard_size="20KB")
  single = tmp_path_factory.mktemp("single")
  model.save_pretrained(single)
  return model, root, single


def _state_dict_params(model, **overrides):
  return qi.params_from_state_dict(
      model.state_dict(), qi.QwenImageConfig.from_diffusers(dict(model.config), **overrides))


def _assert_bits_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(
      np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)), a, b)
  assert jax.tree.structure(a) == jax.tree.structure(b)


def _tol(out):
  """float32 round-off between two implementations: 1e-5 of the output's scale (at least 1e-5).
  torch's kernels and ours sum in different orders (1.1e-5 on LoRA outputs of ~10 with torch
  2.13); a wrong mapping or a missed LoRA module moves outputs by the LoRA effect (> 0.1)."""
  return 1e-5 * max(1.0, float(np.abs(out).max()))


def test_sharded_and_single_file_loads(dirs):
  """Root (transformer/ shards + index) == single file == params_from_state_dict, bit for bit;
  scanned loads stack the blocks; outputs equal diffusers'."""
  model, root, single = dirs
  assert len([f for f in os.listdir(root / "transformer") if f.endswith(".safetensors")]) > 4
  assert os.path.exists(root / "transformer" / cq.INDEX)
  params = cq.load_transformer(root)
  _assert_bits_equal(params, _state_dict_params(model))
  _assert_bits_equal(cq.load_transformer(single), params)
  cfg = qi.QwenImageConfig.from_diffusers(cq.read_config(root), scan_layers=True)
  stacked = cq.load_transformer(root / "transformer", cfg)
  assert stacked["transformer_blocks"]["img_mlp"]["fc1"]["kernel"].shape == (2, 32, 128)
  _assert_bits_equal(stacked, _state_dict_params(model, scan_layers=True))
  args = (*_inputs(HW), MASKS)
  theirs = _torch_out(model, *args)
  err = np.abs(np.asarray(_apply(cfg)(stacked, *args)) - theirs).max()
  print(f"loaded (scanned) vs diffusers: max-abs {err:.3e}")
  assert err <= _tol(theirs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_roundtrip_bit_exact(dirs, tmp_path, dtype):
  """ours -> diffusers shards -> ours is the identity; diffusers loads the export to the same
  tensors (bits) and, in float32, the same outputs."""
  model, root, _ = dirs
  cfg = qi.QwenImageConfig.from_diffusers(cq.read_config(root), scan_layers=True,
                                          param_dtype=dtype, dtype=dtype)
  params = cq.load_transformer(root, cfg)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
  cq.export_diffusers(params, cfg, tmp_path, max_shard_bytes=30_000)
  assert os.path.exists(tmp_path / cq.INDEX)
  _assert_bits_equal(cq.load_transformer(tmp_path, cfg), params)
  back = diffusers.QwenImageTransformer2DModel.from_pretrained(
      tmp_path, torch_dtype=getattr(torch, dtype)).eval()
  src, new = model.state_dict(), back.state_dict()
  assert sorted(src) == sorted(new)
  for k in src:
    want = src[k].to(getattr(torch, dtype))
    assert new[k].dtype == want.dtype and torch.equal(new[k], want), k
  if dtype == "float32":
    args = (*_inputs(HW), MASKS)
    err = np.abs(_torch_out(back, *args) - _torch_out(model, *args)).max()
    print(f"exported fp32 model in diffusers vs source: max-abs {err:.3e}")
    assert err == 0


def test_bf16_read_bit_exact(dirs, tmp_path):
  """Stored bf16 (as the published weights) -> bf16 params with the same bits, or the exact
  fp32 upcast."""
  model, _, _ = dirs
  bf16 = _torch_bf16(model)
  bf16.save_pretrained(tmp_path)
  bits = {k: v.view(torch.int16).numpy().view(np.uint16) for k, v in bf16.state_dict().items()}
  for dtype in ("bfloat16", "float32"):
    cfg = qi.tiny(param_dtype=dtype)
    params = cq.load_transformer(tmp_path, cfg)
    for e in cq.key_map(cfg):
      ours = cq.common.to_diffusers(e.kind, np.asarray(cq.common.get_leaf(params, e.path)),
                                    e.shape)
      assert ours.dtype == jnp.dtype(dtype)
      assert np.array_equal(ours.astype(jnp.bfloat16).view(np.uint16), bits[e.key]), e.key
      assert np.array_equal(ours.astype(np.float32),
                            ours.astype(jnp.bfloat16).astype(np.float32)), e.key


def test_sharded_load_8_devices(dirs):
  """Each leaf lands directly on its param_specs-derived sharding (embed -> fsdp over 8
  devices, heads/mlp -> tensor) and equals the unsharded load."""
  assert jax.device_count() == 8
  _, root, _ = dirs
  cfg = qi.QwenImageConfig.from_diffusers(cq.read_config(root), scan_layers=True)
  mesh = sharding.make_mesh(1, 4, tensor=2)
  rules = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor"}
  is_spec = lambda x: isinstance(x, P)  # noqa: E731
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, P(*[rules.get(n) for n in s])),
                           qi.param_specs(cfg), is_leaf=is_spec)
  params, plain = cq.load_transformer(root, cfg, shardings), cq.load_transformer(root, cfg)
  n_split = 0
  for (path, x), s, y in zip(jax.tree_util.tree_leaves_with_path(params),
                             jax.tree.leaves(shardings, is_leaf=is_spec), jax.tree.leaves(plain)):
    assert x.sharding == s, path
    ways = (4 if "fsdp" in s.spec else 1) * (2 if "tensor" in s.spec else 1)
    n_split += ways == 8
    assert all(sh.data.size == x.size // ways for sh in x.addressable_shards), path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert n_split >= 10


def test_errors_name_keys_shapes_and_files(dirs, tmp_path):
  _, root, single = dirs

  def edit(sd):
    sd.pop("transformer_blocks.0.attn.norm_q.weight")
    sd["transformer_blocks.1.img_mod.2.weight"] = np.zeros(3, np.float32)
    sd["transformer_blocks.1.txt_mod.1.weight"] = np.zeros((32, 192), np.float32)
    sd["proj_out.bias"] = np.zeros(17, np.float32)

  bad = _variant(single, tmp_path / "bad", edit)
  with pytest.raises(ValueError) as e:
    cq.load_transformer(bad)
  for part in ("missing keys ['transformer_blocks.0.attn.norm_q.weight']",   # one error, all
               "unexpected keys ['transformer_blocks.1.img_mod.2.weight']",
               "transformer_blocks.1.txt_mod.1.weight: checkpoint shape (32, 192) != "
               "expected shape (192, 32)",
               "proj_out.bias: checkpoint shape (17,) != expected shape (16,)"):
    assert part in str(e.value)
  with pytest.raises(ValueError, match="num_layers=3"):
    cq.load_transformer(single, qi.tiny(num_layers=3))
  with pytest.raises(ValueError, match="neither config.json nor transformer/config.json"):
    cq.load_transformer(tmp_path)
  # A truncated shard (an interrupted download) and a garbage single file: named by path.
  broken = tmp_path / "broken"
  shutil.copytree(root, broken)
  shard = str(broken / "transformer" / sorted(
      f for f in os.listdir(broken / "transformer") if f.endswith(".safetensors"))[1])
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  with pytest.raises(ValueError, match=re.escape(shard) + ".*truncated or corrupt"):
    cq.load_transformer(broken)
  os.remove(shard)   # listed in the index, absent
  with pytest.raises(FileNotFoundError, match=re.escape(shard)):
    cq.load_transformer(broken)
  garbage = tmp_path / "garbage"
  shutil.copytree(single, garbage)
  (garbage / cq.WEIGHTS).write_bytes(b"\xff" * 64)
  with pytest.raises(ValueError, match=re.escape(str(garbage / cq.WEIGHTS))):
    cq.load_transformer(garbage)
  with pytest.raises(ValueError, match="only Linear kernels"):
    cq.export_lora({"txt_norm.scale": {"a": np.zeros((24, 1)), "b": np.zeros((1, 1))}},
                   tmp_path / "lora")


# Targets of different rank and alpha, in and out of the blocks.
LORA = lora_lib.LoraSpec(targets=(
    (r"transformer_blocks\.(\d+\.)?attn\.(to_q|add_k_proj|to_out)\.kernel", 4, 8.0),
    (r"transformer_blocks\.(\d+\.)?(img_mlp\.fc1|txt_mod)\.kernel", 2, 1.0),
    (r"(img_in|norm_out\.linear|time_text_embed\.timestep_embedder\.linear_1)\.kernel", 3, 6.0),
))


@pytest.fixture(scope="module")
def lora_case(dirs):
  """(scanned params, LoRA with random a and b, {path: alpha / r}, merged-model output, base
  output, inputs)."""
  model, root, _ = dirs
  cfg = qi.QwenImageConfig.from_diffusers(cq.read_config(root), scan_layers=True)
  params = cq.load_transformer(root, cfg)
  tree = lora_lib.init(LORA, params, jax.random.key(0))
  rng = np.random.default_rng(1)
  tree = {p: {"a": ab["a"], "b": jnp.asarray(0.3 * rng.standard_normal(ab["b"].shape),
                                             jnp.float32)} for p, ab in tree.items()}
  scales = lora_lib.scales(LORA, tree)
  merged = lora_lib.merge(LORA, params, tree)
  _assert_bits_equal(cq.merge_lora(params, tree, scales), merged)
  args = (*_inputs(HW), MASKS)
  apply = _apply(cfg)
  return params, tree, scales, np.asarray(apply(merged, *args)), _torch_out(model, *args), args


@pytest.mark.parametrize("naming", ["diffusers", "comfyui"])
def test_lora_export_loads_in_diffusers(dirs, lora_case, tmp_path, naming):
  """The LoRA file through the pipeline's own path (QwenImageLoraLoaderMixin.lora_state_dict:
  converts the ComfyUI naming; load_lora_into_transformer: PEFT) gives our merged model."""
  pytest.importorskip("peft")   # diffusers' LoRA backend
  model, _, _ = dirs
  _, tree, scales, ours, base, args = lora_case
  file = cq.export_lora(tree, tmp_path, scale=scales, naming=naming)
  keys = load_file(file)
  if naming == "diffusers":
    a, b = (keys[f"transformer.transformer_blocks.1.img_mlp.net.0.proj.lora_{x}.weight"]
            for x in "AB")
    assert a.shape == (2, 32) and b.shape == (128, 2)
  else:
    name = "diffusion_model.transformer_blocks.1.attn.to_out.0"
    assert keys[f"{name}.lora_down.weight"].shape == (4, 32)
    assert keys[f"{name}.lora_up.weight"].shape == (32, 4)
    assert keys[f"{name}.alpha"].shape == () and keys[f"{name}.alpha"] == 8.0
  # 3 top-level modules + 5 per block x 2 blocks, 2 (or 3) tensors each.
  assert len(keys) == 13 * (2 if naming == "diffusers" else 3)
  lora_model = diffusers.QwenImageTransformer2DModel(**TINY).eval()
  lora_model.load_state_dict(model.state_dict())
  state_dict, metadata = QwenImageLoraLoaderMixin.lora_state_dict(
      str(tmp_path), weight_name=os.path.basename(file), return_lora_metadata=True)
  QwenImageLoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=lora_model,
                                                       metadata=metadata)
  assert sum(hasattr(m, "lora_A") for m in lora_model.modules()) == 13   # every module adapted
  theirs = _torch_out(lora_model, *args)
  err, effect = np.abs(theirs - ours).max(), np.abs(ours - base).max()
  print(f"LoRA ({naming} naming) in diffusers vs our merged model: max-abs {err:.3e} "
        f"(LoRA effect {effect:.2f})")
  assert effect > 0.1 and err <= _tol(ours)


def test_merged_lora_export(dirs, lora_case, tmp_path):
  """export_diffusers(lora=...) writes the merged weights; diffusers reproduces our output."""
  _, root, _ = dirs
  params, tree, scales, ours, _, args = lora_case
  cfg = qi.QwenImageConfig.from_diffusers(cq.read_config(root), scan_layers=True)
  cq.export_diffusers(params, cfg, tmp_path, lora=(tree, scales))
  back = diffusers.QwenImageTransformer2DModel.from_pretrained(tmp_path).eval()
  err = np.abs(_torch_out(back, *args) - ours).max()
  print(f"merged LoRA export in diffusers vs our merged model: max-abs {err:.3e}")
  assert err <= _tol(ours)
  with pytest.raises(ValueError, match="not a parameter"):
    cq.merge_lora(params, {"transformer_blocks.attn.to_z.kernel": tree[next(iter(tree))]}, 1.0)
