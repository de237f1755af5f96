"""Tests of apogeenet_jax.input_pipeline on in-memory sources and a tiny built data set."""

import itertools

import numpy as np
import pytest

from apogeenet_jax import input_pipeline
from apogeenet_jax.constants import DATA_TYPES, N_PIXELS
from apogeenet_jax.preprocessing import BAD_PIXEL_ERROR


def fake_source(n: int, seed: int = 0) -> list[dict]:
  """Feature dicts as a tfds data source returns them; example i has flux[1] == i."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    flux = rng.normal(100, 1, N_PIXELS).astype(np.float32)
    flux[1] = i
    out.append({'flux': flux, 'flux_err': np.ones(N_PIXELS, np.float32),
                'labels': np.array([4.0, 3500.0 + i, -0.1], np.float32),
                'data_type': i % 3, 'apogee_id': f'2M{i:08d}'.encode(), 'snr': 10.0 + i,
                'ra': 1.0, 'dec': 2.0})
  return out


def _ids(batches):
  return [int(x) for b in batches for x in b['flux'][:, 1]]


def test_train_batches_shuffle_per_epoch_and_reproducible():
  src = fake_source(40)
  e0 = _ids(input_pipeline.train_batches(src, 8, seed=0, epoch=0))
  e0_again = _ids(input_pipeline.train_batches(src, 8, seed=0, epoch=0))
  e1 = _ids(input_pipeline.train_batches(src, 8, seed=0, epoch=1))
  assert e0 == e0_again
  assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(40))
  assert e0 != list(range(40))


def test_train_batches_drop_remainder_and_fields():
  src = fake_source(21)
  src[3]['flux'][100] = np.nan
  src[3]['flux_err'][5] = -1.0
  batches = list(input_pipeline.train_batches(src, 8, seed=0, epoch=0,
                                              indices=np.array([3, 4, 5, 6, 7, 8, 9, 10, 11])))
  assert len(batches) == 1  # 9 examples, batch 8: the ninth is dropped
  b = batches[0]
  assert b['flux'].shape == b['flux_err'].shape == (8, N_PIXELS)
  assert b['flux'].dtype == np.float32 and b['labels'].shape == (8, 3)
  assert b['data_type'].dtype == np.int32 and b['mask'].all()
  assert set(_ids(batches)) <= set(range(3, 12))
  rows = np.flatnonzero(b['flux'][:, 1] == 3)
  if len(rows):  # example 3 drew into this batch: THE preprocessing was applied
    assert b['flux'][rows[0], 100] == 0.0
    assert b['flux_err'][rows[0], 5] == BAD_PIXEL_ERROR
  assert all(i.startswith('2M') for i in b['apogee_id'])
  for row in range(8):  # labels and data types travel with their own spectrum
    i = int(b['flux'][row, 1])
    assert b['labels'][row, 1] == 3500 + i and b['data_type'][row] == i % 3


def test_preprocessing_applied_to_every_batch():
  src = fake_source(8)
  for e in src:
    e['flux'][7] = np.inf
    e['flux_err'][7] = np.nan
  for batches in (input_pipeline.train_batches(src, 4, seed=0, epoch=0),
                  input_pipeline.eval_batches(src, 3)):
    for b in batches:
      assert np.all(b['flux'][:, 7] == 0.0) and np.all(b['flux_err'][:, 7] == BAD_PIXEL_ERROR)


def test_train_batches_shards_disjoint_equal_and_cover():
  src = fake_source(43)
  shards = [_ids(input_pipeline.train_batches(src, 5, seed=3, epoch=2, shard_index=k,
                                              shard_count=3)) for k in range(3)]
  assert [len(s) for s in shards] == [10, 10, 10]  # 43 // 3 = 14 per process → 2 batches of 5
  flat = [i for s in shards for i in s]
  assert len(set(flat)) == len(flat)
  # The shards interleave one permutation, so together they are its first 30 elements.
  perm = input_pipeline.epoch_permutation(np.arange(43), seed=3, epoch=2)
  assert set(flat) <= set(perm[:42].tolist())


def test_train_batches_start_batch_resumes_the_same_epoch():
  src = fake_source(32)
  full = _ids(input_pipeline.train_batches(src, 4, seed=1, epoch=5))
  tail = _ids(input_pipeline.train_batches(src, 4, seed=1, epoch=5, start_batch=3))
  assert tail == full[12:]


def test_eval_batches_in_order_padded_with_mask():
  src = fake_source(10)
  batches = list(input_pipeline.eval_batches(src, 4))
  assert len(batches) == 3
  assert [b['flux'].shape[0] for b in batches] == [4, 4, 4]
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.tolist() == [True] * 10 + [False] * 2
  assert _ids(batches)[:10] == list(range(10))
  more = list(input_pipeline.eval_batches(src, 4, indices=np.array([7, 2]), num_batches=2))
  assert _ids(more)[:2] == [7, 2] and sum(b['mask'].sum() for b in more) == 2
  with pytest.raises(ValueError):
    list(input_pipeline.eval_batches(src, 4, num_batches=2))


def test_decode_example_accepts_names_and_unlabelled_records():
  rec = {'flux': np.zeros(N_PIXELS), 'labels': np.array([4.5, 3300.0, 0.1]),
         'data_type': b'YSO', 'apogee_id': b'2M1'}
  ex = input_pipeline.decode_example(rec)
  assert ex['data_type'] == DATA_TYPES.index('YSO') and ex['problem'] == ''
  np.testing.assert_allclose(ex['labels'], [4.5, 3300.0, 0.1])
  # An apStar file for inference: no labels, no data type.
  bare = input_pipeline.decode_example({'flux': np.zeros(N_PIXELS), 'apogee_id': b'2M2'})
  assert np.isnan(bare['labels']).all() and bare['data_type'] == input_pipeline.UNLABELLED
  with pytest.raises(input_pipeline.InputPipelineError, match='data_type'):
    input_pipeline.decode_example({**rec, 'data_type': b'Giant'})
  with pytest.raises(input_pipeline.InputPipelineError, match='flux'):
    input_pipeline.decode_example({**rec, 'flux': np.zeros(100)})


@pytest.mark.parametrize('n, batch_size, count', [(10, 4, 2), (10, 4, 3), (3, 4, 2), (0, 4, 2),
                                                   (17, 2, 5)])
def test_shard_range_covers_everything_once_on_batch_boundaries(n, batch_size, count):
  ranges = [input_pipeline.shard_range(n, batch_size, k, count) for k in range(count)]
  assert ranges[0][0] == 0 and ranges[-1][1] == n
  for (_, stop), (start, _) in itertools.pairwise(ranges):
    assert stop == start and (start % batch_size == 0 or start == n)
  sizes = [stop - start for start, stop in ranges]
  assert max(sizes) - min(sizes) <= batch_size  # balanced to within one batch
  with pytest.raises(ValueError):
    input_pipeline.shard_range(n, batch_size, count, count)


def test_apstar_files_read_in_order_bad_files_masked_and_reported(tmp_path, real_apstar_files):
  bad = tmp_path / 'apStar-r6-2M00000000+0000000.fits'
  bad.write_bytes(b'not fits')
  files = [str(real_apstar_files[0]), str(bad), str(real_apstar_files[1])]
  source = input_pipeline.ApStarFiles(files)
  batches = list(input_pipeline.eval_batches(source, 2, indices=np.array([1, 2])))
  b = batches[0]
  assert b['index'].tolist() == [1, 2] and b['mask'].tolist() == [False, True]
  assert b['file'].tolist() == files[1:]
  assert 'not a readable FITS' in b['problem'][0] and b['problem'][1] == ''
  assert b['apogee_id'][0] == '2M00000000+0000000'  # from the file name
  assert np.isnan(b['labels']).all() and (b['data_type'] == input_pipeline.UNLABELLED).all()
  # Padding copies a bad first row: its problem is reported once, not per copy.
  padded = next(iter(input_pipeline.eval_batches(source, 4, indices=np.array([1]))))
  assert padded['mask'].tolist() == [False] * 4 and (padded['problem'] != '').sum() == 1


def test_read_metadata_in_source_order():
  src = fake_source(13)
  meta = input_pipeline.read_metadata(src, num_threads=3)
  np.testing.assert_array_equal(meta['labels'][:, 1], 3500 + np.arange(13))
  np.testing.assert_array_equal(meta['data_type'], np.arange(13) % 3)
  assert meta['apogee_id'][12] == '2M00000012'


def test_open_split_missing_dir_names_it(tmp_path):
  with pytest.raises(input_pipeline.InputPipelineError, match=str(tmp_path)):
    input_pipeline.open_split(str(tmp_path), 'train')


@pytest.fixture(scope='module')
def built_dir(tmp_path_factory):
  pytest.importorskip('tensorflow_datasets')
  build = pytest.importorskip('tfds_apogee.build')
  synthetic = pytest.importorskip('apogeenet_jax.synthetic')
  root = tmp_path_factory.mktemp('apogee')
  synthetic.write_survey(root / 'raw', num_stars=40, seed=1, show_progress=False)
  build.build(manual_dir=str(root / 'raw'), data_dir=str(root / 'tfds'))
  return root / 'tfds'


def test_open_split_reads_built_records(built_dir):
  sources = {s: input_pipeline.open_split(str(built_dir), s) for s in ('train', 'dev', 'test')}
  assert sum(len(s) for s in sources.values()) == 40
  batch = next(input_pipeline.eval_batches(sources['train'], 4))
  assert batch['flux'].shape == (4, N_PIXELS) and batch['flux'].dtype == np.float32
  assert np.all(np.isfinite(batch['flux']))
  assert np.all(batch['flux_err'][:, 0] == BAD_PIXEL_ERROR)  # array ends are bad pixels
  assert all(i.startswith('2M99') for i in batch['apogee_id'])
  # The apStar file relative to the manual_dir, for the catalogue's FILE column.
  assert all(f.startswith('synthetic/') and f.endswith('.fits') for f in batch['file'])
  assert set(batch['data_type']) <= {0, 1, 2}
  # Coordinates reach the catalogue exactly: float32 would move them by up to ~0.05 arcsec.
  for key in ('ra', 'dec'):
    assert batch[key].dtype == np.float64
    np.testing.assert_array_equal(batch[key], [sources['train'][i][key] for i in range(4)])
  # The version folder itself works too.
  version_dir = next((built_dir / 'apogee').iterdir())
  assert len(input_pipeline.open_split(str(version_dir), 'train')) == len(sources['train'])
  with pytest.raises(input_pipeline.InputPipelineError, match='no split'):
    input_pipeline.open_split(str(built_dir), 'validation')


@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_a_damaged_shard_is_named_and_the_build_fingerprint_rides_along(built_dir, tmp_path,
                                                                        damage):
  # A truncated or bit-flipped array_record shard gave riegeli's RuntimeError, no path.
  import shutil
  copy = tmp_path / 'tfds'
  shutil.copytree(built_dir, copy)
  source = input_pipeline.open_split(str(copy), 'train')
  assert source.dataset_info.metadata['input_fingerprint']  # what a merge compares
  shard = next(p for p in (copy / 'apogee').glob('*/apogee-train.array_record-*'))
  data = bytearray(shard.read_bytes())
  if damage == 'truncate':
    data = data[:len(data) // 2]
  else:
    data[len(data) // 3:len(data) // 3 + 64] = bytes(64)
  shard.write_bytes(bytes(data))
  source = input_pipeline.open_split(str(copy), 'train')
  with pytest.raises(input_pipeline.InputPipelineError, match=rf'{shard}.*--overwrite'):
    for _ in input_pipeline.eval_batches(source, 4):
      pass
