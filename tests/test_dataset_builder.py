"""The `apogee` TFDS builder without TensorFlow: array_record build, data_source read-back.

The tfds.testing.DatasetBuilderTestCase version (needs TensorFlow) is
tfds_apogee/apogee/apogee_dataset_builder_test.py.
"""

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from astropy.io import fits
from astropy.table import Table

import tfds_apogee  # noqa: F401  (registers 'apogee')
from apogeenet_jax import apstar, constants, input_pipeline, labels, synthetic
from tfds_apogee import build as build_lib
from tfds_apogee.apogee import apogee_dataset_builder, make_dummy_data

DUMMY_DIR = make_dummy_data.DUMMY_DIR


def _build(manual_dir, data_dir, **kwargs):
  return build_lib.build(str(manual_dir), str(data_dir), **kwargs)


def _records(data_dir, split):
  source = tfds.data_source('apogee', split=split, data_dir=str(data_dir))
  return [source[i] for i in range(len(source))]


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def _assert_bitwise_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape
  np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_dummy_data_build_and_read_back(tmp_path):
  builder = _build(DUMMY_DIR, tmp_path)
  assert builder.info.file_format.value == 'array_record'  # The TF-free default.
  counts = {name: s.num_examples for name, s in builder.info.splits.items()}
  assert counts == {'train': 3, 'dev': 1, 'test': 1}
  catalog = {s.apogee_id: s for s in labels.read_label_catalog(DUMMY_DIR / 'labels.ecsv')}
  seen = set()
  for split in constants.SPLITS:
    for record in _records(tmp_path, split):
      apogee_id = _text(record['apogee_id'])
      seen.add(apogee_id)
      star = catalog[apogee_id]
      assert star.split == split
      spectrum = apstar.read_apstar(DUMMY_DIR / _text(record['file']))
      _assert_bitwise_equal(record['flux'], spectrum.flux)  # Raw flux, bit for bit.
      _assert_bitwise_equal(record['flux_err'], spectrum.flux_err)
      _assert_bitwise_equal(record['labels'], star.labels)
      assert constants.DATA_TYPES[record['data_type']] == star.data_type
      assert record['snr'] == np.float32(spectrum.snr)
      # No photometry columns in this catalogue: the features exist, all NaN.
      assert record['metadata'].shape == (7,) and np.isnan(record['metadata']).all()
      assert np.isnan(record['metadata_err']).all()
      assert record['ra'] == spectrum.ra and record['dec'] == spectrum.dec
      assert _text(record['telescope']) == 'SYNTHETIC'
      assert _text(record['field']) == spectrum.field
  assert len(seen) == 5
  report = labels.read_problems(tmp_path / 'apogee' / str(apogee_dataset_builder.Builder.VERSION)
                               / apogee_dataset_builder.SKIP_REPORT)
  by_id = {p.apogee_id: p for p in report}
  assert set(by_id) == {make_dummy_data.BAD_FILE_ID, make_dummy_data.MISSING_FILE_ID}
  assert 'not a readable FITS' in by_id[make_dummy_data.BAD_FILE_ID].reason
  assert by_id[make_dummy_data.BAD_FILE_ID].file.endswith('.fits')
  assert 'no apStar file' in by_id[make_dummy_data.MISSING_FILE_ID].reason
  assert builder.info.metadata['split_seed'] == 0
  assert builder.info.metadata['n_problems'] == 2
  assert builder.info.metadata['n_unreadable_files'] == 1
  # Description and citation come from the builder's README.md and CITATIONS.bib, and the
  # data set on disk carries them.
  folder = apogee_dataset_builder.Builder._get_pkg_dir_path()
  reloaded = tfds.builder('apogee', data_dir=str(tmp_path)).info
  for info in (builder.info, reloaded):
    assert info.description == (folder / 'README.md').read_text().strip()
    assert info.citation == (folder / 'CITATIONS.bib').read_text().strip()
    assert 'Abolfathi2018' in info.citation  # Only in CITATIONS.bib, never inline.


