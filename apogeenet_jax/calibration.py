"""Calibrated uncertainties: σ_cal² = (a·σ_total)² + b² per label, fitted on the dev split.

Why: the Monte Carlo σ is photon noise pushed through the network. It leaves out the model's own
error, so on the demo it is 10–40 K against 322 K of Teff scatter. An ensemble's member spread
(σ_model) covers part of the rest; ``a`` rescales the total and ``b`` adds the floor that neither
explains (with one network, b carries all of the model error).

Fit: a and b of each label maximise the Gaussian likelihood of the dev residuals
r = pred − label, i.e. minimise Σ log σ_cal² + r²/σ_cal², in standardised units (so one
optimiser setting serves K and dex). One (a, b) per label for all data types: new apStar stars
have no data type, so a per-type calibration could not be applied to the catalogue it is meant
for; ``metrics.json`` reports the coverage per data type so a type that the pooled fit misses
shows up there.

Storage: ``calibration.json`` in the checkpoint directory (beside orbax's step folders, which
orbax ignores), written atomically, tied to the checkpoint step it was fitted for.
``checkpoint.load_params`` puts it into ``meta['calibration']`` when the step matches; a newer
best step (training went on) makes it stale and it is ignored with a warning.

Coverage: the fraction of stars with |r| ≤ k·σ (ideal 0.683 for k = 1, 0.954 for k = 2);
NLL: the mean of ½ log(2π σ²) + r²/(2σ²) per label in the label's native unit (K or dex).
"""

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from apogeenet_jax.constants import LABEL_NAMES
from apogeenet_jax.file_io import atomic_path

CALIBRATION_FILE = 'calibration.json'
# Fewer dev stars with finite σ than this and a, b are not fitted: two parameters from a handful
# of residuals would be noise.
MIN_CALIBRATION_STARS = 20
NOMINAL_1SIGMA = math.erf(1 / math.sqrt(2))  # 0.6827
NOMINAL_2SIGMA = math.erf(2 / math.sqrt(2))  # 0.9545


class CalibrationError(ValueError):
  """Calibration cannot be fitted, read or applied."""


def fit_label(residual_z: np.ndarray, sigma_z: np.ndarray) -> tuple[float, float]:
  """Maximum-likelihood (a, b) ≥ 0 for one label, standardised residuals and σ.

  Args:
    residual_z: (n,) (pred − label) / label std.
    sigma_z: (n,) raw total σ / label std (finite, ≥ 0).
  Returns:
    (a, b), b in the same standardised unit.
  """
  r2 = np.asarray(residual_z, np.float64) ** 2
  s2 = np.asarray(sigma_z, np.float64) ** 2
  if len(r2) < MIN_CALIBRATION_STARS:
    raise CalibrationError(f'{len(r2)} stars with finite σ and label: need at least '
                           f'{MIN_CALIBRATION_STARS} to fit a and b')

  def nll(log_a2, log_b2):
    var = np.exp(log_a2) * s2 + np.exp(log_b2)
    return float(np.mean(np.log(var) + r2 / var))

  # The NLL in (log a², log b²) is smooth with one basin; a coarse grid finds it, then a few
  # rounds of shrinking coordinate search polish it (no optimiser library needed for 2 numbers).
  mean_r2 = max(float(np.mean(r2)), 1e-30)
  mean_s2 = float(np.mean(s2))
  a_centre = math.log(mean_r2 / mean_s2) if mean_s2 > 0 else 0.0
  b_centre = math.log(mean_r2)
  grid = [(u, v) for u in np.linspace(a_centre - 12, a_centre + 6, 37)
          for v in np.linspace(b_centre - 14, b_centre + 2, 33)]
  best = min(grid, key=lambda p: nll(*p))
  u, v, step = best[0], best[1], 0.5
  f = nll(u, v)
  while step > 1e-6:
    moved = False
    for du, dv in ((step, 0), (-step, 0), (0, step), (0, -step)):
      g = nll(u + du, v + dv)
      if g < f:
        u, v, f, moved = u + du, v + dv, g, True
        break
    if not moved:
      step /= 2
  return math.exp(u / 2), math.exp(v / 2)


