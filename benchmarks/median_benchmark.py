r"""What the per-spectrum flux level costs: the good-pixel median by bisection against a sort.

    python benchmarks/median_benchmark.py [--batch_size=400] [--rounds=3]

``flux_scaling='log_median'`` (the default recipe) divides every spectrum by the median of its
good pixels inside the module, so training, prediction and each of the 100 Monte Carlo draws
of every star compute it. Times, interleaved round by round on the same random spectra
(median of the rounds, compile excluded):
  1. the median alone: ``model.good_pixel_median`` (bisection on the bit patterns) and
     ``jnp.nanmedian`` of the positive pixels (a sort), checked equal bit for bit;
  2. the paper-size network's forward pass (Appendix B, random weights) with
     ``flux_scaling='none'`` (raw flux, the converted weights), 'log_median' with the bisection,
     and 'log_median' with the sort (the module before the change).
Prints spectra/s and the ratios; asserts nothing.
"""

import pathlib
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apogeenet_jax.constants import N_PIXELS  # noqa: E402
from apogeenet_jax.models import apogee_net as model_lib  # noqa: E402
from apogeenet_jax.models import layers  # noqa: E402
from benchmarks.common import cpu_model  # noqa: E402

_BATCH = flags.DEFINE_integer('batch_size', 400, 'Spectra per call (16 stars × 25 draws: 400).')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds; the median is reported.')


def _sorted_median(flux):
  return jnp.nanmedian(jnp.where(flux > 0, flux, jnp.nan), axis=1)


def _timer(fn, *args):
  fn(*args).block_until_ready()  # compile

  def once():
    t = time.perf_counter()
    fn(*args).block_until_ready()
    return time.perf_counter() - t
  return once


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  flux = rng.lognormal(3.0, 1.0, (_BATCH.value, N_PIXELS)).astype(np.float32)
  flux[:, :300] = 0.0  # bad pixels
  flux = jnp.asarray(flux)
  bisect, sort = jax.jit(layers.good_pixel_median), jax.jit(_sorted_median)
  np.testing.assert_array_equal(np.asarray(bisect(flux)), np.asarray(sort(flux)))
  timers = {'median, bisection': _timer(bisect, flux), 'median, sort': _timer(sort, flux)}
  for name, scaling, median in (('forward, raw flux', 'none', None),
                                ('forward, log_median (bisection)', 'log_median', None),
                                ('forward, log_median (sort)', 'log_median', _sorted_median)):
    net = model_lib.APOGEENet(flux_scaling=scaling, dropout_rate=0.0)
    params = net.init(jax.random.PRNGKey(0), flux[:1])
    forward = jax.jit(lambda p, x, net=net: net.apply(p, x))  # one jit (and trace) per case
    if median is None:
      timers[name] = _timer(forward, params, flux)
    else:  # traced with the sort in place of the bisection
      with mock.patch.object(layers, 'good_pixel_median', median):
        timers[name] = _timer(forward, params, flux)
  times = {name: [] for name in timers}
  for _ in range(_ROUNDS.value):
    for name, once in timers.items():
      times[name].append(once())
  print(f'median_benchmark: batch {_BATCH.value}, {_ROUNDS.value} rounds; {cpu_model()} '
        f'({jax.local_device_count()} {jax.default_backend()} device)')
  best = {name: float(np.median(t)) for name, t in times.items()}
  for name, t in best.items():
    print(f'{name:34s} {t * 1e3:8.1f} ms  {_BATCH.value / t:8.0f} spectra/s')
  print(f'median: sort / bisection time {best["median, sort"] / best["median, bisection"]:.1f}×')
  print('forward with log_median: sort / bisection time '
        f'{best["forward, log_median (sort)"] / best["forward, log_median (bisection)"]:.2f}×')


if __name__ == '__main__':
  app.run(main)
