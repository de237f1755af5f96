"""Tests of apogeenet_jax.memory_data: a split held in memory gives the stream's batches."""

import ml_dtypes
import numpy as np
import pytest
from test_input_pipeline import fake_source

from apogeenet_jax import input_pipeline, memory_data
from apogeenet_jax.constants import N_PIXELS


def test_memory_batches_equal_stream_batches():
  """Batch for batch, the gathered flux, labels and data types are the stream's, preprocessing
  (non-finite flux → 0) included."""
  src = fake_source(21)
  src[4]['flux'][7] = np.nan
  arrays = memory_data.load_split(src, num_threads=2)
  kwargs = {'seed': 3, 'epoch': 2, 'shard_index': 1, 'shard_count': 2, 'start_batch': 1}
  stream = list(input_pipeline.train_batches(src, 4, num_threads=2, **kwargs))
  rows = input_pipeline.epoch_batch_indices(np.arange(21), 4, **kwargs)
  assert len(rows) == len(stream) == 1  # 10 rows per shard → 2 batches of 4, the first skipped
  for batch, idx in zip(stream, rows, strict=True):
    got = arrays.gather(idx)
    for key in ('flux', 'labels', 'data_type'):
      np.testing.assert_array_equal(got[key], batch[key])
  assert arrays.gather(np.array([4]))['flux'][0, 7] == 0.0
  np.testing.assert_array_equal(arrays.metadata()['labels'],
                                input_pipeline.read_metadata(src, num_threads=2)['labels'])


def test_eval_batches_match_the_stream():
  src = fake_source(11)
  arrays = memory_data.load_split(src, num_threads=2)
  idx = np.arange(11)[1::2]
  got = list(memory_data.eval_batches(arrays, 4, indices=idx, num_batches=3))
  want = list(input_pipeline.eval_batches(src, 4, indices=idx, num_batches=3, num_threads=2))
  assert len(got) == len(want) == 3
  for g, w in zip(got, want, strict=True):
    for key in ('flux', 'labels', 'data_type', 'mask'):
      np.testing.assert_array_equal(g[key], w[key])


def test_partial_rows_hold_only_those():
  src = fake_source(10)
  arrays = memory_data.load_split(src, rows=np.array([7, 2, 5]), num_threads=2)
  assert arrays.flux.shape == (3, N_PIXELS) and len(arrays) == 10
  np.testing.assert_array_equal(arrays.gather(np.array([5, 7]))['flux'][:, 1], [5, 7])
  with pytest.raises(input_pipeline.InputPipelineError, match='does not hold'):
    arrays.gather(np.array([3]))


def test_bfloat16_storage_rounding_is_measured_and_bounded():
  src = fake_source(6)
  src[0]['flux'][:10] = 1e6  # bfloat16 has float32's range
  exact = memory_data.load_split(src, num_threads=2)
  half = memory_data.load_split(src, dtype='bfloat16', num_threads=2)
  assert half.flux.dtype == ml_dtypes.bfloat16 and half.flux.nbytes == exact.flux.nbytes // 2
  assert exact.rounding == {'max': 0.0, 'rms': 0.0}
  rel = np.abs(half.gather(np.arange(6))['flux'] - exact.flux) / np.abs(exact.flux)
  assert 0 < half.rounding['rms'] < half.rounding['max'] <= 2.0 ** -8
  np.testing.assert_allclose(half.rounding['max'], rel.max(), rtol=1e-6)
  np.testing.assert_allclose(half.rounding['rms'], np.sqrt(np.mean(rel.astype(np.float64) ** 2)),
                             rtol=1e-4)


def test_float16_overflow_names_the_record():
  src = fake_source(5)
  src[3]['flux'][9] = 1e5
  with pytest.raises(input_pipeline.InputPipelineError, match=r'train: record 3 \(2M00000003\)'):
    memory_data.load_split(src, dtype='float16', num_threads=2, name='train')
  assert memory_data.bytes_per_spectrum('float16') == N_PIXELS * 2 + 16
