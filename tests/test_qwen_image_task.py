"""Qwen-Image family: true CFG + per-token rescale, LoRA experts on one backbone, validation,
embeddings with masks, the abstract (planner) build, and the tiny run end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdmd_jax import aot
from pdmd_jax import assembly
from pdmd_jax import configs
from pdmd_jax import sampling
from pdmd_jax import teachers
from pdmd_jax import trainer
from pdmd_jax import validation
from pdmd_jax.families import prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = jax.devices()[:1]


def _config(arg=""):
  return configs.load("configs/qwen_image.py" + (f":{arg}" if arg else ""))


@pytest.fixture(scope="module")
def tiny_run():
  """configs/qwen_image.py:tiny built as the trainer builds it, on one device."""
  return trainer.build(_config("tiny"), devices=ONE)


# ---------------------------------------------------------------------------------------------
# True CFG + the pipeline's per-token norm rescale
# ---------------------------------------------------------------------------------------------

def _pack(x, p=2):
  """diffusers' QwenImagePipeline._pack_latents: [B, C, H, W] -> [B, (H/p)(W/p), C p p]."""
  b, c, h, w = x.shape
  return x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)


def _unpack(x, c, h, w, p=2):
  b = x.shape[0]
  return x.reshape(b, h // p, w // p, c, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _diffusers_true_cfg(cond, neg, scale):
  """pipeline_qwenimage.py on packed tokens: comb = neg + s (cond - neg), then
  comb * ||cond|| / ||comb|| with norms over each token's channels (dim=-1)."""
  b, c, h, w = cond.shape
  cond, neg = _pack(np.asarray(cond, np.float64)), _pack(np.asarray(neg, np.float64))
  comb = neg + scale * (cond - neg)
  out = comb * (np.linalg.norm(cond, axis=-1, keepdims=True) /
                np.linalg.norm(comb, axis=-1, keepdims=True))
  return _unpack(out, c, h, w)


def test_true_cfg_with_the_per_token_rescale_matches_diffusers(tiny_run):
  """teacher.cfg_norm="token": the family's guided velocity is numpy's diffusers formula on the
  model's own conditional and negative-prompt velocities (the mask swapped with the context);
  and on synthetic velocities, every token keeps the conditional's norm."""
  fam = tiny_run.family
  assert fam.teacher.cfg_norm == "token" and fam.teacher.token_block == (4, 2, 2)
  y = fam.sample_cond(jax.random.PRNGKey(0), (3,))
  assert not bool(jnp.all(y["negative_mask"] == y["mask"]))     # ragged, different masks
  x = jax.random.normal(jax.random.PRNGKey(1), (3,) + fam.sample_shape)
  t = jnp.array([1.0, 0.8, 0.3])

  @jax.jit
  def velocities(tp, x, t, y):
    neg = {**y, "context": y["negative"], "mask": y["negative_mask"]}
    return fam.teacher.velocity(tp, x, t, y), fam.apply(tp, x, t, y), fam.apply(tp, x, t, neg)
  v, cond, neg = velocities(fam.teacher_params, x, t, y)
  assert float(jnp.abs(cond - neg).max()) > 1e-2                 # the negative matters
  np.testing.assert_allclose(v, _diffusers_true_cfg(cond, neg, 4.0), rtol=1e-5, atol=1e-5)

  # Synthetic: the Teacher alone, a non-square [2, 8, 6, 10] latent in 2 x 2 tokens.
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  v_c, v_u = jax.random.normal(k1, (2, 8, 6, 10)), jax.random.normal(k2, (2, 8, 6, 10))
  apply = lambda p, x, t, y: jnp.where(y["uncond"][:, None, None, None], v_u, v_c)
  teacher = teachers.network_teacher(apply, 0, 2.5, "token", token_block=(8, 2, 2),
                                     null_cond=lambda y: {"uncond": ~y["uncond"]})
  out = teacher.velocity(None, v_c, t[:2], {"uncond": jnp.zeros(2, bool)})
  np.testing.assert_allclose(out, _diffusers_true_cfg(v_c, v_u, 2.5), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(_pack(np.asarray(out)), axis=-1),
                             np.linalg.norm(_pack(np.asarray(v_c)), axis=-1), rtol=1e-5)
  with pytest.raises(ValueError, match="token_block"):
    teachers.network_teacher(apply, 0, 2.5, "token")
  with pytest.raises(ValueError, match="does not tile"):
    teachers.rescale(v_c, v_u, (8, 4, 4))


# ---------------------------------------------------------------------------------------------
# Two LoRA experts on one shared backbone
# ---------------------------------------------------------------------------------------------

def test_lora_experts_share_the_one_backbone(tiny_run):
  """Each phase's expert is a LoRA tree on the frozen teacher (one apply for both): at init
  the few-step sampler equals the teacher's Euler steps on the grid; the trainer's phase-2 step
  moves phase 2's LoRA (every B), never phase 1's nor the teacher (the shared backbone)."""
  run = tiny_run
  fam = run.family
  state = run.asm.initial_state(1)                 # phase 2's layout: expert 0 frozen
  assert callable(fam.expert_apply(fam.teacher_params))    # one backbone, not one per phase
  lora = state.experts[1]
  assert lora.keys() == state.experts[0].keys()
  assert all(k.startswith("transformer_blocks.") and k.endswith(".kernel") for k in lora)
  assert {k.split(".")[-2] for k in lora} >= {"to_q", "add_q_proj", "fc1", "fc2"}
  assert sum(x.size for x in jax.tree.leaves(lora)) < 0.5 * sum(
      x.size for x in jax.tree.leaves(fam.teacher_params))
  assert state.expert_opt[0] is None and state.fakes[0] is None
  z = jax.random.normal(jax.random.PRNGKey(0), (2,) + run.sample_shape)
  y = fam.sample_cond(jax.random.PRNGKey(1), (2,))

  @jax.jit
  def samples(experts, tp, z, y):
    few = sampling.few_step_sample(run.plan, run.step_cfg.experts_apply(tp), experts, z, y)
    plain = sampling.few_step_sample(run.plan, fam.apply, (tp, tp), z, y)
    return few[-1], plain[-1]
  few, plain = samples(state.experts, run.teacher_params, z, y)
  np.testing.assert_allclose(few, plain, rtol=1e-5, atol=1e-5)

  before = jax.device_get(state)
  teacher_before = jax.device_get(run.teacher_params)
  batch = trainer.batch_for_step(run, 0)
  step = run.asm.lower(1, state, run.teacher_params, batch).compile()   # the trainer's program
  new, m = step(state, run.teacher_params, batch)
  after = jax.device_get(new)
  assert np.isfinite(float(m["gen_grad_norm"])) and float(m["gen_grad_norm"]) > 0
  same = lambda a, b: all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a),
                                                                jax.tree.leaves(b)))
  assert same(before.experts[0], after.experts[0])              # the frozen phase-1 LoRA
  assert all(not np.array_equal(before.experts[1][k]["b"], after.experts[1][k]["b"])
             for k in lora)                                     # every B of phase 2's LoRA
  assert same(teacher_before, jax.device_get(run.teacher_params))
  assert int(after.step) == 1