def test_real_files_round_trip_bit_for_bit(tmp_path, real_apstar_files):
  manual = tmp_path / 'manual'
  (manual / 'apo25m').mkdir(parents=True)
  ids = []
  for path in real_apstar_files:
    shutil.copy(path, manual / 'apo25m' / path.name)
    ids.append(apstar.apogee_id_from_filename(path))
  n = len(ids)
  # Placeholder labels: these tests are about I/O, not accuracy (no reference labels exist).
  Table({'APOGEE_ID': ids, 'LOGG': np.full(n, 4.5), 'TEFF': np.linspace(3000, 4000, n),
         'FE_H': np.zeros(n), 'DATA_TYPE': ['MStar'] * n,
         'SPLIT': ['train'] * (n - 2) + ['dev', 'test']}).write(manual / 'labels.fits')
  _build(manual, tmp_path / 'data')
  records = [r for s in constants.SPLITS for r in _records(tmp_path / 'data', s)]
  assert len(records) == n
  for record in records:
    path = manual / _text(record['file'])
    with fits.open(path) as hdul:  # Straight from the big-endian FITS rows, no reader between.
      row = 0 if hdul[1].data.ndim == 2 else ...
      expected_flux = hdul[1].data[row].astype(np.float32)
      expected_err = hdul[2].data[row].astype(np.float32)
      header = hdul[0].header
    _assert_bitwise_equal(record['flux'], expected_flux)
    _assert_bitwise_equal(record['flux_err'], expected_err)
    assert _text(record['apogee_id']) == header['OBJID']
    assert record['snr'] == np.float32(header['SNR'])
    assert record['ra'] == header['RA'] and record['dec'] == header['DEC']


def test_bad_files_are_skipped_and_reported(tmp_path, real_apstar_files, monkeypatch):
  manual = tmp_path / 'manual'
  synthetic.write_survey(manual, num_stars=30, seed=5, show_progress=False)
  catalog = Table.read(manual / 'labels.fits')
  del catalog['FILE']  # Match by the ID in the file name; no SPLIT column: hashed splits.
  real = real_apstar_files[0]
  truncated = manual / 'apo25m' / 'X' / real.name
  truncated.parent.mkdir(parents=True)
  truncated.write_bytes(real.read_bytes()[:300_000])
  wrong_grid = manual / 'apo25m' / 'X' / 'apStar-r8-2M99888888+0000000.fits'
  with fits.open(real) as hdul:
    hdul = fits.HDUList([h.copy() for h in hdul])
    hdul[0].header['NWAVE'] = 8000
    hdul[0].header['OBJID'] = '2M99888888+0000000'
    hdul.writeto(wrong_grid)
  text = manual / 'apo25m' / 'X' / 'apStar-r8-2M99777777+0000000.fits'
  text.write_text('hello')
  for path in (truncated, wrong_grid, text):
    catalog.add_row((apstar.apogee_id_from_filename(path), 4.0, 3500.0, 0.0, 'YSO', 0.0, 1,
                     'mdwarf', *[np.nan] * (len(catalog.colnames) - 8)))  # No photometry.
  catalog.write(manual / 'labels.fits', overwrite=True)

  # Windows of 2 x 4 files: the 33 files cross several reader windows, bad ones included.
  monkeypatch.setattr(apogee_dataset_builder, '_WINDOW_PER_WORKER', 4)
  builder = _build(manual, tmp_path / 'data', split_seed=11, num_workers=2)
  counts = {name: s.num_examples for name, s in builder.info.splits.items()}
  assert sum(counts.values()) == 30
  ids = {_text(r['apogee_id']) for s in constants.SPLITS for r in _records(tmp_path / 'data', s)}
  assert ids == set(catalog['APOGEE_ID'][:30])  # Every good star once, none lost between windows.
  for split in constants.SPLITS:
    for record in _records(tmp_path / 'data', split):
      star_id = _text(record['apogee_id'])
      data_type = constants.DATA_TYPES[record['data_type']]
      assert labels.assign_split(star_id, data_type, 11) == split
  report = labels.read_problems(builder.data_path / apogee_dataset_builder.SKIP_REPORT)
  reasons = {p.file: p.reason for p in report}
  assert len(report) == 3, report
  assert 'truncated' in reasons[f'apo25m/X/{real.name}']
  assert 'NWAVE = 8000' in reasons['apo25m/X/apStar-r8-2M99888888+0000000.fits']
  assert 'not a readable FITS' in reasons['apo25m/X/apStar-r8-2M99777777+0000000.fits']
  assert all(reason.startswith(str(manual.resolve())) for reason in reasons.values())


