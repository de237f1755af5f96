r"""What APOGEE Net II's metadata MLP can read from the photometry alone, per metadata_transform.

    python benchmarks/metadata_transform.py --labels=data/s20h/raw/labels.fits

The authors' metadata MLP (``models.apogee_net_2.MetadataNet``, 7 → 8 → 16 → 32 → 32 → 64, ReLU)
with a small head (Dense 128, ReLU, Dense 2) is trained on the photometry alone to predict the
standardised (log g, log10 Teff) of a labels table with the 7 columns PLX, G, BP, RP, J, H, K
(the synthetic survey's ``labels.fits``, or any catalogue with them): the same stars, seed,
steps and Adam cosine schedule for each transform, the statistics fitted on the training stars
as training does (``fit_metadata``). It prints the held-out rms per transform, over all stars and
over those with all 7 values (a star without BP or RP has little photometric Teff, whatever reads
it), and the ratio to 'magnitudes'. No spectrum: this isolates the metadata path, where the
whole network's log10 Teff residual against the bound of spectra + photometry is largest at low
S/N (docs/model_families.md).
"""

import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from astropy.table import Table

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from apogeenet_jax import constants
from apogeenet_jax.models import apogee_net_2
from benchmarks.common import cpu_model

_LABELS = flags.DEFINE_string('labels', None, 'Labels table (FITS/ECSV/CSV) with LOGG, TEFF and '
                              'the 7 photometry columns.', required=True)
_TRANSFORMS = flags.DEFINE_list('transforms', list(constants.METADATA_TRANSFORMS),
                                'metadata_transform values to compare.')
_STEPS = flags.DEFINE_integer('steps', 20000, 'Adam steps per transform.', lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Stars per step.', lower_bound=1)
_TEST_FRACTION = flags.DEFINE_float('test_fraction', 0.25, 'Held-out fraction of the stars.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2', '3'], 'Seeds of the init and the batches: '
                           'each transform is trained once per seed (the split is seed 0\'s).')


class PhotometryOnly(nn.Module):
  """The authors' metadata MLP and a small head: z-scored metadata (batch, 7) → (batch, 2)."""

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    x = apogee_net_2.MetadataNet(name='metadata')(z)
    return nn.Dense(2)(nn.relu(nn.Dense(128)(x)))


def _train(z: np.ndarray, y: np.ndarray, train: np.ndarray, seed: int
           ) -> tuple[nn.Module, dict]:
  model = PhotometryOnly()
  params = model.init(jax.random.key(seed), z[:1])
  optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, _STEPS.value))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    grads = jax.grad(lambda p: jnp.mean((model.apply(p, xb) - yb) ** 2))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(_STEPS.value):
    batch = rng.choice(train, _BATCH_SIZE.value)
    params, opt_state = step(params, opt_state, z[batch], y[batch])
  return model, params


def main(argv):
  del argv
  table = Table.read(_LABELS.value)
  raw = np.stack([np.asarray(table[c], np.float64) for c in constants.METADATA_COLUMNS], axis=1)
  labels = np.stack([np.asarray(table['LOGG'], np.float64),
                     np.log10(np.asarray(table['TEFF'], np.float64))], axis=1)
  mean, std = labels.mean(axis=0), labels.std(axis=0)
  y = ((labels - mean) / std).astype(np.float32)
  order = np.random.default_rng(0).permutation(len(table))
  n_test = round(_TEST_FRACTION.value * len(table))
  test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
  complete = np.all(np.isfinite(raw) & (raw < apogee_net_2.METADATA_CEILING), axis=1)[test]
  seeds = [int(s) for s in _SEEDS.value]
  print(f'metadata_transform: {_LABELS.value}, {len(train)} training / {len(test)} held-out stars '
        f'({complete.sum()} with all 7 values), {_STEPS.value} steps of {_BATCH_SIZE.value}, '
        f'seeds {seeds}; {cpu_model()}, {jax.default_backend()}')
  print(f'{"transform":>11} {"seed":>4}  held-out rms: {"LOGG all":>9} {"complete":>9}  '
        f'{"LOG_TEFF all":>12} {"complete":>9}  {"s":>4}')
  rms = {}  # transform → (seeds, 4): LOGG all, complete, LOG_TEFF all, complete
  for transform in _TRANSFORMS.value:
    model = apogee_net_2.fit_metadata(
        apogee_net_2.APOGEENet2(metadata_fill=(), metadata_mean=(), metadata_std=(),
                                metadata_transform=transform), {'metadata': raw[train]})
    z = np.asarray(apogee_net_2.prepare_metadata(
        jnp.asarray(raw, jnp.float32), model.metadata_fill, model.metadata_mean,
        model.metadata_std, transform))
    rows = []
    for seed in seeds:
      start = time.perf_counter()
      net, params = _train(z, y, train, seed)
      residual = (np.asarray(net.apply(params, z[test]), np.float64) - y[test]) * std
      rows.append([*np.sqrt(np.mean(residual ** 2, axis=0)),
                   *np.sqrt(np.mean(residual[complete] ** 2, axis=0))])
      r = rows[-1]
      print(f'{transform:>11} {seed:>4}  {"":>12} {r[0]:9.5f} {r[2]:9.5f}  {r[1]:12.6f} '
            f'{r[3]:9.6f}  {time.perf_counter() - start:4.0f}')
    rms[transform] = np.array(rows)
  first = _TRANSFORMS.value[0]
  print(f'\nmean over seeds (ratio to {first!r}, mean ± std over seeds of the ratio):')
  for transform, rows in rms.items():
    ratio = rows / rms[first]
    cells = '  '.join(f'{name} {rows[:, j].mean():.6f} ({ratio[:, j].mean():.3f} ± '
                      f'{ratio[:, j].std():.3f})'
                      for j, name in ((0, 'LOGG all'), (2, 'LOGG complete'),
                                      (1, 'LOG_TEFF all'), (3, 'LOG_TEFF complete')))
    print(f'{transform:>11}  {cells}')


if __name__ == '__main__':
  app.run(main)
