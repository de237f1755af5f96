"""benchmarks/information_limit.py refuses what its bound does not hold for, in one line."""

import os
import pathlib
import subprocess
import sys

import numpy as np
from astropy.table import Table

from apogeenet_jax import apstar
from tfds_apogee import build as build_lib

# The benchmark is run as a program, never imported here: its absl flags (--workdir, …) would
# clash with evaluate.py's in the same test process.
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*flags):
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen([sys.executable, str(ROOT / 'benchmarks' / 'information_limit.py'),
                           *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)


def test_a_survey_of_real_apstar_files_and_user_errors_are_one_line(tmp_path, real_apstar_files):
  manual = tmp_path / 'manual'
  manual.mkdir()
  ids = []
  for path in real_apstar_files[:4]:
    os.symlink(path, manual / path.name)
    ids.append(apstar.apogee_id_from_filename(path))
  Table({'APOGEE_ID': ids, 'LOGG': np.full(4, 4.5), 'TEFF': np.full(4, 4000.0),
         'FE_H': np.zeros(4), 'DATA_TYPE': ['MStar'] * 4,
         'SPLIT': ['train', 'train', 'dev', 'test']}).write(manual / 'labels.fits')
  build_lib.build(str(manual), str(tmp_path / 'real'))
  cases = [(['--data_dir', str(tmp_path / 'real')],
            "record 0 of the split was observed with 'apo25m', not written by the synthetic"),
           (['--data_dir', str(tmp_path / 'none')], 'no built dataset'),
           (['--data_dir', str(tmp_path / 'real'), '--nuisances=bogus'], 'unknown nuisance'),
           (['--data_dir', str(tmp_path / 'real'), '--batch_size=0'], 'batch_size')]
  procs = [_run(*flags) for flags, _ in cases]
  for proc, (flags, message) in zip(procs, cases, strict=True):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and 'Traceback' not in err, (flags, err[-1500:])
    assert message in err and 'residual / Cramér–Rao' not in out, (flags, err[-500:])
