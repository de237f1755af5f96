"""Figures of the paper from a catalogue Table (``catalog.build_catalog``): PNG, matplotlib Agg.

- ``plot_labels_vs_predictions``: Fig. 4 left, label vs prediction per parameter by data type.
- ``plot_sigma_vs_snr``: Fig. 4 right, MC σ against S/N per parameter.
- ``plot_kiel``: Fig. 3, Teff–log g diagram by data type with the YSO triangle (§4).
- ``plot_calibration``: observed against nominal coverage of the σ per parameter (not in the
  paper): calibrated ``*_ERR`` and the raw sqrt(``*_ERR_NOISE``² + ``*_ERR_MODEL``²).
"""

import os

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
from astropy.table import Table
from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, ScalarFormatter

from apogeenet_jax import calibration
from apogeenet_jax.catalog import YSO_TRIANGLE
from apogeenet_jax.constants import DATA_TYPES, LABEL_NAMES, LABEL_UNITS
from apogeenet_jax.file_io import atomic_path

_AXIS_NAME = {'LOGG': r'$\log g$', 'TEFF': r'$T_\mathrm{eff}$', 'FE_H': '[Fe/H]'}
_COLOURS = {'Payne': 'tab:blue', 'MStar': 'tab:orange', 'YSO': 'tab:green', '': 'tab:gray'}
_DPI = 120


def _values(table: Table, name: str) -> np.ndarray:
  col = table[name]
  return np.ma.filled(np.ma.asarray(col, dtype=np.float64), np.nan)


def _groups(table: Table):
  """(name, row mask) per data type present; unlabelled stars form one group 'unlabelled'."""
  dtype = np.asarray(table['DATA_TYPE']).astype(str) if len(table) else np.array([], str)
  for name in (*DATA_TYPES, ''):
    sel = dtype == name
    if sel.any():
      yield (name or 'unlabelled'), _COLOURS[name], sel


def _scatter_by_type(ax, table: Table, x: np.ndarray, y: np.ndarray, *, counts: bool) -> None:
  """One scatter per data type of the rows where x and y are finite (and x > 0 on log axes)."""
  for group, colour, sel in _groups(table):
    ok = sel & np.isfinite(x) & np.isfinite(y)
    if ax.get_xscale() == 'log':
      ok &= x > 0
    if ok.any():
      ax.scatter(x[ok], y[ok], s=6, alpha=0.6, color=colour, rasterized=True,
                 label=f'{group} ({ok.sum()})' if counts else group)


def _save(fig, path: str) -> str:
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=_DPI, bbox_inches='tight', format='png')
  plt.close(fig)
  return path


def plot_labels_vs_predictions(table: Table, path: str) -> str:
  """Fig. 4 (left): reference label against prediction, 1:1 line, one panel per parameter."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout='constrained')
  for ax, name, unit in zip(axes, LABEL_NAMES, LABEL_UNITS, strict=True):
    label, pred = _values(table, name), _values(table, name + '_PRED')
    _scatter_by_type(ax, table, label, pred, counts=True)
    both = np.concatenate([label, pred])
    both = both[np.isfinite(both)]
    if both.size:
      lo, hi = both.min(), both.max()
      pad = 0.03 * (hi - lo or 1.0)
      ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], 'k--', lw=1, label='1:1')
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(f'{_AXIS_NAME[name]} label [{unit}]')
    ax.set_ylabel(f'{_AXIS_NAME[name]} APOGEE Net [{unit}]')
    ax.legend(fontsize=8, loc='upper left')
    ax.grid(alpha=0.3)
  fig.suptitle('Labels vs predictions (Olney et al. 2020, Fig. 4 left)')
  return _save(fig, path)


def plot_sigma_vs_snr(table: Table, path: str) -> str:
  """Fig. 4 (right): Monte Carlo σ against S/N, log S/N axis, one panel per parameter."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout='constrained')
  snr = _values(table, 'SNR')
  for ax, name, unit in zip(axes, LABEL_NAMES, LABEL_UNITS, strict=True):
    sigma = _values(table, name + '_ERR')
    ax.set_xscale('log')
    _scatter_by_type(ax, table, snr, sigma, counts=False)
    # Labelled 1-2-5 ticks: S/N usually spans less than two decades.
    ax.xaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel('S/N')
    ax.set_ylabel(f'σ {_AXIS_NAME[name]} [{unit}]')
    ax.grid(alpha=0.3, which='both')
    if ax.has_data():
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, 'no Monte Carlo σ (--mc=0)', ha='center', transform=ax.transAxes)
  fig.suptitle('Monte Carlo uncertainty vs S/N (Olney et al. 2020, Fig. 4 right)')
  return _save(fig, path)