def test_tfrecord_is_selectable(tmp_path):
  pytest.importorskip('tensorflow')
  builder = _build(DUMMY_DIR, tmp_path, file_format='tfrecord')
  assert builder.info.file_format.value == 'tfrecord'
  assert list(builder.data_path.glob('apogee-train.tfrecord-*'))
  ds = tfds.load('apogee', split='train', data_dir=str(tmp_path))
  assert len(list(ds)) == 3


def test_rebuild_with_changed_inputs_stops_unless_overwrite(tmp_path):
  # A rebuild must never quietly reuse a data set built from other inputs.
  manual, data = tmp_path / 'manual', tmp_path / 'tfds'
  synthetic.write_survey(manual, num_stars=6, seed=0, show_progress=False)
  first = _build(manual, data)
  n_first = sum(s.num_examples for s in first.info.splits.values())
  assert n_first == 6
  assert first.info.metadata['input_fingerprint']
  _build(manual, data)  # Same inputs: reused, no error.
  table = Table.read(manual / 'labels.fits')
  table[:4].write(manual / 'labels.fits', overwrite=True)
  with pytest.raises(apogee_dataset_builder.StaleDatasetError,
                     match=r'apogee/1\.1\.0.*other inputs.*--overwrite'):
    _build(manual, data)
  rebuilt = _build(manual, data, overwrite=True)
  assert sum(s.num_examples for s in rebuilt.info.splits.values()) == 4
  _build(manual, data)  # The rebuilt set matches its inputs again.
  # A changed apStar file (size and mtime) counts as changed input, too.
  star = manual / table['FILE'][0]
  star.write_bytes(star.read_bytes() + b'\0' * 2880)
  with pytest.raises(apogee_dataset_builder.StaleDatasetError):
    _build(manual, data)


# ------------------------------------------------------------------------------------------------
# Builds that produced nothing usable, or absurd flux, are named, not passed on.


def _survey(tmp_path, n=6, splits=None):
  manual = tmp_path / 'manual'
  synthetic.write_survey(manual, num_stars=n, seed=4, show_progress=False)
  table = Table.read(manual / 'labels.fits')
  if splits is not None:
    table['SPLIT'] = splits
  table.write(manual / 'labels.fits', overwrite=True)
  return manual, table


def test_no_catalogue_row_matching_a_file_is_an_error(tmp_path):
  manual, table = _survey(tmp_path)
  table['APOGEE_ID'] = [f'2M0{i}' for i in range(len(table))]
  del table['FILE']
  table.write(manual / 'labels.fits', overwrite=True)
  with pytest.raises(apogee_dataset_builder.BuildError, match=r'none of the 6 catalogue rows'):
    _build(manual, tmp_path / 'data')


def test_a_split_whose_files_are_all_unreadable_is_an_error_with_a_report(tmp_path):
  manual, table = _survey(tmp_path, splits=['train'] * 4 + ['dev', 'test'])
  (manual / table['FILE'][4]).write_bytes(b'not a fits file')
  with pytest.raises(apogee_dataset_builder.BuildError, match=r"'dev' split.*none of its 1 "
                     r'file.*skipped-failed-build\.csv'):
    _build(manual, tmp_path / 'data')
  report = labels.read_problems(tmp_path / 'data' / 'skipped-failed-build.csv')
  assert [p.apogee_id for p in report] == [table['APOGEE_ID'][4]]


