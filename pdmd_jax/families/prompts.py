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

Tables of real scale (a released recipe's ~30k prompts: ~125 GB of umT5 states in bf16) are
streamed instead (``data.stream``): ``EmbeddingRows`` reads single prompts' rows from the
.safetensors file (safetensors slices: nothing else is read), and ``stream_dataset`` is a grain
MapDataset whose element i is update i's conditioning, prompts drawn without replacement within
each epoch (a per-epoch shuffle) -- a pure function of (seed, i), so the update index is the
whole data position and resuming at a step reads what the uninterrupted run read. Each process
reads only the columns of its batch shard. Evaluation and sampling draw their prompts from the
file's first ``data.eval_prompts`` rows, held like a small table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading

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


PER_PROMPT = ("context", "condition", "mask")     # tensors with one row per prompt


def load_embeddings(path: str, rows: int | None = None) -> Embeddings:
  """Reads a file written by ``save_embeddings`` (format ``pdmd_jax.wan_embeddings.v1``);
  ``rows``: only the first ``rows`` prompts (read as slices from a .safetensors file)."""
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    meta = {k: str(arrays.pop(k)) for k in ("format", "prompts", "negative_prompt", "encoder",
                                            "text_len") if k in arrays}
    if rows is not None:
      arrays = {k: v[:rows] if k in PER_PROMPT else v for k, v in arrays.items()}
  else:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(path, framework="np") as f:
      if rows is None:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
      else:
        arrays = {k: f.get_slice(k)[:rows] if k in PER_PROMPT else f.get_tensor(k)
                  for k in f.keys()}
      meta = f.metadata() or {}
  if meta.get("format", FORMAT) != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}; expected {FORMAT!r}")
  if "context" not in arrays:
    raise ValueError(f"{path}: no 'context' tensor [N, L, D]; has {sorted(arrays)}")
  unknown = sorted(set(arrays) - set(TENSORS))
  if unknown:
    raise ValueError(f"{path}: unexpected tensors {unknown}; allowed: {', '.join(TENSORS)}")
  names = json.loads(meta.get("prompts", "[]"))
  return Embeddings(context=arrays["context"], negative=arrays.get("negative"),
                    condition=arrays.get("condition"), mask=arrays.get("mask"),
                    negative_mask=arrays.get("negative_mask"),
                    prompts=names if rows is None else names[:rows],
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


def _tokens(context_len: int, negative: np.ndarray | None) -> int:
  """Token count of the conditioning: with a negative, one count for both (CFG swaps them)."""
  return context_len if negative is None else max(context_len, negative.shape[0])


def _pad_tokens(a: np.ndarray, n: int, axis: int) -> np.ndarray:
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, n - a.shape[axis])
  return np.pad(a, pad)


def make_cond_fn(emb: Embeddings, use_negative: bool = True, *, masks: bool = False):
  """(key, shape) -> {"index", "context", ["negative"], ["condition"]}, prompts drawn uniformly;
  ``masks``: also "mask" [*shape, L] and (with "negative") "negative_mask", bool."""
  context, negative = emb.context, emb.negative if use_negative else None
  mask, neg_mask = emb.masks()
  if negative is not None:   # one token count for both (CFG swaps them): zero-pad the shorter
    n = _tokens(context.shape[1], negative)
    context, mask = _pad_tokens(context, n, 1), _pad_tokens(mask, n, 1)
    negative, neg_mask = _pad_tokens(negative, n, 0), _pad_tokens(neg_mask, n, 0)

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


# ============================================================================================
# Streaming (data.stream): the table stays on disk
# ============================================================================================