def fit(pred: np.ndarray, labels: np.ndarray, sigma: np.ndarray, label_std: np.ndarray,
        **info: Any) -> dict[str, Any]:
  """(a, b) per label from one split's predictions (native units); returns the JSON record.

  Args:
    pred, labels, sigma: (n, 3) in LABEL_NAMES order; rows with a non-finite value are left out
      label by label.
    label_std: (3,) the standardiser's σ, to fit in standardised units.
    **info: stored beside a and b (checkpoint step, mc, error_cap, split, …).
  Returns:
    {'a': {label: a}, 'b': {label: b native}, 'n': {label: n}, **info}.
  """
  pred, labels, sigma = (np.asarray(x, np.float64) for x in (pred, labels, sigma))
  out = {'a': {}, 'b': {}, 'n': {}, **info}
  for j, name in enumerate(LABEL_NAMES):
    ok = np.isfinite(pred[:, j]) & np.isfinite(labels[:, j]) & np.isfinite(sigma[:, j])
    try:
      a, b_z = fit_label((pred[ok, j] - labels[ok, j]) / label_std[j], sigma[ok, j] / label_std[j])
    except CalibrationError as e:
      raise CalibrationError(f'{name}: {e}') from None
    out['a'][name], out['b'][name], out['n'][name] = a, b_z * float(label_std[j]), int(ok.sum())
  return out


def apply(sigma: np.ndarray, calibration: Mapping[str, Any] | None) -> np.ndarray:
  """σ_cal = sqrt((a σ)² + b²) per label column of (n, 3) ``sigma``; unchanged when None."""
  sigma = np.asarray(sigma, np.float64)
  if calibration is None:
    return sigma
  a = np.array([calibration['a'][n] for n in LABEL_NAMES])
  b = np.array([calibration['b'][n] for n in LABEL_NAMES])
  return np.sqrt((a * sigma) ** 2 + b ** 2)


def coverage(residual: np.ndarray, sigma: np.ndarray, k: float) -> float:
  """Fraction of finite rows with |residual| ≤ k σ (NaN when none)."""
  residual, sigma = np.asarray(residual, np.float64), np.asarray(sigma, np.float64)
  ok = np.isfinite(residual) & np.isfinite(sigma)
  return float(np.mean(np.abs(residual[ok]) <= k * sigma[ok])) if ok.any() else float('nan')


def gaussian_nll(residual: np.ndarray, sigma: np.ndarray) -> float:
  """Mean ½ log(2πσ²) + r²/(2σ²) over finite rows with σ > 0 (NaN when none)."""
  residual, sigma = np.asarray(residual, np.float64), np.asarray(sigma, np.float64)
  ok = np.isfinite(residual) & np.isfinite(sigma) & (sigma > 0)
  if not ok.any():
    return float('nan')
  var = sigma[ok] ** 2
  return float(np.mean(0.5 * np.log(2 * np.pi * var) + residual[ok] ** 2 / (2 * var)))


def coverage_curve(residual: np.ndarray, sigma: np.ndarray, nominal: Sequence[float]
                   ) -> np.ndarray:
  """Observed coverage at each nominal two-sided Gaussian coverage p (k = Φ⁻¹((1 + p)/2))."""
  normal = statistics.NormalDist()
  return np.array([coverage(residual, sigma, normal.inv_cdf((1 + p) / 2)) for p in nominal])


# ------------------------------------------------------------------------------------------------
# The sidecar file.


def path_in(checkpoint_dir: str | os.PathLike) -> epath.Path:
  """Where the calibration of a checkpoint directory lives (local or gs://, via etils.epath)."""
  return epath.Path(checkpoint_dir) / CALIBRATION_FILE


def save(checkpoint_dir: str | os.PathLike, record: Mapping[str, Any]) -> str:
  """Writes ``record`` (from ``fit``, with a 'step') atomically into the checkpoint directory."""
  if 'step' not in record:
    raise CalibrationError('a calibration record needs the checkpoint step it was fitted for')
  path = path_in(checkpoint_dir)
  try:
    with atomic_path(path) as tmp:
      epath.Path(tmp).write_text(json.dumps(dict(record), indent=2))
  except OSError as e:
    raise CalibrationError(f'{path}: cannot write the calibration: {e}') from e
  return str(path)


def load(checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The stored record, or None when the directory has none."""
  path = path_in(checkpoint_dir)
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
    for key in ('a', 'b', 'step'):
      if key not in record:
        raise CalibrationError(f'{path}: no {key!r} entry')
    for key in ('a', 'b'):
      missing = [n for n in LABEL_NAMES if n not in record[key]]
      if missing:
        raise CalibrationError(f'{path}: {key!r} lacks {missing}')
  except (OSError, json.JSONDecodeError) as e:
    raise CalibrationError(f'{path}: cannot read the calibration: {e}') from e
  return record
