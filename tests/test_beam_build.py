"""The `apogee` builder through Apache Beam builds what the local build builds.

A SYNTHETIC survey of 40 stars with bad files mixed in (a truncated FITS file, a text file
named like an apStar file) is built twice: locally (the TensorFlow-free process pool) and by the
Beam DirectRunner with two worker processes. Every split must hold the same examples, compared
by APOGEE ID feature by feature and as stored tf.train.Example records, byte for byte; skipped.csv, the
input fingerprint and the split assignment must be the same. Needs the `tfds` extra (apache-beam).
The Beam build goes through tfds_apogee.build (--beam_pipeline_options) and, in the slow test,
through the `tfds build tfds_apogee/apogee` command line.
"""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('apache_beam')

import tensorflow_datasets as tfds
from array_record.python import array_record_module
from astropy.table import Table
from tensorflow_datasets.proto import tf_example_pb2

import tfds_apogee  # noqa: F401  (registers 'apogee')
from apogeenet_jax import constants, labels, synthetic
from tfds_apogee import build as build_lib
from tfds_apogee.apogee import apogee_dataset_builder

BEAM_OPTIONS = 'runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing'
SPLIT_SEED = 0  # What `tfds build` uses: it cannot pass builder arguments.
NUM_STARS = 40
# Hashed splits (no SPLIT column) and their metadata must be the same on both paths.
SAME_METADATA = ('input_fingerprint', 'split_seed', 'catalog', 'label_names', 'label_units',
                 'n_problems', 'n_unreadable_files')


def _survey(manual):
  """40 synthetic stars + a truncated file + a text file, both with catalogue rows."""
  synthetic.write_survey(manual, num_stars=NUM_STARS, seed=3, show_progress=False)
  catalog = Table.read(manual / 'labels.fits')
  del catalog['FILE']  # Match by the ID in the file name.
  good = sorted((manual / 'synthetic').rglob('apStar-*.fits'))[0]
  bad_dir = manual / 'bad'
  bad_dir.mkdir()
  truncated = bad_dir / 'apStar-r8-2M88000001+0000001.fits'
  truncated.write_bytes(good.read_bytes()[:20_000])
  garbage = bad_dir / 'apStar-r8-2M88000002+0000002.fits'
  garbage.write_bytes(b'SIMPLE  =    T / not really\n' + bytes(range(256)) * 20)
  no_photometry = [np.nan] * (len(catalog.colnames) - 8)
  for apogee_id in ('2M88000001+0000001', '2M88000002+0000002'):
    catalog.add_row((apogee_id, 4.0, 3500.0, 0.0, 'MStar', 0.0, 1, 'mdwarf', *no_photometry))
  catalog.add_row(('2M88000003+0000003', 4.0, 3600.0, 0.0, 'MStar', 0.0, 1, 'mdwarf',
                   *no_photometry))  # No file.
  catalog.write(manual / 'labels.fits', overwrite=True)


def _raw_records(builder, split):
  """APOGEE ID → the stored tf.train.Example of one split, serialized deterministically.

  Re-serialized, not the stored bytes as such: protobuf (upb) writes the entries of the
  feature map in an order that changes from process to process, so even two local builds differ
  there; deterministic serialization orders them, every other byte is the stored one.
  """
  records = {}
  for path in sorted(builder.data_path.glob(f'apogee-{split}.array_record-*')):
    reader = array_record_module.ArrayRecordReader(str(path))
    for raw in reader.read_all():
      example = tf_example_pb2.Example.FromString(raw)
      apogee_id = example.features.feature['apogee_id'].bytes_list.value[0].decode()
      assert apogee_id not in records, f'{apogee_id} twice in {split}'
      records[apogee_id] = example.SerializeToString(deterministic=True)
    reader.close()
  return records


def _by_id(data_dir, split):
  """APOGEE ID → {feature: (dtype, shape, bytes)} for every example of one split."""
  source = tfds.data_source('apogee', split=split, data_dir=str(data_dir))
  out = {}
  for i in range(len(source)):
    record = source[i]
    apogee_id = record['apogee_id']
    apogee_id = apogee_id.decode() if isinstance(apogee_id, bytes) else str(apogee_id)
    assert apogee_id not in out, f'{apogee_id} twice in {split}'
    out[apogee_id] = {k: (np.asarray(v).dtype.str, np.asarray(v).shape, np.asarray(v).tobytes())
                      for k, v in record.items()}
  return out


