"""Streamed prompt embeddings (data.stream): rows read from disk equal the in-memory table's, a
per-epoch shuffle, per-process columns, a table over the memory cap trains, and resuming
restores the data position."""

import chex
import jax
import numpy as np
import pytest

from pdmd_jax import assembly
from pdmd_jax import configs
from pdmd_jax import trainer
from pdmd_jax import validation
from pdmd_jax.families import prompts

ONE = jax.devices()[:1]


def _file(tmp_path, num=10, length=5, dim=6, *, masks=True, condition=False):
  emb = prompts.random_embeddings(num, length, dim, seed=4,
                                  condition_shape=(2, 1, 2, 2) if condition else None)
  emb.negative = emb.negative[:3]           # a shorter negative: both padded to one count
  emb.negative_mask = emb.negative_mask[:3]
  if not masks:
    emb.mask = emb.negative_mask = None
  path = str(tmp_path / "e.safetensors")
  prompts.save_embeddings(path, emb)
  return path


@pytest.mark.parametrize("masks,condition", [(True, False), (False, True)])
def test_rows_read_from_disk_equal_the_table(tmp_path, masks, condition):
  """Qwen-Image style (stored masks) and Wan I2V style (no masks stored, a condition latent):
  the rows of the prompts the table sampler drew, read from disk, equal what it returned --
  values, token padding, dtypes and the tree's structure."""
  path = _file(tmp_path, masks=masks, condition=condition)
  table = prompts.make_cond_fn(prompts.load_embeddings(path), masks=True)
  y = jax.device_get(table(jax.random.PRNGKey(1), (3, 4)))
  got = prompts.EmbeddingRows(path, masks=True).rows(np.asarray(y["index"]))
  chex.assert_trees_all_equal(got, y, strict=False)
  chex.assert_trees_all_equal_dtypes(got, y)
  assert got["context"].shape == (3, 4, 5, 6) and ("condition" in got) == condition
  no_neg = prompts.EmbeddingRows(path, use_negative=False).rows(np.array([[2]]))
  assert "negative" not in no_neg and no_neg["context"].shape == (1, 1, 5, 6)


def test_stream_is_a_seeded_per_epoch_shuffle_with_process_columns(tmp_path):
  source = prompts.EmbeddingRows(_file(tmp_path), masks=True)
  ds = prompts.stream_dataset(source, (3, 2), seed=7)
  drawn = np.concatenate([ds[i]["index"].reshape(-1) for i in range(10)])   # 60 = 6 epochs
  epochs = drawn.reshape(6, 10)
  for e in epochs:                 # every epoch draws each prompt once
    np.testing.assert_array_equal(np.sort(e), np.arange(10))
  assert len({tuple(e) for e in epochs}) > 1            # reshuffled between epochs
  again = prompts.stream_dataset(prompts.EmbeddingRows(source.path, masks=True), (3, 2), seed=7)
  np.testing.assert_array_equal(again[9]["index"], ds[9]["index"])      # a function of (seed, i)
  np.testing.assert_array_equal(ds[4:][0]["index"], ds[4]["index"])     # resume at update 4
  other = prompts.stream_dataset(source, (3, 2), seed=8)
  assert any((other[i]["index"] != ds[i]["index"]).any() for i in range(3))
  # A process holding batch columns [1, 2) reads exactly those rows.
  part = prompts.stream_dataset(source, (3, 2), seed=7, columns=slice(1, 2))[5]
  whole = ds[5]
  chex.assert_trees_all_equal(part, jax.tree.map(lambda a: a[:, 1:2], whole))


def test_process_columns_of_one_process():
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
  assert assembly.process_columns(s, (3, 16)) == slice(0, 16)


def _qwen(tmp_path, **data):
  c = configs.load("configs/qwen_image.py:tiny")
  c.data.embeddings = _file(tmp_path, num=40, length=6, dim=24)
  c.data.stream, c.data.eval_prompts = True, 4
  for k, v in data.items():
    c.data[k] = v
  return c


def test_stream_validation(tmp_path):
  c = _qwen(tmp_path)
  c.data.embeddings = ""
  with pytest.raises(ValueError, match=r"config.data.embeddings.*\.safetensors"):
    validation.validate(c)
  c = _qwen(tmp_path, eval_prompts=0)
  with pytest.raises(ValueError, match=r"config.data.eval_prompts"):
    validation.validate(c)
  # The file is over the cap: refused as a table (naming data.stream), accepted streamed (the
  # first eval_prompts rows are what stays in memory).
  size = 40 * 6 * 24 * 4
  c = _qwen(tmp_path, stream=False, max_table_gb=size / 2 / 2**30)
  with pytest.raises(ValueError, match=r"max_table_gb.*config.data.stream=True"):
    validation.validate(c)
  c.data.stream = True
  validation.validate(c)


def test_streamed_batches_have_the_step_inputs_shapes(tmp_path, monkeypatch):
  """The host-read conditioning has the abstract batch's structure, shapes, dtypes and
  shardings (what the step was compiled for); evaluation draws from the first eval_prompts
  rows; the table is never read whole."""
  load = prompts.load_embeddings

  def rows_only(path, rows=None):
    assert rows is not None, "the whole table was loaded"
    return load(path, rows)

  monkeypatch.setattr(prompts, "load_embeddings", rows_only)
  c = _qwen(tmp_path)
  run = trainer.build(c, devices=ONE)
  batch, abstract = trainer.batch_for_step(run, 3), run.asm.abstract_batch()
  chex.assert_trees_all_equal_shapes_and_dtypes(batch, abstract)
  assert jax.tree.map(lambda a: a.sharding, batch) == jax.tree.map(lambda a: a.sharding, abstract)
  assert int(np.asarray(batch["y"]["index"]).max()) < 40
  assert int(np.asarray(run.sample_labels(jax.random.PRNGKey(0), (64,))["index"]).max()) < 4
  first = next(run.asm.host_batches(3))
  chex.assert_trees_all_equal(jax.device_get(first), jax.device_get(batch))


@pytest.mark.slow    # three tiny Qwen-Image runs (~1.5 min)
def test_table_over_the_cap_trains_streamed_and_resumes(tmp_path):
  """A 40-prompt file twice the memory cap trains streamed; stopped after update 1 and resumed,
  the run reads update 1's prompts again and ends bit-identical to the uninterrupted run."""
  c = _qwen(tmp_path, max_table_gb=40 * 6 * 24 * 4 / 2 / 2**30)
  c.train.num_steps, c.train.ckpt_every = 4, 4
  a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
  trainer.train_and_evaluate(c, a, devices=ONE, final_eval=False, verbose=False)
  out = trainer.train_and_evaluate(c, b, devices=ONE, stop_at_step=1, final_eval=False,
                                   verbose=False)
  assert out == {"stopped_at_step": 1}
  trainer.train_and_evaluate(c, b, devices=ONE, final_eval=False, verbose=False)
  (_, sa), (_, sb) = trainer.restore_latest(c, a, ONE), trainer.restore_latest(c, b, ONE)
  assert int(sa.step) == int(sb.step) == 4
  chex.assert_trees_all_equal(jax.device_get(sa), jax.device_get(sb), strict=True)