def test_absurd_flux_is_skipped_at_build(tmp_path):
  # 10 pixels at 3e38 passed the build and made training a silent no-op.
  manual, table = _survey(tmp_path)
  path = manual / table['FILE'][1]
  with fits.open(path) as hdul:
    hdul = fits.HDUList([h.copy() for h in hdul])
  flux = hdul[1].data
  (flux[0] if flux.ndim == 2 else flux)[100:110] = 3e38
  hdul.writeto(path, overwrite=True)
  builder = _build(manual, tmp_path / 'data')
  assert sum(s.num_examples for s in builder.info.splits.values()) == 5
  report = labels.read_problems(builder.data_path / apogee_dataset_builder.SKIP_REPORT)
  assert [p.apogee_id for p in report] == [table['APOGEE_ID'][1]]
  assert '3e+38' in report[0].reason and 'flux' in report[0].reason


def test_build_cli_failure_is_one_line_and_readers_die_with_the_build(tmp_path):
  import os
  import signal
  import subprocess
  import sys
  import time
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': root}
  manual, table = _survey(tmp_path)
  table['APOGEE_ID'] = [f'2M0{i}' for i in range(len(table))]
  del table['FILE']
  table.write(manual / 'labels.fits', overwrite=True)
  run = subprocess.run([sys.executable, '-m', 'tfds_apogee.build', f'--manual_dir={manual}',
                        f'--data_dir={tmp_path}/data'], capture_output=True, text=True, env=env,
                       timeout=300)
  assert run.returncode != 0 and 'Traceback' not in run.stderr
  assert 'FATAL' in run.stderr and 'none of the 6 catalogue rows' in run.stderr
  # The readers of a killed build: a parent that is gone (kill -9, or SIGTERM's default) must
  # not leave them running.
  script = ('import concurrent.futures, multiprocessing, os, time\n'
            'from tfds_apogee.apogee import apogee_dataset_builder as b\n'
            "pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing."
            "get_context('spawn'), initializer=b.exit_with_parent, initargs=(os.getpid(),))\n"
            'print(*{f.result() for f in [pool.submit(os.getpid) for _ in range(8)]}, flush=True)\n'
            'time.sleep(600)\n')
  proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True,
                          env=env)
  workers = [int(p) for p in proc.stdout.readline().split()]
  assert workers
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()

  def alive(pid):
    try:
      with open(f'/proc/{pid}/status') as f:
        return 'State:\tZ' not in f.read()
    except FileNotFoundError:
      return False

  deadline = time.time() + 20
  while any(map(alive, workers)) and time.time() < deadline:
    time.sleep(0.5)
  assert not any(map(alive, workers))


# ------------------------------------------------------------------------------------------------
# Only regular files are read; the spectrum rules are the same as at inference.


def test_special_files_and_empty_spectra_are_skipped_with_their_reason(tmp_path):
  import os
  manual, table = _survey(tmp_path, splits=['train'] * 4 + ['dev', 'test'])
  del table['FILE']  # found by the scan, as in a survey folder
  table.write(manual / 'labels.fits', overwrite=True)
  paths = sorted(manual.rglob('apStar-*.fits'))
  by_id = {apstar.apogee_id_from_filename(p): p for p in paths}
  zero, fifo, faint = (by_id[i] for i in table['APOGEE_ID'][:3])
  zero.unlink()
  os.symlink('/dev/zero', zero)
  fifo.unlink()
  os.mkfifo(fifo)
  with fits.open(faint) as hdul:
    hdul = fits.HDUList([h.copy() for h in hdul])
  for k in (1, 2):
    hdul[k].data = hdul[k].data * np.float32(1e-40)
  hdul.writeto(faint, overwrite=True)
  builder = _build(manual, tmp_path / 'data', num_workers=2)
  assert sum(s.num_examples for s in builder.info.splits.values()) == 3
  report = {p.apogee_id: p.reason for p in
            labels.read_problems(builder.data_path / apogee_dataset_builder.SKIP_REPORT)}
  assert 'character device, not a regular file' in report[table['APOGEE_ID'][0]]
  assert 'named pipe (FIFO), not a regular file' in report[table['APOGEE_ID'][1]]
  assert 'median good-pixel flux' in report[table['APOGEE_ID'][2]]