class EmbeddingRows:
  """Random access to single prompts of a .safetensors embeddings file.

  ``rows(idx)`` reads only the prompts in ``idx`` (safetensors slices) and returns the
  conditioning pytree of ``make_cond_fn`` for them, as numpy, with the same token padding and
  dtypes; the negative prompt (one row) is read once. Each thread opens its own handle.
  """

  def __init__(self, path: str, use_negative: bool = True, *, masks: bool = False):
    if not path.endswith(".safetensors"):
      raise ValueError(f"config.data.embeddings={path!r}: streaming (config.data.stream=True) "
                       "reads rows of a .safetensors file; convert the .npz with "
                       "prompts.save_embeddings(<name>.safetensors, prompts.load_embeddings(...))")
    shapes = embedding_shapes(path)
    self.path, self.masks = path, masks
    self.num, length = shapes["context"][0], shapes["context"][1]
    self.has_mask, self.has_condition = shapes["mask"] is not None, shapes["condition"] is not None
    self._local = threading.local()
    self.negative = self.negative_mask = None
    if use_negative and shapes["negative"] is not None:
      head = load_embeddings(path, rows=0)
      self.negative = head.negative
      self.negative_mask = head.masks()[1]
    self.tokens = _tokens(length, self.negative)
    if self.negative is not None:
      self.negative = _pad_tokens(self.negative, self.tokens, 0)
      self.negative_mask = _pad_tokens(self.negative_mask, self.tokens, 0)

  def _file(self):
    f = getattr(self._local, "f", None)
    if f is None:
      from safetensors import safe_open  # pylint: disable=import-outside-toplevel
      f = self._local.f = safe_open(self.path, framework="np")
    return f

  def _read(self, name: str, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (any shape) of tensor ``name``: each distinct prompt read once."""
    sl = self._file().get_slice(name)
    uniq, inv = np.unique(idx.reshape(-1), return_inverse=True)
    got = np.stack([sl[int(i):int(i) + 1][0] for i in uniq])
    return got[inv].reshape(idx.shape + got.shape[1:])

  def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    idx = np.asarray(idx)
    context = _pad_tokens(self._read("context", idx), self.tokens, idx.ndim)
    y = {"index": idx.astype(np.int32), "context": context}
    if self.masks:
      if self.has_mask:
        mask = self._read("mask", idx).astype(bool)
      else:
        mask = np.any(np.asarray(context, np.float32) != 0, axis=-1)
      y["mask"] = _pad_tokens(mask, self.tokens, idx.ndim)
    if self.negative is not None:
      y["negative"] = np.broadcast_to(self.negative, idx.shape + self.negative.shape)
      if self.masks:
        y["negative_mask"] = np.broadcast_to(self.negative_mask, idx.shape +
                                             self.negative_mask.shape)
    if self.has_condition:
      y["condition"] = self._read("condition", idx)
    return y

  def __getstate__(self):      # grain may copy the source to worker processes
    state = dict(self.__dict__)
    del state["_local"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()


def stream_dataset(source: EmbeddingRows, batch_shape: tuple[int, ...], seed: int,
                   columns: slice = slice(None)):
  """A grain MapDataset whose element i is update i's conditioning, [*batch_shape] prompts (a
  per-epoch shuffle of the file's rows, seeded): the columns ``columns`` of axis 1 (this
  process's batch shard), read from disk on access."""
  import grain  # pylint: disable=import-outside-toplevel
  size = int(np.prod(batch_shape))
  order = grain.MapDataset.range(source.num).shuffle(seed=seed).repeat().batch(size)
  return order.map(lambda idx: source.rows(np.asarray(idx).reshape(batch_shape)[:, columns]))


def conditioning(data, table, use_negative: bool, *, masks: bool = False):
  """(sample_cond, cond_data) of a text family's ``Family``.

  table: () -> the in-memory ``Embeddings`` (the file, or the random stand-in). With
  ``data.stream``: sample_cond draws from the first ``data.eval_prompts`` rows only (evaluation,
  sampling and the step's abstract shapes) and cond_data streams the training conditioning
  (``stream_dataset``); otherwise cond_data is None and the whole table is the sampler's.
  """
  if not data.get("stream", False):
    return make_cond_fn(table(), use_negative, masks=masks), None
  head = load_embeddings(data.embeddings, rows=data.eval_prompts)
  source = EmbeddingRows(data.embeddings, use_negative, masks=masks)
  return (make_cond_fn(head, use_negative, masks=masks),
          lambda batch_shape, seed, columns: stream_dataset(source, batch_shape, seed, columns))


def check_stream(config):
  """data.stream (bool) and, when on, data.eval_prompts and a .safetensors data.embeddings."""
  from pdmd_jax import validation as V  # pylint: disable=import-outside-toplevel
  d = config.data
  if not isinstance(d.get("stream", False), bool):
    V.fail("data.stream", d.stream, [True, False])
  if not d.get("stream", False):
    return
  V.positive(config, "data.eval_prompts", integer=True)
  if not d.embeddings.endswith(".safetensors"):
    V.fail("data.embeddings", d.embeddings, "a .safetensors embeddings file when data.stream="
           "True (rows are read from disk; the random stand-in and .npz files are tables)")


def table_bytes(data, shapes, nbytes: int) -> tuple[int, str]:
  """(bytes held on every device, what they are): the whole file, or with data.stream only the
  first data.eval_prompts rows (the per-prompt tensors' share)."""
  if not data.get("stream", False):
    return nbytes, "the table is held on every device; stream it (config.data.stream=True)"
  n = shapes["context"][0]
  return (nbytes * min(data.eval_prompts, n) // n,
          "its first data.eval_prompts rows are held on every device for evaluation")
