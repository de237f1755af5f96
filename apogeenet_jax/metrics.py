"""Metrics of a labelled catalogue: the paper's Table 2 (standardised MSE) and Table 3 (scatter),
per data type, with the coverage and NLL of the σ; and their printed form beside the paper's values.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from apogeenet_jax import calibration
from apogeenet_jax.constants import DATA_TYPES, LABEL_NAMES, LABEL_UNITS, SPLITS
from apogeenet_jax.normalization import LabelSpace, Standardizer

# Table 2 (standardised MSE, train/dev/test: SPLITS order) and Table 3 (test scatter) of the
# paper, to print beside ours. 'Full' is every data type together.
PAPER_TABLE2 = {'Full': (0.044, 0.049, 0.063), 'MStar': (0.08, 0.098, 0.196),
                'YSO': (0.153, 0.168, 0.217)}
PAPER_TABLE3 = {'Full': (0.216, 183.74, 0.0914), 'MStar': (0.346, 273.7, 0.18),
                'YSO': (0.4, 490.99, 0.0879)}


def compute_metrics(pred: np.ndarray, labels: np.ndarray, data_type: np.ndarray,
                    standardizer: Standardizer, *, sigma: np.ndarray | None = None,
                    raw_sigma: np.ndarray | None = None) -> dict[str, Any]:
  """Table 2 (standardised MSE over the 3 labels) and Table 3 (std of pred − label, native).

  Args:
    pred, labels: (n, 3) native units; rows with non-finite labels are ignored.
    data_type: (n,) index into DATA_TYPES.
    sigma, raw_sigma: optional (n, 3) catalogue σ (calibrated) and raw σ, native units: add
      'coverage_1sigma', 'coverage_2sigma', 'nll' and the same three prefixed 'raw_'.
  Returns: {group: {'n', 'mse_standardised', 'mse_standardised_per_label', 'scatter', 'bias',
    [coverage keys]}} for group in 'Full' (all data types) and each data type present; every
    per-label entry is a dict keyed by label name.
  """
  pred = np.asarray(pred, np.float64)
  labels = np.asarray(labels, np.float64)
  data_type = np.asarray(data_type)
  ok = np.all(np.isfinite(labels), axis=1) & np.all(np.isfinite(pred), axis=1)
  groups = {'Full': ok}
  for i, name in enumerate(DATA_TYPES):
    groups[name] = ok & (data_type == i)
  out = {}
  for name, sel in groups.items():
    n = int(sel.sum())
    if n == 0:
      continue
    # In the network's label space (log10 Teff for Nets II and III): Table 2's standardised MSE.
    space = standardizer.space
    dz = (space.from_catalogue(pred[sel]) - space.from_catalogue(labels[sel])) / standardizer.std
    diff = pred[sel] - labels[sel]
    out[name] = {
        'n': n,
        'mse_standardised': float(np.mean(dz ** 2)),
        'mse_standardised_per_label': dict(zip(LABEL_NAMES, np.mean(dz ** 2, 0).tolist(),
                                               strict=True)),
        'scatter': dict(zip(LABEL_NAMES, diff.std(0).tolist(), strict=True)),
        'bias': dict(zip(LABEL_NAMES, diff.mean(0).tolist(), strict=True)),
    }
    for prefix, sig in (('', sigma), ('raw_', raw_sigma)):
      if sig is not None:
        out[name].update(_coverage_metrics(diff, np.asarray(sig, np.float64)[sel], prefix))
  return out


def _coverage_metrics(diff: np.ndarray, sigma: np.ndarray, prefix: str) -> dict[str, Any]:
  """coverage_1sigma, coverage_2sigma, nll (each {label: value}) of residuals (n, 3)."""
  out = {f'{prefix}coverage_1sigma': {}, f'{prefix}coverage_2sigma': {}, f'{prefix}nll': {}}
  for j, n in enumerate(LABEL_NAMES):
    out[f'{prefix}coverage_1sigma'][n] = calibration.coverage(diff[:, j], sigma[:, j], 1.0)
    out[f'{prefix}coverage_2sigma'][n] = calibration.coverage(diff[:, j], sigma[:, j], 2.0)
    out[f'{prefix}nll'][n] = calibration.gaussian_nll(diff[:, j], sigma[:, j])
  return out


def format_metrics(metrics: Mapping[str, Any]) -> str:
  """A readable Table 2 / Table 3 with the paper's values beside ours."""
  lines = []
  for split, groups in metrics['splits'].items():
    lines.append(f'== {split} ==')
    lines.append(f'{"":8s} {"n":>7s} {"MSE(std)":>9s} {"paper":>7s}   '
                 + '   '.join(f'σ {n} [{u}] (paper)' for n, u in zip(LABEL_NAMES, LABEL_UNITS,
                                                                     strict=True)))
    col = SPLITS.index(split) if split in SPLITS else None
    for name, m in groups.items():
      paper = PAPER_TABLE2.get(name)
      paper_mse = f'{paper[col]:7.3f}' if paper and col is not None else f'{"":7s}'
      paper3 = PAPER_TABLE3.get(name) if split == 'test' else None
      scatter = '   '.join(
          f'{m["scatter"][n]:9.4g} ({paper3[j]:g})' if paper3 else f'{m["scatter"][n]:9.4g}'
          for j, n in enumerate(LABEL_NAMES))
      lines.append(f'{name:8s} {m["n"]:7d} {m["mse_standardised"]:9.4f} {paper_mse}   {scatter}')
    if any('coverage_1sigma' in m for m in groups.values()):
      lines.append(f'{"":8s} coverage 1σ / 2σ, calibrated (raw); ideal '
                   f'{calibration.NOMINAL_1SIGMA:.3f} / {calibration.NOMINAL_2SIGMA:.3f}')
      for name, m in groups.items():
        if 'coverage_1sigma' in m:
          lines.append(f'{name:8s} ' + '   '.join(
              f'{n} {m["coverage_1sigma"][n]:.3f}/{m["coverage_2sigma"][n]:.3f} '
              f'({m["raw_coverage_1sigma"][n]:.3f}/{m["raw_coverage_2sigma"][n]:.3f})'
              for n in LABEL_NAMES))
  return '\n'.join(lines)


def catalog_metrics(merged: Mapping[str, np.ndarray], header: Mapping[str, Any]) -> dict[str, Any]:
  """metrics.json: the run, Tables 2–3 and coverage per split, the paper's values."""
  cal = header['calibration']
  run = {**header['run'], 'calibration': (
      {k: cal[k] for k in ('a', 'b', 'n', 'floor', 'floor_choice', 'step', 'split', 'mc',
                           'settings') if k in cal}
      if cal is not None else None)}
  standardizer = Standardizer(mean=np.asarray(header['label_mean']),
                              std=np.asarray(header['label_std']),
                              space=LabelSpace(LABEL_NAMES, tuple(header.get('label_log10', ()))))
  sigma = calibration.apply(merged['pred_err'], cal, merged['pred'])
  metrics = {'run': run, 'splits': {}}
  for split in header['splits']:
    sel = merged['data_set'] == split
    metrics['splits'][split] = compute_metrics(
        merged['pred'][sel], merged['labels'][sel], merged['data_type'][sel], standardizer,
        sigma=sigma[sel], raw_sigma=merged['pred_err'][sel])
  metrics['paper'] = {'table2_train_dev_test': PAPER_TABLE2, 'table3_test': PAPER_TABLE3}
  return metrics