# ------------------------------------------------------------------------------------------------
# A failed build never removes a good data set; one build per data folder at a time.


def test_a_failed_overwrite_keeps_the_good_data_set(tmp_path):
  manual, table = _survey(tmp_path, splits=['train'] * 4 + ['dev', 'test'])
  data = tmp_path / 'data'
  good = _build(manual, data)
  shards = sorted(p.name for p in good.data_path.iterdir())
  nomatch = tmp_path / 'nomatch'
  nomatch.mkdir()
  shutil.copy(manual / 'labels.fits', nomatch / 'labels.fits')  # no apStar file
  with pytest.raises(apogee_dataset_builder.BuildError, match=r'none of the 6.*is kept'):
    _build(nomatch, data, overwrite=True)
  assert sorted(p.name for p in good.data_path.iterdir()) == shards
  # A failure after the checks (the dev split's only file unreadable) puts the old one back.
  (manual / table['FILE'][4]).write_bytes(b'not a fits file')
  with pytest.raises(apogee_dataset_builder.BuildError, match=r"'dev' split"):
    _build(manual, data, overwrite=True)
  assert sorted(p.name for p in good.data_path.iterdir()) == shards
  assert [p.name for p in good.data_path.parent.iterdir() if 'replaced' in p.name] == []
  assert len(_records(data, 'train')) == 4


def test_a_second_build_into_one_data_folder_stops_naming_the_first(tmp_path):
  from apogeenet_jax import workdir_lock
  manual, _ = _survey(tmp_path, splits=['train'] * 4 + ['dev', 'test'])
  data = tmp_path / 'data'
  with workdir_lock.hold(data / 'apogee', what='data set build'):
    with pytest.raises(apogee_dataset_builder.BuildError, match=r'another data set build is '
                       r'using this folder \(pid'):
      _build(manual, data)
  assert _build(manual, data).info.splits['train'].num_examples == 4


