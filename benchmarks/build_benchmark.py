r"""Data preparation throughput: the local build vs the Apache Beam DirectRunner, in files/s.

  python benchmarks/build_benchmark.py [--manual_dir=M] [--num_stars=1000] [--repeats=2]

Without --manual_dir it first writes a SYNTHETIC survey of --num_stars stars to a temporary
directory (timed separately). Then it builds the `apogee` data set (array_record) from the same
survey, each time into a new data_dir, in three ways:
  * local, 1 reader process (`python -m tfds_apogee.build --num_workers=1`);
  * local, 2 reader processes (`--num_workers=2`);
  * Beam, the DirectRunner with 2 worker processes (`--beam_pipeline_options=runner=DirectRunner,
    direct_num_workers=2,direct_running_mode=multi_processing`).
One round runs the three one after the other, so all see the same background load; --repeats
rounds, each figure is the median over them. A build's time is the whole of
tfds_apogee.build.build(): catalogue matching, reading, encoding, writing, and for Beam the
pipeline's start-up (worker processes, job service). files = examples + unreadable files.
Needs the `tfds` extra (apache-beam). Prints figures; asserts nothing. The last line is the Beam
rate over the local rate, both with 2 workers.
"""

import os
import pathlib
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_model, manual_dir_or_survey
from tfds_apogee import build as build_lib

_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Existing manual_dir; else synthetic.')
_NUM_STARS = flags.DEFINE_integer('num_stars', 1000, 'Synthetic survey size.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Rounds of the three builds; figures are medians.')

BEAM_2 = 'runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing'
# (label, num_workers, beam_pipeline_options)
MODES = (('local, 1 worker', 1, None),
         ('local, 2 workers', 2, None),
         ('beam DirectRunner, 2 workers', 1, BEAM_2))


def _files(builder) -> int:
  n = sum(s.num_examples for s in builder.info.splits.values())
  return n + int(builder.info.metadata.get('n_unreadable_files', 0))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import logging as std_logging  # Beam logs every worker's start and stop at INFO.
  std_logging.getLogger('apache_beam').setLevel(std_logging.WARNING)
  print(f'CPU: {cpu_model()}')
  # Other processes on the machine slow every build; the load average says how busy it was.
  print(f'load average (1, 5, 15 min) at start: {os.getloadavg()}')
  with tempfile.TemporaryDirectory() as tmp:
    manual_dir = manual_dir_or_survey(_MANUAL_DIR.value, tmp, _NUM_STARS.value)

    rates = {label: [] for label, _, _ in MODES}
    for round_ in range(_REPEATS.value):
      for i, (label, workers, beam_options) in enumerate(MODES):
        data_dir = os.path.join(tmp, f'data-{round_}-{i}')
        start = time.perf_counter()
        builder = build_lib.build(manual_dir, data_dir, num_workers=workers,
                                  beam_pipeline_options=beam_options)
        elapsed = time.perf_counter() - start
        n_files = _files(builder)
        rates[label].append(n_files / elapsed)
        print(f'round {round_ + 1}: {label}: {n_files} files in {elapsed:.1f} s '
              f'= {n_files / elapsed:.1f} files/s', flush=True)

    print(f'load average (1, 5, 15 min) at end: {os.getloadavg()}')
    median = {label: statistics.median(r) for label, r in rates.items()}
    for label, rate in median.items():
      print(f'{label}: {rate:.1f} files/s (median of {len(rates[label])})')
    local_2, beam_2 = median['local, 2 workers'], median['beam DirectRunner, 2 workers']
    print(f'beam/local files/s (2 workers): {beam_2 / local_2:.2f}')


if __name__ == '__main__':
  app.run(main)
