"""Precomputed text conditioning: the prompt-embedding file format and its conditioning sampler.

Text-conditioned families (Wan2.2 with umT5, Qwen-Image with Qwen2.5-VL) train data-free on
prompt embeddings computed once, offline (scripts/write_wan_embeddings.py,
scripts/write_qwen_image_embeddings.py), so no text encoder runs in the loop. Format
``pdmd_jax.wan_embeddings.v1``: a .safetensors (or .npz) file with
  context        [N, L, D]  the encoder's last hidden states (bf16/fp16/fp32), positions past
                 each prompt's token count zeroed; L <= the family's text length
  negative       [L', D]    optional: the negative prompt's embedding (CFG's unconditional
                 branch)
  condition      [N, ...]   optional: a per-prompt conditioning latent (Wan2.2 I2V: the image
                 ``condition`` [N, C, F, h, w])
  mask           [N, L]     optional (uint8 0/1): valid tokens of each prompt (ragged lengths:
                 Qwen-Image's text attention masks the rest); absent: the non-zero positions
  negative_mask  [L']       optional: the same for ``negative``
and metadata (safetensors string metadata / npz 0-d string arrays): ``format``, ``prompts``
(JSON list of N strings), ``negative_prompt``, ``encoder``, ``text_len``.
``make_cond_fn`` draws prompts uniformly and returns the conditioning pytree
``{"index": [*shape], "context": [*shape, L, D], "negative": ..., "condition": ...}`` (with
``masks=True`` also ``"mask"`` and ``"negative_mask"``, bool); the table lives on the
accelerators (a constant of the sampler), so keep it to a few GB.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "pdmd_jax.wan_embeddings.v1"
TENSORS = ("context", "negative", "condition", "mask", "negative_mask")


@dataclasses.dataclass
class Embeddings:
  """Precomputed text conditioning (numpy; see the module docstring for the file format)."""
  context: np.ndarray                     # [N, L, D]
  negative: np.ndarray | None = None      # [L', D]
  condition: np.ndarray | None = None     # [N, C, F, h, w] (I2V)
  prompts: list[str] = dataclasses.field(default_factory=list)
  negative_prompt: str = ""
  encoder: str = ""
  text_len: int = 512
  mask: np.ndarray | None = None          # [N, L] bool: valid tokens (None: non-zero ones)
  negative_mask: np.ndarray | None = None  # [L'] bool

  def __post_init__(self):
    if self.context.ndim != 3:
      raise ValueError(f"embeddings: context must be [N, L, D]; got shape {self.context.shape}")
    if self.negative is not None:
      if self.negative.ndim == 3 and self.negative.shape[0] == 1:
        self.negative = self.negative[0]
      if self.negative.ndim != 2 or self.negative.shape[-1] != self.context.shape[-1]:
        raise ValueError(f"embeddings: negative must be [L, {self.context.shape[-1]}]; got "
                         f"{self.negative.shape}")
    if self.condition is not None and (self.condition.ndim != 5
                                       or self.condition.shape[0] != self.context.shape[0]):
      raise ValueError(f"embeddings: condition must be [N={self.context.shape[0]}, C, F, h, w]; "
                       f"got {self.condition.shape}")
    if self.mask is not None:
      self.mask = np.asarray(self.mask).astype(bool)
      if self.mask.shape != self.context.shape[:2]:
        raise ValueError(f"embeddings: mask must be [N, L] = {self.context.shape[:2]}; got "
                         f"{self.mask.shape}")
    if self.negative is None:
      self.negative_mask = None            # e.g. dataclasses.replace(emb, negative=None)
    if self.negative_mask is not None:
      self.negative_mask = np.asarray(self.negative_mask).astype(bool).reshape(-1)
      if self.negative_mask.shape != self.negative.shape[:1]:
        raise ValueError(f"embeddings: negative_mask must be [L'] = {self.negative.shape[:1]} "
                         f"of the negative embedding; got {self.negative_mask.shape}")
    if self.prompts and len(self.prompts) != self.context.shape[0]:
      raise ValueError(f"embeddings: {len(self.prompts)} prompts for {self.context.shape[0]} "
                       "context rows")

  @property
  def num(self) -> int:
    return self.context.shape[0]

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in (self.context, self.negative, self.condition, self.mask,
                                  self.negative_mask) if a is not None)

  def masks(self) -> tuple[np.ndarray, np.ndarray | None]:
    """(mask [N, L], negative_mask [L'] or None): the stored ones, else the non-zero tokens."""
    valid = lambda a: np.any(np.asarray(a, np.float32) != 0, axis=-1)
    mask = self.mask if self.mask is not None else valid(self.context)
    neg = self.negative_mask
    if neg is None and self.negative is not None:
      neg = valid(self.negative)
    return mask, neg


def trim(context: np.ndarray) -> np.ndarray:
  """Drops the trailing token positions that are zero for every prompt (the zero padding)."""
  nonzero = np.any(np.asarray(context, np.float32) != 0, axis=(0, 2))
  n = int(np.max(np.nonzero(nonzero)[0])) + 1 if nonzero.any() else 1
  return context[:, :n]


def save_embeddings(path: str, emb: Embeddings):
  """Writes ``emb`` as .safetensors (any dtype) or .npz (bf16 stored as fp32)."""
  meta = {"format": FORMAT, "prompts": json.dumps(list(emb.prompts), ensure_ascii=False),
          "negative_prompt": emb.negative_prompt, "encoder": emb.encoder,
          "text_len": str(emb.text_len)}
  arrays = {"context": emb.context}
  if emb.negative is not None:
    arrays["negative"] = emb.negative
  if emb.condition is not None:
    arrays["condition"] = emb.condition
  if emb.mask is not None:
    arrays["mask"] = np.asarray(emb.mask, np.uint8)
  if emb.negative_mask is not None:
    arrays["negative_mask"] = np.asarray(emb.negative_mask, np.uint8)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".npz"):
    np_ok = lambda a: a if a.dtype in (np.float16, np.float32, np.float64) else a.astype(np.float32)
    np.savez(path, **{k: np_ok(np.asarray(v)) for k, v in arrays.items()},
             **{k: np.asarray(v) for k, v in meta.items()})
  elif path.endswith(".safetensors"):
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path, metadata=meta)
  else:
    raise ValueError(f"{path}: the embeddings file must end in .safetensors or .npz")