# ---------------------------------------------------------------------------------------------
# Validation: fields, files, embeddings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("generator.lora_rank", -1, r"generator.lora_rank=-1.*an integer >= 0"),
    ("fake.lora_rank", -2, r"fake.lora_rank=-2.*an integer >= 0"),
    ("num_steps", 8, r"grid_times=\(1.0, 0.9, 0.75, 0.5, 0.0\).*9 values"),
    ("num_phases", 3, r"num_phases=3.*a divisor of num_steps=4"),
    ("data.height", 40, r"data.height=40.*a multiple of 16"),
    ("data.text_len", 2048, r"data.text_len=2048.*at most 1024"),
    ("teacher.cfg_norm", "layer", r"teacher.cfg_norm='layer'.*\['none', 'sample', 'token'\]"),
    ("model.remat", "some", r"model.remat='some'.*allowed"),
    ("model.dtype", "float16", r"model.dtype='float16'.*\['float32', 'bfloat16'\]"),
    ("eval.decode", -1, r"eval.decode=-1.*an integer >= 0"),
    ("gan.enabled", True, r"gan.enabled=True.*False for this teacher family"),
])
def test_bad_fields_name_the_field_and_the_allowed_values(field, value, message):
  c = _config("tiny")
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    validation.validate(c)


def test_missing_weights_and_embeddings_message(tmp_path):
  c = _config()
  c.teacher.path = str(tmp_path / "qwen")
  c.data.embeddings = str(tmp_path / "none.safetensors")
  with pytest.raises(FileNotFoundError) as e:
    validation.validate(c)
  msg = str(e.value)
  for part in ("transformer/config.json", "transformer/diffusion_pytorch_model",
               "huggingface-cli download Qwen/Qwen-Image", "--include 'transformer/*'", ":tiny",
               "write_qwen_image_embeddings.py", "none.safetensors"):
    assert part in msg, part
  c.data.embeddings = ""
  with pytest.raises(ValueError, match=r"data.embeddings=''.*random stand-in.*:tiny"):
    validation.validate(c)


