r"""YSO photometric network (§2.4): accuracy on held-out synthetic stars, and time, on the FAKE grid.

  python benchmarks/yso_photometric_benchmark.py [--num_train=42000] [--max_epochs=200] \
      [--isochrones=a.dat,b.dat]

Without --isochrones it trains on the FAKE isochrones of ``label_sources.fake_isochrones`` (toy
physics, not PARSEC): the figures then say how well the machinery learns a smooth noiseless
grid, not how well it would do on PARSEC. Reference (paper §2.4, PARSEC, 42,000 stars, noiseless
held-out synthetic stars): log g 0.01 dex, log Teff 0.003 dex. Prints figures; asserts nothing.
"""

import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from apogeenet_jax import yso_photometric
from apogeenet_jax.label_sources import fake_isochrones, isochrones

_ISOCHRONES = flags.DEFINE_list('isochrones', [], 'CMD files; default the FAKE grid.')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 42_000, 'Synthetic training stars (§2.4).')
_MAX_EPOCHS = flags.DEFINE_integer('max_epochs', 200, 'Epoch cap (early stopping usually ends it).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints go; default a temp dir.')


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    paths = _ISOCHRONES.value or fake_isochrones.write(os.path.join(tmp, 'iso'))
    iso = isochrones.read_isochrones(paths)
    config = yso_photometric.default_config()
    config.num_train, config.max_epochs = _NUM_TRAIN.value, _MAX_EPOCHS.value
    workdir = _WORKDIR.value or os.path.join(tmp, 'yso')
    t0 = time.perf_counter()
    scores = yso_photometric.train(iso, workdir, config)
    seconds = time.perf_counter() - t0
    test = isochrones.synthesize(iso, config.num_test, config.seed + 2)
    print(f'grid: {"user isochrones" if _ISOCHRONES.value else "FAKE (toy physics)"}; '
          f'{config.num_train} training stars; {seconds:.0f} s (synthesis + training + test)')
    print(f'{"target":10s} {"std(pred-true)":>15s} {"median":>10s} {"std(true)":>10s}')
    for name in isochrones.TARGETS:
      print(f'{name:10s} {scores[name + "_std"]:15.4f} {scores[name + "_median"]:10.4f} '
            f'{np.std(test[name]):10.4f}')
    print('paper (PARSEC): LOGG 0.01 dex, LOG_TEFF 0.003 dex')


if __name__ == '__main__':
  app.run(main)