def load_embeddings(path: str) -> Embeddings:
  """Reads a file written by ``save_embeddings`` (format ``pdmd_jax.wan_embeddings.v1``)."""
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    meta = {k: str(arrays.pop(k)) for k in ("format", "prompts", "negative_prompt", "encoder",
                                            "text_len") if k in arrays}
  else:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(path, framework="np") as f:
      arrays = {k: f.get_tensor(k) for k in f.keys()}
      meta = f.metadata() or {}
  if meta.get("format", FORMAT) != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}; expected {FORMAT!r}")
  if "context" not in arrays:
    raise ValueError(f"{path}: no 'context' tensor [N, L, D]; has {sorted(arrays)}")
  unknown = sorted(set(arrays) - set(TENSORS))
  if unknown:
    raise ValueError(f"{path}: unexpected tensors {unknown}; allowed: {', '.join(TENSORS)}")
  return Embeddings(context=arrays["context"], negative=arrays.get("negative"),
                    condition=arrays.get("condition"), mask=arrays.get("mask"),
                    negative_mask=arrays.get("negative_mask"),
                    prompts=json.loads(meta.get("prompts", "[]")),
                    negative_prompt=meta.get("negative_prompt", ""),
                    encoder=meta.get("encoder", ""), text_len=int(meta.get("text_len", 512)))