def test_a_build_stopped_by_sigterm_cleans_up_and_says_so_in_one_line(tmp_path):
  import os
  import signal
  import subprocess
  import sys
  import time
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': root}
  manual, _ = _survey(tmp_path, splits=['train'] * 4 + ['dev', 'test'])
  data = tmp_path / 'data'
  # Readers that take their time, so that SIGTERM lands in the middle of the build.
  script = ('import sys, time\n'
            'from tfds_apogee.apogee import apogee_dataset_builder as b\n'
            'read = b.read_example\n'
            'def slow(task):\n'
            '  print("reading", flush=True); time.sleep(2); return read(task)\n'
            'b.read_example = slow\n'
            'from tfds_apogee import build\n'
            f'sys.argv = ["build", "--manual_dir={manual}", "--data_dir={data}", '
            '"--num_workers=1"]\n'
            'build.run()\n')
  proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
  while proc.stdout.readline().strip() != 'reading':
    pass
  time.sleep(0.5)
  os.kill(proc.pid, signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0 and 'Traceback' not in err, err[-2000:]
  assert err.strip().splitlines()[-1].startswith('FATAL build stopped by SIGTERM')
  left = [p.name for p in (data / 'apogee').iterdir()] if (data / 'apogee').exists() else []
  assert not [name for name in left if name.startswith('incomplete')], left


def test_build_cli_flag_problems_are_one_line(tmp_path):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': root}
  manual, _ = _survey(tmp_path, splits=['train'] * 4 + ['dev', 'test'])
  (tmp_path / 'a_file').write_text('x')
  cases = [([f'--manual_dir={tmp_path}/a_file', f'--data_dir={tmp_path}/d'], 'not a directory'),
           ([f'--manual_dir={tmp_path}/none', f'--data_dir={tmp_path}/d'], 'no such directory'),
           ([f'--manual_dir={manual}', f'--data_dir={tmp_path}/a_file'], 'is not a directory'),
           ([f'--manual_dir={manual}', f'--data_dir={tmp_path}/d',
             '--beam_pipeline_options=runner=BogusRunner'], 'Unexpected pipeline runner'),
           ([f'--manual_dir={manual}', f'--data_dir={tmp_path}/d',
             '--beam_pipeline_options==,,='], 'not of the form name=value')]
  procs = [subprocess.Popen([sys.executable, '-m', 'tfds_apogee.build', *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for flags, _ in cases]
  for proc, (flags, message) in zip(procs, cases, strict=True):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and 'Traceback' not in err, (flags, err[-2000:])
    assert message in err, (flags, err[-500:])
  assert not (tmp_path / 'd').exists()


# Photometry for APOGEE Net II: the `metadata` features (builder 1.1.0), and 1.0.0 records.


def test_photometry_columns_become_metadata_features_nan_where_missing(tmp_path):
  manual = tmp_path / 'manual'
  synthetic.write_survey(manual, num_stars=8, seed=2, show_progress=False)
  table = Table.read(manual / 'labels.fits')
  table['G'][0] = np.nan  # No value,
  table['J'][1] = 99.999  # the catalogues' "missing", stored as given,
  del table['K_ERR']  # and a column the catalogue lacks.
  table['SPLIT'] = ['train'] * 6 + ['dev', 'test']
  table.write(manual / 'labels.fits', overwrite=True)
  builder = _build(manual, tmp_path / 'data')
  assert builder.info.metadata['metadata_columns_with_values'] == list(constants.METADATA_COLUMNS)
  rows = {_text(r['apogee_id']): r for s in constants.SPLITS for r in _records(tmp_path / 'data', s)}
  assert len(rows) == 8
  for star in table:
    record = rows[star['APOGEE_ID']]
    want = np.array([star[c] for c in constants.METADATA_COLUMNS], np.float32)
    want_err = np.array([star[c] if c in table.colnames else np.nan
                         for c in constants.METADATA_ERR_COLUMNS], np.float32)
    _assert_bitwise_equal(record['metadata'], want)  # NaN where NaN, bit for bit elsewhere.
    _assert_bitwise_equal(record['metadata_err'], want_err)
  assert np.isnan(rows[table['APOGEE_ID'][0]]['metadata'][1])
  assert rows[table['APOGEE_ID'][1]]['metadata'][4] == np.float32(99.999)
  source = input_pipeline.open_split(tmp_path / 'data', 'train')
  assert input_pipeline.has_metadata(source)
  batch = next(input_pipeline.eval_batches(source, 4))
  assert batch['metadata'].shape == (4, 7) and batch['metadata'].dtype == np.float32


class _BuilderWithoutMetadata(apogee_dataset_builder.Builder, skip_registration=True):
  """The builder as it was at 1.0.0: no `metadata` features."""

  name = 'apogee'
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = dict(super()._info().features)
    for key in input_pipeline.METADATA_KEYS:
      del features[key]
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                          supervised_keys=('flux', 'labels'),
                                          metadata=tfds.core.MetadataDict())

  def _generate_examples(self, tasks, split=''):
    for key, example in super()._generate_examples(tasks, split):
      yield key, {k: v for k, v in example.items() if k not in input_pipeline.METADATA_KEYS}


def test_records_built_without_metadata_still_read_for_net_one(tmp_path):
  """A 1.0.0 data set reads as before (Net I's batches); a Net II run is refused in one line."""
  old = _BuilderWithoutMetadata(data_dir=str(tmp_path))
  old.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=DUMMY_DIR))
  source = input_pipeline.open_split(tmp_path, 'train')
  assert source.dataset_info.version == '1.0.0'
  assert not input_pipeline.has_metadata(source)
  batch = next(input_pipeline.eval_batches(source, 3))
  assert batch['flux'].shape == (3, constants.N_PIXELS) and batch['mask'].all()
  assert not set(input_pipeline.METADATA_KEYS) & set(batch)
  with pytest.raises(input_pipeline.InputPipelineError, match=r'1\.0\.0.*metadata.*rebuild'):
    input_pipeline.require_metadata(source)
  assert not input_pipeline.has_metadata([{'flux': batch['flux'][0]}])
