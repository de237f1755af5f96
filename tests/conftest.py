"""Shared test set-up.

Four fake CPU devices for the data-parallel tests: XLA reads this flag once, before JAX starts,
so it is set here, before any test module imports jax.
"""

import os
import pathlib

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Real SDSS apStar samples live beside the checkout, never inside it (../shared/data/README.md).
REAL_APSTAR_DIR = PROJECT_ROOT.parent / 'shared' / 'data' / 'apstar'


@pytest.fixture(scope='session')
def real_apstar_files() -> list[pathlib.Path]:
  """The real apStar files in ../shared/data/apstar; the test is skipped when they are absent."""
  files = sorted(REAL_APSTAR_DIR.glob('apStar-*.fits'))
  if not files:
    pytest.skip(f'no real apStar files in {REAL_APSTAR_DIR}')
  return files