def embedding_shapes(path: str) -> dict[str, tuple[int, ...] | None]:
  """{"context", "negative", "condition", "mask", "negative_mask"} shapes (None: absent) and the
  context's "dtype" of an embeddings file (headers only for .safetensors), for validation
  before anything is loaded."""
  dtypes = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        shapes = {k: f[k].shape for k in TENSORS if k in f.files}
        dtype = str(f["context"].dtype) if "context" in f.files else None
    else:
      from safetensors import safe_open  # pylint: disable=import-outside-toplevel
      with safe_open(path, framework="np") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtype = dtypes.get(f.get_slice("context").get_dtype()) if "context" in shapes else None
  except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
    raise ValueError(f"config.data.embeddings={path!r}: not a readable .safetensors or .npz "
                     f"embeddings file ({type(e).__name__}: {e})") from None
  if "context" not in shapes:
    raise ValueError(f"config.data.embeddings={path!r}: no 'context' tensor [N, L, D]; has "
                     f"{sorted(shapes)}")
  neg = shapes.get("negative")
  if neg is not None and len(neg) == 3 and neg[0] == 1:
    neg = neg[1:]
  return {"context": tuple(shapes["context"]), "negative": neg,
          "condition": shapes.get("condition"), "mask": shapes.get("mask"),
          "negative_mask": shapes.get("negative_mask"), "dtype": dtype or "float32"}


def random_embeddings(num: int, length: int, dim: int, *, seed: int = 0,
                      condition_shape: tuple[int, ...] | None = None) -> Embeddings:
  """A deterministic stand-in (tiny runs): unit-normal tokens, random prompt lengths, zero pad,
  and the masks of those lengths."""
  rng = np.random.default_rng(seed)
  ctx = rng.standard_normal((num, length, dim)).astype(np.float32)
  lens = rng.integers(max(1, length // 4), length + 1, num)
  mask = np.arange(length)[None, :] < lens[:, None]
  ctx[~mask] = 0.0
  neg = rng.standard_normal((length, dim)).astype(np.float32)
  neg_mask = np.arange(length) < max(1, length // 2)
  neg[~neg_mask] = 0.0
  cond = (None if condition_shape is None else
          rng.standard_normal((num, *condition_shape)).astype(np.float32))
  return Embeddings(context=ctx, negative=neg, condition=cond,
                    prompts=[f"random prompt {i}" for i in range(num)],
                    negative_prompt="random negative", encoder=f"random(seed={seed})",
                    text_len=length, mask=mask, negative_mask=neg_mask)


def make_cond_fn(emb: Embeddings, use_negative: bool = True, *, masks: bool = False):
  """(key, shape) -> {"index", "context", ["negative"], ["condition"]}, prompts drawn uniformly;
  ``masks``: also "mask" [*shape, L] and (with "negative") "negative_mask", bool."""
  context, negative = emb.context, emb.negative if use_negative else None
  mask, neg_mask = emb.masks()
  if negative is not None:   # one token count for both (CFG swaps them): zero-pad the shorter
    n = max(context.shape[1], negative.shape[0])
    context = np.pad(context, ((0, 0), (0, n - context.shape[1]), (0, 0)))
    negative = np.pad(negative, ((0, n - negative.shape[0]), (0, 0)))
    mask = np.pad(mask, ((0, 0), (0, n - mask.shape[1])))
    neg_mask = np.pad(neg_mask, (0, n - neg_mask.shape[0]))

  def cond_fn(key, shape):
    idx = jax.random.randint(key, shape, 0, emb.num)
    y = {"index": idx, "context": jnp.asarray(context)[idx]}
    if masks:
      y["mask"] = jnp.asarray(mask)[idx]
    if negative is not None:
      y["negative"] = jnp.broadcast_to(jnp.asarray(negative), tuple(shape) + negative.shape)
      if masks:
        y["negative_mask"] = jnp.broadcast_to(jnp.asarray(neg_mask), tuple(shape) + neg_mask.shape)
    if emb.condition is not None:
      y["condition"] = jnp.asarray(emb.condition)[idx]
    return y
  return cond_fn


def negative_cond(y):
  """CFG's unconditional branch: the negative prompt's embedding (and mask) in place of the
  prompt's."""
  out = {**y, "context": y["negative"]}
  if "negative_mask" in y:
    out["mask"] = y["negative_mask"]
  return out