@pytest.fixture(scope='module')
def local_build(tmp_path_factory):
  """(tmp, the survey's local build). Cheap; the Beam builds are made by the tests that check
  them, one each, so that pytest-xdist never repeats one on another worker."""
  tmp = tmp_path_factory.mktemp('beam_build')
  _survey(tmp / 'manual')
  return tmp, build_lib.build(str(tmp / 'manual'), str(tmp / 'local'), split_seed=SPLIT_SEED)


def _assert_same_data_set(local, local_dir, beamed, beam_dir):
  """Same splits, same examples byte for byte, same skip report, same metadata, same files."""
  local_counts = {name: s.num_examples for name, s in local.info.splits.items()}
  beam_counts = {name: s.num_examples for name, s in beamed.info.splits.items()}
  assert sum(local_counts.values()) == NUM_STARS
  assert set(local_counts) == set(constants.SPLITS)  # 40 stars: every split has some.
  assert beam_counts == local_counts
  for split in constants.SPLITS:
    local_examples, beam_examples = _by_id(local_dir, split), _by_id(beam_dir, split)
    assert set(beam_examples) == set(local_examples), split
    for apogee_id, features in local_examples.items():
      assert beam_examples[apogee_id] == features, (split, apogee_id)
    assert _raw_records(beamed, split) == _raw_records(local, split), split
  assert beamed.info.file_format == local.info.file_format

  report = apogee_dataset_builder.SKIP_REPORT
  assert (beamed.data_path / report).read_bytes() == (local.data_path / report).read_bytes()
  problems = {p.apogee_id: p.reason for p in labels.read_problems(local.data_path / report)}
  assert set(problems) == {'2M88000001+0000001', '2M88000002+0000002', '2M88000003+0000003'}
  assert 'no apStar file' in problems['2M88000003+0000003']
  assert local.info.metadata['n_unreadable_files'] == 2
  for key in SAME_METADATA:
    assert beamed.info.metadata[key] == local.info.metadata[key], key
  # Nothing of the Beam pipeline's scratch files is left in the data set.
  assert sorted(p.name for p in beamed.data_path.iterdir()) == sorted(
      p.name for p in local.data_path.iterdir())


def test_beam_build_equals_local_build(local_build):
  """python -m tfds_apogee.build --beam_pipeline_options=... (the DirectRunner, 2 processes)."""
  tmp, local = local_build
  manual, data_dir = str(tmp / 'manual'), str(tmp / 'beam')
  beamed = build_lib.build(manual, data_dir, split_seed=SPLIT_SEED,
                           beam_pipeline_options=BEAM_OPTIONS)
  _assert_same_data_set(local, tmp / 'local', beamed, tmp / 'beam')
  # Same inputs: the Beam-built data set is reused, by either path; other inputs: refused.
  again = build_lib.build(manual, data_dir, split_seed=SPLIT_SEED)
  assert again.info.metadata['input_fingerprint'] == beamed.info.metadata['input_fingerprint']
  with pytest.raises(apogee_dataset_builder.StaleDatasetError):
    build_lib.build(manual, data_dir, split_seed=SPLIT_SEED + 1,
                    beam_pipeline_options=BEAM_OPTIONS)


@pytest.mark.slow
def test_tfds_build_command_line_with_beam(local_build):
  """`tfds build tfds_apogee/apogee --beam_pipeline_options=...` (loads the builder from its
  folder, as module `apogee.apogee_dataset_builder`) builds the same data set."""
  pytest.importorskip('tensorflow')  # The tfds command line imports it.
  tmp, local = local_build
  folder = apogee_dataset_builder.Builder._get_pkg_dir_path()
  result = subprocess.run(
      [sys.executable, '-m', 'tensorflow_datasets.scripts.cli.main', 'build', str(folder),
       f'--manual_dir={tmp / "manual"}', f'--data_dir={tmp / "cli"}',
       f'--beam_pipeline_options={BEAM_OPTIONS}'],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  cli = tfds.builder('apogee', data_dir=str(tmp / 'cli'))
  _assert_same_data_set(local, tmp / 'local', cli, tmp / 'cli')