def plot_kiel(table: Table, path: str) -> str:
  """Fig. 3: predicted Teff–log g diagram, both axes reversed, YSO triangle overlaid."""
  fig, ax = plt.subplots(figsize=(7, 6), layout='constrained')
  teff, logg = _values(table, 'TEFF_PRED'), _values(table, 'LOGG_PRED')
  _scatter_by_type(ax, table, teff, logg, counts=True)
  tri = np.array([*YSO_TRIANGLE, YSO_TRIANGLE[0]])
  ax.plot(tri[:, 0], tri[:, 1], 'r-', lw=1.2, label='YSO candidate region')
  ax.invert_xaxis()
  ax.invert_yaxis()
  ax.set_xlabel(r'$T_\mathrm{eff}$ [K]')
  ax.set_ylabel(r'$\log g$ [dex]')
  ax.legend(fontsize=8, loc='lower left')
  ax.grid(alpha=0.3)
  ax.set_title('Kiel diagram of the predictions (Olney et al. 2020, Fig. 3)')
  return _save(fig, path)


def plot_calibration(table: Table, path: str) -> str:
  """Observed fraction of |pred − label| ≤ k σ against the nominal Gaussian coverage of k."""
  nominal = np.linspace(0.02, 0.99, 50)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout='constrained')
  for ax, name in zip(axes, LABEL_NAMES, strict=True):
    residual = _values(table, name + '_PRED') - _values(table, name)
    raw = np.sqrt(_values(table, name + '_ERR_NOISE') ** 2
                  + np.nan_to_num(_values(table, name + '_ERR_MODEL')) ** 2)
    ax.plot([0, 1], [0, 1], 'k--', lw=1, label='ideal')
    for sigma, style, what in ((_values(table, name + '_ERR'), 'C0-', 'catalogue σ (_ERR)'),
                               (raw, 'C3:', 'raw σ (noise ⊕ model)')):
      ok = np.isfinite(residual) & np.isfinite(sigma)
      if ok.any():
        ax.plot(nominal, calibration.coverage_curve(residual[ok], sigma[ok], nominal), style,
                lw=1.8, label=f'{what}, {ok.sum()} stars')
    for p in (calibration.NOMINAL_1SIGMA, calibration.NOMINAL_2SIGMA):
      ax.axvline(p, color='gray', lw=0.6, alpha=0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel('nominal coverage')
    ax.set_ylabel(f'observed coverage, {_AXIS_NAME[name]}')
    ax.grid(alpha=0.3)
    if len(ax.lines) > 3:
      ax.legend(fontsize=8, loc='upper left')
    else:
      ax.text(0.5, 0.3, 'no σ and label to compare', ha='center', transform=ax.transAxes)
  fig.suptitle('Coverage of the uncertainties: |prediction − label| ≤ k σ '
               '(grey lines: 1σ and 2σ)')
  return _save(fig, path)


# Every file name make_figures may write: an earlier run's figures that this run did not redraw
# are removed by these names only, never any other file in the folder (evaluation).
FIGURE_NAMES = ('labels_vs_predictions.png', 'kiel.png', 'sigma_vs_snr.png', 'calibration.png')


def make_figures(table: Table, directory: str, *, with_labels: bool) -> list[str]:
  """All figures into ``directory``; label-vs-prediction only ``with_labels``. Returns paths."""
  paths = [plot_kiel(table, os.path.join(directory, 'kiel.png')),
           plot_sigma_vs_snr(table, os.path.join(directory, 'sigma_vs_snr.png'))]
  if with_labels:
    paths.insert(0, plot_labels_vs_predictions(
        table, os.path.join(directory, 'labels_vs_predictions.png')))
    paths.append(plot_calibration(table, os.path.join(directory, 'calibration.png')))
  return paths
