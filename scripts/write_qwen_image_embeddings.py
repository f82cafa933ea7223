r"""Writes the prompt-embedding file of a Qwen-Image distillation run (``config.data.embeddings``).

Format ``pdmd_jax.wan_embeddings.v1`` (pdmd_jax/families/prompts.py), a .safetensors (or .npz)
file with
  context        [N, L, 3584]  Qwen2.5-VL last hidden states of each prompt, the chat
                 template's 34 leading tokens dropped (QwenImagePipeline.encode_prompt), zeroed
                 past each prompt's tokens; L = the longest prompt (<= 1024)
  mask           [N, L]        uint8 1 at each prompt's valid tokens (ragged lengths: the
                 transformer's text attention masks the rest)
  negative       [L', 3584]    the negative prompt's states (true CFG's unconditional branch;
                 default " ", as the pipeline's examples)
  negative_mask  [L']          its valid tokens
and metadata: ``prompts`` (JSON list), ``negative_prompt``, ``encoder``, ``text_len``. Each
training sample draws one prompt uniformly; the table sits on every device.

Three sources:

1. Qwen2.5-VL from a diffusers Qwen-Image repo, exactly as QwenImagePipeline.encode_prompt
   (needs torch, transformers and diffusers; a GPU, or slowly a CPU; only the repo's
   text_encoder/ and tokenizer/ are read):
     huggingface-cli download Qwen/Qwen-Image --local-dir weights/Qwen-Image \
       --include 'text_encoder/*' 'tokenizer/*'
     python scripts/write_qwen_image_embeddings.py --prompts prompts.txt \
       --model weights/Qwen-Image --out weights/qwen_image_prompts.safetensors --device cuda
2. Arrays your own encoder wrote (.npy; context [N, L, 3584] zero-padded, optional masks):
     python scripts/write_qwen_image_embeddings.py --prompts prompts.txt --from_npy ctx.npy \
       [--mask_npy mask.npy] --negative_npy neg.npy [--negative_mask_npy neg_mask.npy] --out p.npz
   (without masks, the non-zero tokens are the valid ones)
3. A seeded random stand-in (tests, tiny runs; when torch or the weights are absent):
     python scripts/write_qwen_image_embeddings.py --random 16 --text_dim 3584 --length 64 \
       --out r.npz

prompts.txt: one prompt per line (blank lines skipped).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pdmd_jax.families import prompts as embeddings_lib  # noqa: E402  pylint: disable=wrong-import-position
from pdmd_jax.families.qwen_image import weights  # noqa: E402  pylint: disable=wrong-import-position


def read_prompts(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def stack_ragged(batches) -> tuple[np.ndarray, np.ndarray]:
  """(context [N, L, D] zero-padded to the longest prompt, mask [N, L] bool) from batches of
  (states [B, L_b, D], mask [B, L_b] or None = all valid), each padded to its own longest."""
  rows, masks = [], []
  for states, mask in batches:
    states = np.asarray(states, np.float32)
    mask = np.ones(states.shape[:2], bool) if mask is None else np.asarray(mask).astype(bool)
    for s, m in zip(states, mask):
      rows.append(s[m])                        # the prompt's valid tokens (prefix or not)
      masks.append(int(m.sum()))
  length = max(masks)
  context = np.zeros((len(rows), length, rows[0].shape[-1]), np.float32)
  mask = np.arange(length)[None, :] < np.asarray(masks)[:, None]
  for i, r in enumerate(rows):
    context[i, :len(r)] = r
  return context, mask


def encode(prompts: list[str], encode_prompt: Callable, batch_size: int = 8):
  """(context [N, L, D], mask [N, L]) of ``prompts`` through ``encode_prompt(list) ->
  (states, mask or None)`` (QwenImagePipeline.encode_prompt's contract), batch by batch."""
  batches = []
  for i in range(0, len(prompts), batch_size):
    batches.append(encode_prompt(prompts[i:i + batch_size]))
    print(f"encoded {min(i + batch_size, len(prompts))}/{len(prompts)}", flush=True)
  return stack_ragged(batches)


def qwen_encoder(model: str, *, device: str = "cpu", dtype: str = "bfloat16",
                 max_length: int = weights.MAX_TEXT_LEN) -> Callable:
  """encode_prompt(list of prompts) -> (states, mask) of diffusers' QwenImagePipeline with only
  its text encoder (Qwen2.5-VL) and tokenizer loaded from ``model`` (repo id or local root)."""
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import QwenImagePipeline  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration  # pylint: disable=import-outside-toplevel
  tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
  tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
  encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
      model, subfolder="text_encoder", torch_dtype=tdtype).to(device).eval()
  pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=tokenizer,
                           transformer=None)

  def encode_prompt(batch):
    with torch.no_grad():
      states, mask = pipe.encode_prompt(batch, device=torch.device(device),
                                        max_sequence_length=max_length)
    return (states.float().cpu().numpy(), None if mask is None else mask.cpu().numpy())
  return encode_prompt


