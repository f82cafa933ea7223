r"""Writes the prompt-embedding file of a Wan2.2 distillation run (``config.data.embeddings``).

Format ``pdmd_jax.wan_embeddings.v1`` (see pdmd_jax/families/prompts.py): a .safetensors (or .npz)
file with ``context`` [N, L, 4096] umT5 states, positions past each prompt's tokens zeroed
and trailing all-zero positions trimmed (the run zero-pads back to 512), optional
``negative`` [L', 4096] and, for I2V, ``condition`` [N, 20, F, h, w]; the prompts and the
negative prompt are kept as metadata.

Three sources:

1. umT5 from a diffusers Wan repo, exactly as WanPipeline.encode_prompt (needs torch and
   transformers; runs on a GPU or, slowly, a CPU):
     python scripts/write_wan_embeddings.py --prompts prompts.txt \
       --model Wan-AI/Wan2.2-T2V-A14B-Diffusers --out weights/wan22_prompts.safetensors
   (--model may be a local root; its text_encoder/ and tokenizer/ are read. The negative
   prompt defaults to Wan's own; --negative_prompt '' encodes the empty prompt.)
2. Arrays your own encoder wrote (.npy [N, L, D], zero-padded past each prompt):
     python scripts/write_wan_embeddings.py --prompts prompts.txt --from_npy context.npy \
       --negative_npy negative.npy --out prompts.safetensors
3. A seeded random stand-in (tests, tiny runs):
     python scripts/write_wan_embeddings.py --random 16 --text_dim 32 --length 8 --out r.npz

I2V: add --condition_npy condition.npy ([N, 20, F, h, w]: WanImageToVideoPipeline's
``condition`` latent of each prompt's reference image, from its prepare_latents).
prompts.txt: one prompt per line (blank lines skipped).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pdmd_jax.families import prompts as embeddings_lib  # noqa: E402  pylint: disable=wrong-import-position
from pdmd_jax.families.wan22 import weights  # noqa: E402  pylint: disable=wrong-import-position


def read_prompts(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def encode_umt5(prompts: list[str], model: str, *, max_length: int = 512, batch_size: int = 8,
                device: str = "cpu", dtype: str = "bfloat16") -> np.ndarray:
  """umT5 last hidden states [N, max_length, D], zeroed past each prompt (WanPipeline's way)."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer, UMT5EncoderModel  # pylint: disable=import-outside-toplevel
  try:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # pylint: disable=import-outside-toplevel
  except ImportError:
    prompt_clean = lambda s: " ".join(s.split())
  tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
  tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
  encoder = UMT5EncoderModel.from_pretrained(model, subfolder="text_encoder",
                                             torch_dtype=tdtype).to(device).eval()
  out = []
  with torch.no_grad():
    for i in range(0, len(prompts), batch_size):
      batch = [prompt_clean(p) for p in prompts[i:i + batch_size]]
      tok = tokenizer(batch, padding="max_length", max_length=max_length, truncation=True,
                      add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
      mask = tok.attention_mask.to(device)
      h = encoder(tok.input_ids.to(device), mask).last_hidden_state
      h = h * (mask[..., None] > 0).to(h.dtype)                 # zero past each prompt
      out.append(h.float().cpu().numpy())
      print(f"encoded {min(i + batch_size, len(prompts))}/{len(prompts)}", flush=True)
  x = np.concatenate(out)
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return x.astype(ml_dtypes.bfloat16)
  return x.astype(np.float16 if dtype == "float16" else np.float32)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help=".safetensors or .npz")
  p.add_argument("--prompts", help="text file, one prompt per line")
  p.add_argument("--model", help="diffusers Wan repo id or root (text_encoder/, tokenizer/)")
  p.add_argument("--from_npy", help="context [N, L, D] written by your own encoder")
  p.add_argument("--negative_npy", help="negative embedding [L, D] (with --from_npy)")
  p.add_argument("--condition_npy", help="I2V condition latents [N, C, F, h, w]")
  p.add_argument("--negative_prompt", default=weights.WAN_NEGATIVE_PROMPT,
                 help="encoded with --model (default: Wan's own negative prompt)")
  p.add_argument("--random", type=int, default=0, help="write N random stand-in prompts")
  p.add_argument("--text_dim", type=int, default=4096)
  p.add_argument("--length", type=int, default=64, help="tokens of the random stand-in")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max_length", type=int, default=512)
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
    negative, negative_prompt = None, ""
    if a.from_npy:
      context = np.load(a.from_npy)
      if a.negative_npy:
        negative, negative_prompt = np.load(a.negative_npy), "(from --negative_npy)"
      encoder = f"user arrays ({os.path.basename(a.from_npy)})"
    elif a.model:
      context = encode_umt5(prompts, a.model, max_length=a.max_length, batch_size=a.batch_size,
                            device=a.device, dtype=a.dtype)
      negative = encode_umt5([a.negative_prompt], a.model, max_length=a.max_length,
                             device=a.device, dtype=a.dtype)[0]
      negative_prompt, encoder = a.negative_prompt, f"umT5 ({a.model} text_encoder)"
    else:
      p.error("give --model (encode with umT5) or --from_npy (your own arrays)")
    if len(prompts) != len(context):
      p.error(f"{len(prompts)} prompts but {len(context)} context rows")
    context = embeddings_lib.trim(context)
    if negative is not None:
      negative = embeddings_lib.trim(negative[None])[0]
    condition = np.load(a.condition_npy) if a.condition_npy else None
    emb = embeddings_lib.Embeddings(context=context, negative=negative, condition=condition,
                              prompts=prompts, negative_prompt=negative_prompt, encoder=encoder,
                              text_len=a.max_length)
  embeddings_lib.save_embeddings(a.out, emb)
  print(f"Wrote {a.out}: context {tuple(emb.context.shape)} {emb.context.dtype}, negative "
        f"{None if emb.negative is None else tuple(emb.negative.shape)}, condition "
        f"{None if emb.condition is None else tuple(emb.condition.shape)}")


if __name__ == "__main__":
  main()