def test_embeddings_checked_against_the_weights_before_loading(tmp_path):
  """Embeddings vs transformer/config.json (shapes, masks, the negative CFG needs): headers
  only, the weights are never read."""
  from pdmd_jax.models import qwen_image as qi  # pylint: disable=import-outside-toplevel
  d = tmp_path / "qwen" / "transformer"
  os.makedirs(d)
  (d / "config.json").write_text(json.dumps(qi.QWEN_IMAGE_20B.to_diffusers()))
  (d / "diffusion_pytorch_model.safetensors").write_text("")   # never read
  c = _config()
  c.teacher.path, c.data.embeddings = str(tmp_path / "qwen"), str(tmp_path / "e.safetensors")
  prompts.save_embeddings(c.data.embeddings, prompts.random_embeddings(2, 4, 3584))
  validation.validate(c)                        # files in place: validation passes
  prompts.save_embeddings(c.data.embeddings, prompts.random_embeddings(2, 4, 4096))
  with pytest.raises(ValueError, match=r"embeddings.*joint_attention_dim=3584"):
    validation.validate(c)
  emb = prompts.random_embeddings(2, 4, 3584)
  emb.negative = emb.negative_mask = None
  prompts.save_embeddings(c.data.embeddings, emb)
  with pytest.raises(ValueError, match=r"no 'negative'.*true CFG"):
    validation.validate(c)
  c.data.text_len = c.data.random_length = 3
  with pytest.raises(ValueError, match=r"4 tokens > config.data.text_len=3"):
    validation.validate(c)


def test_embedding_file_masks_round_trip(tmp_path):
  """The format's optional masks: written and read back (.npz and .safetensors), by the writer
  script's ragged stacking too; the conditioning sampler carries them and CFG swaps them."""
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import write_qwen_image_embeddings as writer  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  # Two batches padded to their own longest prompt (3 and 5 tokens), masks as encode_prompt's.
  b1 = rng.standard_normal((2, 3, 6)).astype(np.float32), np.array([[1, 1, 0], [1, 1, 1]])
  b2 = rng.standard_normal((1, 5, 6)), None                     # None: every token valid
  context, mask = writer.stack_ragged([b1, b2])
  assert context.shape == (3, 5, 6) and mask.sum(1).tolist() == [2, 3, 5]
  np.testing.assert_array_equal(context[0, :2], b1[0][0, :2])
  assert not context[0, 2:].any()
  for ext in ("npz", "safetensors"):
    path = str(tmp_path / f"e.{ext}")
    writer.main(["--random", "3", "--text_dim", "6", "--length", "5", "--out", path])
    emb = prompts.load_embeddings(path)
    ref = prompts.random_embeddings(3, 5, 6)
    np.testing.assert_array_equal(emb.mask, ref.mask)
    np.testing.assert_array_equal(emb.negative_mask, ref.negative_mask)
    assert prompts.embedding_shapes(path)["mask"] == (3, 5)
  cond = prompts.make_cond_fn(emb, masks=True)(jax.random.PRNGKey(0), (4,))
  np.testing.assert_array_equal(cond["mask"], emb.mask[cond["index"]])
  neg = prompts.negative_cond(cond)
  np.testing.assert_array_equal(neg["mask"], np.broadcast_to(emb.negative_mask, (4, 5)))
  assert "mask" not in prompts.make_cond_fn(emb)(jax.random.PRNGKey(0), (4,))   # Wan: none