def _store(x: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return x.astype(ml_dtypes.bfloat16)
  return x.astype(np.float16 if dtype == "float16" else np.float32)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help=".safetensors or .npz")
  p.add_argument("--prompts", help="text file, one prompt per line")
  p.add_argument("--model", help="diffusers Qwen-Image repo id or root (text_encoder/, tokenizer/)")
  p.add_argument("--from_npy", help="context [N, L, D] written by your own encoder")
  p.add_argument("--mask_npy", help="mask [N, L] of --from_npy (default: non-zero tokens)")
  p.add_argument("--negative_npy", help="negative embedding [L, D] (with --from_npy)")
  p.add_argument("--negative_mask_npy", help="mask [L] of --negative_npy")
  p.add_argument("--negative_prompt", default=weights.NEGATIVE_PROMPT,
                 help="encoded with --model (default: a space, as the pipeline's examples)")
  p.add_argument("--random", type=int, default=0, help="write N random stand-in prompts")
  p.add_argument("--text_dim", type=int, default=3584)
  p.add_argument("--length", type=int, default=64, help="tokens of the random stand-in")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max_length", type=int, default=weights.MAX_TEXT_LEN)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--device", default="cpu")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  a = p.parse_args(argv)

  if a.random:
    emb = embeddings_lib.random_embeddings(a.random, a.length, a.text_dim, seed=a.seed)
  else:
    if not a.prompts:
      p.error("--prompts is required (or --random N)")
    prompts = read_prompts(a.prompts)
    negative = neg_mask = None
    negative_prompt = ""
    if a.from_npy:
      context = np.load(a.from_npy)
      mask = np.load(a.mask_npy) if a.mask_npy else None
      context, mask = stack_ragged([(context, mask if mask is not None else
                                     np.any(context != 0, axis=-1))])
      if a.negative_npy:
        neg = np.load(a.negative_npy)
        nm = (np.load(a.negative_mask_npy) if a.negative_mask_npy
              else np.any(neg.reshape(-1, neg.shape[-1]) != 0, axis=-1))
        (negative,), (neg_mask,) = stack_ragged([(neg.reshape(1, -1, neg.shape[-1]),
                                                  np.reshape(nm, (1, -1)))])
        negative_prompt = "(from --negative_npy)"
      encoder = f"user arrays ({os.path.basename(a.from_npy)})"
    elif a.model:
      try:
        fn = qwen_encoder(a.model, device=a.device, dtype=a.dtype, max_length=a.max_length)
      except (ImportError, OSError, ValueError) as e:   # no torch stack, no weights
        p.error(f"cannot run Qwen2.5-VL from --model {a.model!r} ({type(e).__name__}: {e}). It "
                "needs torch, transformers and diffusers (pip install -e '.[torch]') and the "
                f"repo's text_encoder/ and tokenizer/ (huggingface-cli download {weights.HF_REPO} "
                "--include 'text_encoder/*' 'tokenizer/*'); without them, --random N writes a "
                "seeded stand-in of the same format (tiny runs and tests only)")
      context, mask = encode(prompts, fn, a.batch_size)
      (negative,), (neg_mask,) = encode([a.negative_prompt], fn)
      negative_prompt = a.negative_prompt
      encoder = f"Qwen2.5-VL ({a.model} text_encoder, QwenImagePipeline.encode_prompt)"
    else:
      p.error("give --model (encode with Qwen2.5-VL) or --from_npy (your own arrays)")
    if len(prompts) != len(context):
      p.error(f"{len(prompts)} prompts but {len(context)} context rows")
    emb = embeddings_lib.Embeddings(
        context=_store(context, a.dtype), mask=mask,
        negative=None if negative is None else _store(negative, a.dtype),
        negative_mask=neg_mask, prompts=prompts, negative_prompt=negative_prompt,
        encoder=encoder, text_len=a.max_length)
  embeddings_lib.save_embeddings(a.out, emb)
  print(f"Wrote {a.out}: context {tuple(emb.context.shape)} {emb.context.dtype} (longest prompt "
        f"{int(emb.masks()[0].sum(1).max())} tokens), negative "
        f"{None if emb.negative is None else tuple(emb.negative.shape)}")


if __name__ == "__main__":
  main()
