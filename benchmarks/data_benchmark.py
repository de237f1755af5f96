r"""Data layer throughput: build files/s, read examples/s, bytes per example.

  python benchmarks/data_benchmark.py [--manual_dir=M] [--num_stars=1000] [--num_workers=2]

Without --manual_dir it first writes a SYNTHETIC survey of --num_stars stars to a temporary
directory (timed separately). Then it builds the `apogee` TFDS data set (array_record), and reads
it back (1) by random access through tfds.data_source, one thread, and (2) through a grain
DataLoader with shuffling and batches of 128 as training reads it, flux preprocessing included.
The reference to beat: training consumes ~200 spectra/s (fwd+bwd, CPU) to ~1,000/s (forward).
Prints figures; asserts nothing.
"""

import os
import pathlib
import sys
import tempfile
import time

import grain.python as grain
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from apogeenet_jax import preprocessing
from benchmarks.common import manual_dir_or_survey
from tfds_apogee import build as build_lib

_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Existing manual_dir; else synthetic.')
_NUM_STARS = flags.DEFINE_integer('num_stars', 1000, 'Synthetic survey size.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', os.cpu_count() or 1, 'Build reader processes.')
_READS = flags.DEFINE_integer('reads', 2000, 'Random-access reads to time.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'grain batch size (paper: 128).')
_GRAIN_WORKERS = flags.DEFINE_integer('grain_workers', 2, 'grain worker processes (besides 0).')
_EPOCHS = flags.DEFINE_integer('epochs', 3, 'Epochs of the train split read through grain.')
TRAINING_RATE = 200.0  # spectra/s: fwd+bwd+SGD at batch 128 on 2 CPU cores (docs/measurements.md).


class _Preprocess(grain.MapTransform):
  """What training does per example: THE flux preprocessing, labels as float32."""

  def map(self, record):
    return {'flux': preprocessing.preprocess_flux(record['flux']),
            'labels': np.asarray(record['labels'], np.float32)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  with tempfile.TemporaryDirectory() as tmp:
    manual_dir = manual_dir_or_survey(_MANUAL_DIR.value, tmp, _NUM_STARS.value)

    data_dir = os.path.join(tmp, 'data')
    start = time.perf_counter()
    builder = build_lib.build(manual_dir, data_dir, num_workers=_NUM_WORKERS.value)
    elapsed = time.perf_counter() - start
    n = sum(s.num_examples for s in builder.info.splits.values())
    n_files = n + max(sum(1 for _ in open(builder.data_path / 'skipped.csv')) - 1, 0)
    print(f'build ({_NUM_WORKERS.value} reader processes): {n_files} files in {elapsed:.1f} s '
          f'= {n_files / elapsed:.0f} files/s')
    size = sum(os.path.getsize(f) for f in builder.data_path.glob('*.array_record-*'))
    print(f'bytes per example: {size / n:,.0f} (raw flux + error float32: '
          f'{2 * 4 * 8575:,}); {size / 2**20:.1f} MiB for {n} examples')

    source = tfds.data_source('apogee', split='train', data_dir=data_dir)
    rng = np.random.default_rng(0)
    indices = rng.integers(0, len(source), _READS.value)
    source[int(indices[0])]  # Open the files outside the timing.
    start = time.perf_counter()
    for i in indices:
      source[int(i)]
    rate = _READS.value / (time.perf_counter() - start)
    print(f'random access (tfds.data_source, 1 thread): {rate:,.0f} examples/s '
          f'= {rate / TRAINING_RATE:.1f}x training\'s {TRAINING_RATE:.0f}/s')

    for workers in sorted({0, _GRAIN_WORKERS.value}):
      loader = grain.DataLoader(
          data_source=source,
          sampler=grain.IndexSampler(len(source), shard_options=grain.NoSharding(), shuffle=True,
                                     num_epochs=_EPOCHS.value, seed=0),
          operations=[_Preprocess(), grain.Batch(_BATCH.value, drop_remainder=True)],
          worker_count=workers)
      iterator = iter(loader)
      next(iterator)  # Worker start-up and the first batch are outside the timing.
      start = time.perf_counter()
      count = 0
      for batch in iterator:
        assert batch['flux'].shape == (_BATCH.value, 8575)
        count += len(batch['flux'])
      rate = count / (time.perf_counter() - start)
      print(f'grain DataLoader (shuffle, batch {_BATCH.value}, preprocess, {workers} workers): '
            f'{rate:,.0f} examples/s = {rate / TRAINING_RATE:.1f}x training\'s '
            f'{TRAINING_RATE:.0f}/s')


if __name__ == '__main__':
  app.run(main)