def _tiny_text_encoder(root):
  """A diffusers-layout root with a random 2-layer Qwen2.5-VL (hidden 24) in text_encoder/ and a
  word-level tokenizer of the chat template's words in tokenizer/ (no download). Words,
  punctuation and newlines are tokens, so the template's system part is 34 tokens, as with
  Qwen's own tokenizer (the pipeline drops exactly those)."""
  import torch  # pylint: disable=import-outside-toplevel
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig,  # pylint: disable=import-outside-toplevel
                            Qwen2_5_VLForConditionalGeneration)
  words = ("system user assistant Describe the image by detailing color shape size texture "
           "quantity text spatial relationships of objects and background a cat on mat red "
           "blue sky , : .").split() + ["\n"]
  specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>"]
  vocab = {w: i for i, w in enumerate(specials + words)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
      pre_tokenizers.Split(Regex(r"\n|[,:.]"), behavior="isolated")])
  PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                          additional_special_tokens=specials[:2]).save_pretrained(
                              os.path.join(root, "tokenizer"))
  cfg = Qwen2_5_VLConfig(
      text_config=dict(vocab_size=len(specials) + len(words), hidden_size=24,
                       intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
                       rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}),
      vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                         out_hidden_size=24, fullatt_block_indexes=[0]))
  torch.manual_seed(0)
  Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(os.path.join(root, "text_encoder"))
  return root


