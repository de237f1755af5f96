r"""Does the σ calibration hold on stars it was not fitted on? A constant floor vs one that varies.

    python benchmarks/calibration_benchmark.py --workdirs=workdirs/demo --data_dir=data/demo/tfds
    python benchmarks/calibration_benchmark.py --catalogs=RAW/catalog.fits,…   # reuse predictions

For each trained run (``--workdirs``; an ensemble is fine) it predicts the dev and test splits
with ``--mc`` draws and the RAW σ (``evaluate.py --calibration=none``), or reads such a
catalogue (``--catalogs``, with Dev and Test rows). Then, for each floor choice of
``calibration.fit`` (``constant``: one (a, b) per label; ``auto``: constant or a
function of the predicted labels, chosen per label by 5-fold CV on dev), it fits on the
dev rows and prints, on the test rows, per label: the model chosen, calibrated coverage at 1σ and
2σ (ideal 0.683 / 0.954; ✗ marks a figure outside the target windows 0.68 ± 0.06 / 0.95 ± 0.04) and the
Gaussian NLL (native units; lower is better), and per data type the 1σ coverage. The last lines
sum over runs: figures inside the window, and the mean test NLL per label, per floor choice.
Several runs (training seeds) show what one demo figure cannot: whether a method is right on
average or lucky once. Prints figures; asserts nothing.
"""

import pathlib
import sys
import tempfile

import numpy as np
from absl import app, flags
from astropy.table import Table

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from apogeenet_jax import calibration, checkpoint, evaluation, uncertainty
from apogeenet_jax.constants import DATA_TYPES, LABEL_NAMES
from apogeenet_jax.normalization import PAPER_STANDARDIZER
from benchmarks.common import cpu_model

_WORKDIRS = flags.DEFINE_list('workdirs', [], 'Training runs whose best checkpoints are used.')
_CATALOGS = flags.DEFINE_list('catalogs', [], 'Uncalibrated catalogues with Dev and Test rows.')
_DATA_DIR = flags.DEFINE_string('data_dir', 'data/demo/tfds', 'tfds data dir (with --workdirs).')
_MC = flags.DEFINE_integer('mc', uncertainty.PAPER_NUM_DRAWS, 'Monte Carlo draws per star.')
_FLOORS = flags.DEFINE_list('floors', ['constant', 'auto'], 'calibration.fit floor choices.')

WINDOW = {1: (0.68, 0.06), 2: (0.95, 0.04)}  # the target windows of coverage_1sigma, coverage_2sigma


def _raw_catalogue(workdir: str) -> tuple[Table, np.ndarray]:
  """The run's uncalibrated dev + test catalogue and its standardiser's σ (3,)."""
  params, meta = evaluation.load_checkpoint(workdir=workdir)
  with tempfile.TemporaryDirectory() as out:
    table = evaluation.evaluate(params=params, meta=meta, output_dir=out, splits=['dev', 'test'],
                                data_dir=_DATA_DIR.value, settings=uncertainty.MCSettings(
                                    mc=_MC.value), make_figures=False,
                                calibration_mode='none')['table']
  return table, np.asarray(checkpoint.standardizer_from_meta(meta).std, np.float64)


def _columns(table: Table, split: str):
  rows = table[np.char.strip(np.asarray(table['DATA_SET'], str)) == split]
  get = lambda suffix: np.stack([np.asarray(rows[n + suffix], np.float64)  # noqa: E731
                                 for n in LABEL_NAMES], axis=1)
  return get('_PRED'), get(''), get('_ERR'), np.char.strip(np.asarray(rows['DATA_TYPE'], str))


def _report(name: str, table: Table, label_std: np.ndarray, totals: dict) -> None:
  dev, test = _columns(table, 'Dev'), _columns(table, 'Test')
  print(f'== {name}: {len(dev[0])} dev stars fit, {len(test[0])} test stars judged')
  pred, labels, sigma, data_type = test
  residual = pred - labels
  for floor in _FLOORS.value:
    record = calibration.fit(*dev[:3], label_std, floor=floor)
    cal = calibration.apply(sigma, record, pred)
    cells = []
    for j, label in enumerate(LABEL_NAMES):
      cov = {k: calibration.coverage(residual[:, j], cal[:, j], k) for k in (1, 2)}
      inside = {k: abs(cov[k] - WINDOW[k][0]) <= WINDOW[k][1] + 1e-12 for k in (1, 2)}
      nll = calibration.gaussian_nll(residual[:, j], cal[:, j])
      totals.setdefault(floor, {'inside': 0, 'figures': 0, 'nll': {n: [] for n in LABEL_NAMES}})
      totals[floor]['inside'] += sum(inside.values())
      totals[floor]['figures'] += 2
      totals[floor]['nll'][label].append(nll)
      per_type = ' '.join(
          f'{t[0]}{calibration.coverage(residual[data_type == t, j], cal[data_type == t, j], 1):.2f}'
          for t in DATA_TYPES if np.any(data_type == t))
      cells.append(f'{label} {record["floor"][label]["model"]:14s} '
                   f'{cov[1]:.3f}{"" if inside[1] else "✗"}/{cov[2]:.3f}{"" if inside[2] else "✗"}'
                   f' nll {nll:7.3f} [1σ by type {per_type}]')
    print(f'  {floor:8s} ' + '\n           '.join(cells))


def main(argv):
  del argv
  print(f'CPU: {cpu_model()}')
  totals = {}
  label_std = None
  for workdir in _WORKDIRS.value:
    table, label_std = _raw_catalogue(workdir)
    _report(workdir, table, label_std, totals)
  for path in _CATALOGS.value:
    table = Table.read(path)
    if label_std is None:  # A catalogue does not carry the standardiser: the paper's (§7).
      label_std = np.asarray(PAPER_STANDARDIZER.std, np.float64)
    _report(path, table, label_std, totals)
  runs = len(_WORKDIRS.value) + len(_CATALOGS.value)
  print(f'== over {runs} run(s): test coverage figures inside the window; mean test NLL')
  for floor, t in totals.items():
    nll = '  '.join(f'{n} {np.mean(v):.3f}' for n, v in t['nll'].items())
    print(f'  {floor:8s} {t["inside"]}/{t["figures"]} inside;  NLL {nll}')


if __name__ == '__main__':
  app.run(main)