@pytest.mark.slow
def test_writer_runs_qwen_image_pipeline_encode_prompt(tmp_path):
  """scripts/write_qwen_image_embeddings.py --model on a tiny random Qwen2.5-VL: in batches of 2
  the file's context and masks equal QwenImagePipeline.encode_prompt on all prompts at once
  (its template dropped, padded to the longest), the negative " " too."""
  pytest.importorskip("diffusers")
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import write_qwen_image_embeddings as writer  # pylint: disable=import-outside-toplevel
  root = _tiny_text_encoder(str(tmp_path / "qwen"))
  lines = ["a cat on the mat", "red sky", "blue", "a red cat on a blue mat ."]
  (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n\n")
  out = str(tmp_path / "e.safetensors")
  writer.main(["--prompts", str(tmp_path / "prompts.txt"), "--model", root, "--out", out,
               "--dtype", "float32", "--batch_size", "2"])
  emb = prompts.load_embeddings(out)
  assert emb.prompts == lines and emb.negative_prompt == " " and "Qwen2.5-VL" in emb.encoder
  from diffusers import QwenImagePipeline  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration  # pylint: disable=import-outside-toplevel
  pipe = QwenImagePipeline(
      scheduler=None, vae=None, transformer=None,
      tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer"),
      text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(root,
                                                                      subfolder="text_encoder"))
  with torch.no_grad():
    ref, ref_mask = pipe.encode_prompt(lines, device=torch.device("cpu"))
    neg, neg_mask = pipe.encode_prompt([" "], device=torch.device("cpu"))
  ref_mask = np.ones(ref.shape[:2], bool) if ref_mask is None else ref_mask.numpy().astype(bool)
  assert len(set(ref_mask.sum(1).tolist())) > 1                 # ragged lengths
  np.testing.assert_array_equal(emb.mask, ref_mask)
  np.testing.assert_allclose(emb.context, ref.numpy() * ref_mask[..., None], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(emb.negative, neg.numpy()[0], rtol=1e-5, atol=1e-6)
  assert emb.negative_mask.all() and (neg_mask is None or neg_mask.numpy().all())


def test_main_without_weights_stops_with_the_message(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PDMD_JAX_CACHE": ""}
  r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                      "--config=" + os.path.join(ROOT, "configs", "qwen_image.py"),
                      f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, env=env,
                     cwd=str(tmp_path), timeout=300)   # cwd: weights/... does not exist
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  for part in ("transformer/config.json", "huggingface-cli download Qwen/Qwen-Image",
               "write_qwen_image_embeddings.py"):
    assert part in r.stderr, part
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


# ---------------------------------------------------------------------------------------------
# The planner's abstract build
# ---------------------------------------------------------------------------------------------

def test_abstract_build_reads_no_file_and_the_tiny_phase_step_compiles(tmp_path):
  """Planning Qwen-Image 20B needs neither weights nor embeddings (the published architecture,
  data.text_len tokens); the planner compiles the tiny abstract phase step."""
  c = _config()
  c.teacher.path, c.data.embeddings = str(tmp_path / "none"), str(tmp_path / "none.safetensors")
  c.model.num_layers, c.train.batch_size = 1, 1
  asm = assembly.build(c, devices=ONE, abstract=True)
  cfg = asm.family.extras["qwen_config"]
  assert (cfg.dim, cfg.num_layers, cfg.joint_attention_dim) == (3072, 1, 3584)
  assert asm.family.sample_shape == (16, 166, 166)          # 1328 x 1328
  assert asm.family.attention_shape == (83 * 83 + 1024, 24)
  y = asm.abstract_batch()["y"]
  assert y["context"].shape == (6, 1, 1024, 3584) and y["context"].dtype == np.dtype("bfloat16")
  assert y["mask"].shape == (6, 1, 1024)
  lora = asm.family.expert_init
  assert lora["transformer_blocks.attn.to_q.kernel"]["a"].shape == (1, 3072, 64)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(asm.family.fake_init))
  with pytest.raises(FileNotFoundError, match="transformer/config.json"):
    assembly.build(c, devices=ONE)                          # the trainer needs the files
  planned = assembly.build(_config("tiny"), devices=ONE, abstract=True)
  # What python -m pdmd_jax.aot runs; the trainer's own program (tests/test_aot.py), so the
  # persistent cache usually holds it from the end-to-end run already.
  r = aot.compile_phase_step(planned, 1, count_flops=False)
  assert r["memory"]["temp"] > 0 and r["memory"]["argument"] > 0


# ---------------------------------------------------------------------------------------------
# End to end: configs/qwen_image.py:tiny, the trainer and the sampler
# ---------------------------------------------------------------------------------------------

def _tiny_vae(path):
  """A random AutoencoderKLQwenImage of the tiny model's 4 latent channels (None: no diffusers)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from diffusers import AutoencoderKLQwenImage  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  torch.manual_seed(0)
  AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                         latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(path)
  return path


@pytest.mark.long
def test_tiny_end_to_end(tmp_path):
  """train_and_evaluate on :tiny (one update per phase, eval at the phase boundary), then
  sample_to_npz from its checkpoint on the 8 test devices (context-sharded tokens)."""
  c = _config("tiny")
  vae = _tiny_vae(str(tmp_path / "vae"))
  if vae:
    c.eval.vae_path, c.eval.decode = vae, 2
  w = str(tmp_path / "run")
  out = trainer.train_and_evaluate(c, w, devices=ONE, verbose=False)
  assert out["step"] == 2 and np.isfinite(out["mse_to_teacher"]) and out["teacher/diversity"] > 0
  assert out["boundary_1/t"] == 0.75 and np.isfinite(out["boundary_1/mse_to_teacher"])
  assert "phase_1" in out["phases"]
  m = json.load(open(os.path.join(w, "metrics.json")))
  assert m["step"] == 2 and set(m["memory_by_phase"]) == {"0", "1"}
  lat = np.load(os.path.join(w, "latents_final.npz"))
  assert lat["student"].shape == (2, 4, 4, 6) and np.all(np.isfinite(lat["student"]))
  assert lat["trajectory"].shape == (5, 2, 4, 4, 6)
  assert os.path.isdir(os.path.join(w, "checkpoints", "2"))
  if vae:
    img = np.load(os.path.join(w, "images_final.npz"))["images"]
    assert img.shape == (2, 32, 48, 3) and img.dtype == np.uint8
  c.mesh.fsdp, c.mesh.context = 1, -1        # sample_to_npz runs on every (8) test device
  s = np.load(trainer.sample_to_npz(c, w))
  assert s["samples"].shape == (2, 4, 4, 6) and set(s["labels"].tolist()) <= set(range(16))
  # the restored experts sample what the run's own evaluation sampled (same noise and prompts)
  np.testing.assert_allclose(s["samples"], lat["student"], rtol=1e-4, atol=1e-4)
