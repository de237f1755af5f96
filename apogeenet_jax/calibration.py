"""Calibrated uncertainties: σ_cal² = (a·σ_total)² + b² per label, fitted on the dev split.

Why: the Monte Carlo σ is photon noise pushed through the network. It leaves out the model's own
error, so on the demo it is 10–40 K against 322 K of Teff scatter. An ensemble's member spread
(σ_model) covers part of the rest; ``a`` rescales the total and the floor ``b`` adds what neither
explains (with one network, b carries all of the model error).

The floor may depend on what kind of star it is. The model error is not the same for every kind
(paper Table 3: log g scatter 0.22 dex over the full test set, 0.35 for M dwarfs, 0.40 for YSOs),
and one constant b cannot follow that: the residuals of the mixture are more peaked than a
Gaussian, so the ML σ over-covers at 1σ (on the demo, log g: 0.77 of the test stars within 1σ
against 0.683). Candidates for log b² (``FLOOR_MODELS``, simplest first) are functions of the
star's own PREDICTED labels, so that the same calibration applies to new apStar stars, which
have no data type — its place in the Kiel diagram (g, t = log g, Teff) or in all three (g, t, m
with m = [Fe/H], whose lines weaken in metal-poor stars):
  'constant'          b² = e^β₀                                  2 numbers with a (one b)
  'kiel_linear'       log b² = β₀ + β₁ g + β₂ t                  4
  'labels_linear'     log b² = β₀ + β₁ g + β₂ t + β₃ m           5
  'kiel_quadratic'    kiel_linear + g², t², g t                  7
  'labels_quadratic'  labels_linear + the 6 squares and products 11
  'kiel_hinge'        a linear spline in g and t (calibration_floors) 20
with g, t, m the predictions standardised by the dev stars' mean and std and clipped to the dev
range, so a star outside it gets the floor of the nearest edge, never an extrapolated one.

Fit: for each label and candidate, a and β maximise the Gaussian likelihood of the dev residuals
r = pred − label, i.e. minimise Σ log σ_cal² + r²/σ_cal², in standardised units (so one
optimiser setting serves K and dex). The constant model starts from a coarse grid over
(log a², log b²) and is polished by shrinking coordinate search; the others start from the
constant optimum (β₁… = 0), so their dev likelihood is never worse, and from the floor carrying
the residuals (where the constant's b → 0 the floor has no gradient), and are polished by
L-BFGS-B with the analytic gradient. Which candidate a label gets is chosen on the dev split alone by
5-fold cross-validation of the held-out NLL with the one-standard-error rule (Hastie, Tibshirani
& Friedman, ESL §7.10): the simplest model whose CV NLL is within one standard error (of the
paired per-star difference) of the best one's. A candidate with fewer than
``MIN_STARS_PER_PARAMETER`` dev stars per fitted number is not tried. The candidate set was
chosen by nested cross-validation on the dev splits of six demo-size runs
(``benchmarks/calibration_benchmark.py``, docs/uncertainties.md). ``floor='constant'``
(``evaluate.py --calibration_floor=constant``) forces one (a, b) per label. A floor per data type
was the alternative; it could not be applied to new stars. ``metrics.json``
reports the coverage per data type, so a type that the fit misses shows up there.

Storage: ``calibration.json`` in the checkpoint directory (beside orbax's step folders, which
orbax ignores), written atomically, tied to the checkpoint step it was fitted for and to the
digest of that step's parameters (``checkpoint.params_digest``).
``checkpoint.load_params`` puts it into ``meta['calibration']`` when both match; a newer best
step (training went on), or a retrained model whose best step has the same number, makes it
stale and it is ignored with a warning. A record without finite coefficients is refused. Per label the
record holds ``a``, ``b`` (the median floor over the dev stars, the floor itself when constant:
a summary), ``floor`` {'model', 'coef' (native units: b² = exp(Φ·coef) in K² or dex²),
'cv_nll' per candidate tried, 'range': b's [min, max] on dev, b clipped to it: no quadratic
floor at a corner of the label box, 2e-6 to 1e5 dex} and ``features`` (centre, scale, lo, hi of
the predicted labels). Records written before these floors (``a``, ``b`` only) are constant.

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
import scipy.optimize
from etils import epath

from apogeenet_jax.calibration_floors import (
  FLOOR_CHOICES,
  FLOOR_MODELS,
  CalibrationError,
  floor_design,
  num_coefficients,
)
from apogeenet_jax.constants import LABEL_NAMES
from apogeenet_jax.file_io import atomic_path
from apogeenet_jax.normalization import LabelSpace

CALIBRATION_FILE = 'calibration.json'
# Fewer dev stars with finite σ than this and a, b are not fitted: two parameters from a handful
# of residuals would be noise.
MIN_CALIBRATION_STARS = 20
# A floor model is tried only with at least this many dev stars per fitted number (a included):
# 80 for 'kiel_linear', 100 'labels_linear', 140 'kiel_quadratic', 220 'labels_quadratic', 380
# 'kiel_hinge'.
MIN_STARS_PER_PARAMETER = 20
NOMINAL_1SIGMA = math.erf(1 / math.sqrt(2))  # 0.6827
NOMINAL_2SIGMA = math.erf(2 / math.sqrt(2))  # 0.9545
CV_FOLDS = 5
_CV_SEED = 0  # the folds are a fixed permutation: the same dev split gives the same choice
_LOG_CLIP = (-80.0, 80.0)  # exponents of the variance terms stay finite in float64


# Fewest MC draws a fit is made on: σ_noise of fewer draws is mostly the draws' own scatter
# (with error_cap='median' draw 0 is noiseless, so --mc=1 gives σ ≡ 0). Ours, not the paper's.
MIN_CALIBRATION_DRAWS = 4


def _variance(theta: np.ndarray, s2: np.ndarray, design: np.ndarray):
  """σ_cal² and its two terms for θ = (log a², β)."""
  scale_term = np.exp(np.clip(theta[0], *_LOG_CLIP)) * s2
  floor_term = np.exp(np.clip(design @ theta[1:], *_LOG_CLIP))
  return scale_term + floor_term, scale_term, floor_term


def _nll_and_grad(theta, r2, s2, design):
  """Mean of log σ_cal² + r²/σ_cal² (twice the NLL up to a constant) and its gradient in θ."""
  var, scale_term, floor_term = _variance(theta, s2, design)
  weight = (1.0 / var - r2 / var ** 2) / len(r2)
  grad = np.concatenate([[np.sum(weight * scale_term)], design.T @ (weight * floor_term)])
  return float(np.mean(np.log(var) + r2 / var)), grad


def _fit_constant(r2: np.ndarray, s2: np.ndarray) -> np.ndarray:
  """θ = (log a², log b²) of the constant floor: grid, then shrinking coordinate search."""
  def nll(u, v):
    var = np.exp(u) * s2 + np.exp(v)
    return float(np.mean(np.log(var) + r2 / var))

  # The NLL in (log a², log b²) is smooth with one basin; a coarse grid finds it, then a few
  # rounds of shrinking coordinate search polish it (robust where a or b goes to 0).
  mean_r2 = max(float(np.mean(r2)), 1e-30)
  mean_s2 = float(np.mean(s2))
  a_centre = math.log(mean_r2 / mean_s2) if mean_s2 > 0 else 0.0
  b_centre = math.log(mean_r2)
  grid_v = np.linspace(b_centre - 14, b_centre + 2, 33)[:, None]
  best = (math.inf, 0.0, 0.0)
  for u in np.linspace(a_centre - 12, a_centre + 6, 37):  # one row of the grid at a time: (33, n)
    var = math.exp(u) * s2 + np.exp(grid_v)
    row = np.mean(np.log(var) + r2 / var, axis=1)
    k = int(np.argmin(row))
    best = min(best, (float(row[k]), float(u), float(grid_v[k, 0])))
  _, u, v = best
  step, f = 0.5, nll(u, v)
  while step > 1e-6:
    moved = False
    for du, dv in ((step, 0), (-step, 0), (0, step), (0, -step)):
      g = nll(u + du, v + dv)
      if g < f:
        u, v, f, moved = u + du, v + dv, g, True
        break
    if not moved:
      step /= 2
  return np.array([u, v])


def _fit_theta(r2: np.ndarray, s2: np.ndarray, features_z: np.ndarray, model: str,
               constant: np.ndarray | None = None) -> np.ndarray:
  """ML θ = (log a², β) of one floor model (standardised units); ``constant``: the constant
  model's θ on the same stars, when already known."""
  constant = _fit_constant(r2, s2) if constant is None else constant
  if model == 'constant':
    return constant
  design = floor_design(features_z, model)
  zeros = np.zeros(design.shape[1] - 1)
  # Two starts: the constant optimum, and the floor carrying the residuals (b² = their median
  # square). Where the constant's optimum has b → 0 (a population with large residuals and large
  # raw σ: APOGEE Net II's hot stars), the floor term's gradient there is ~exp(log b²) = 0, and a
  # polish from it alone never leaves it.
  starts = [np.concatenate([constant, zeros]),
            np.concatenate([[constant[0], math.log(max(float(np.median(r2)), 1e-30))], zeros])]
  best, best_nll = starts[0], _nll_and_grad(starts[0], r2, s2, design)[0]
  for start in starts:
    result = scipy.optimize.minimize(_nll_and_grad, start, args=(r2, s2, design), jac=True,
                                     method='L-BFGS-B')
    if result.fun < best_nll:  # Keep the constant optimum unless a polish found better.
      best, best_nll = result.x, float(result.fun)
  return best


def _held_out_nll(theta, r2, s2, design):
  """Per-star Gaussian NLL, ½ log 2πσ² + r²/2σ², of held-out stars."""
  var = _variance(theta, s2, design)[0]
  return 0.5 * np.log(2 * np.pi * var) + r2 / (2 * var)


def _standardise(pred: np.ndarray, centre, scale, lo, hi) -> np.ndarray:
  """(n, 3) native predictions → standardised, clipped to the fitted range (no extrapolation)."""
  pred = np.clip(np.asarray(pred, np.float64), lo, hi)
  return (pred - np.asarray(centre)) / np.asarray(scale)


def _geometry(pred: np.ndarray) -> dict[str, list[float]]:
  """Centre, scale and clip range of the features from the stars they are fitted on."""
  scale = pred.std(0)
  return {'centre': pred.mean(0).tolist(), 'scale': np.where(scale > 0, scale, 1.0).tolist(),
          'lo': pred.min(0).tolist(), 'hi': pred.max(0).tolist()}


def _candidates(n: int, floor: str) -> tuple[str, ...]:
  if floor != 'auto':
    return (floor,)
  return tuple(m for m in FLOOR_MODELS
               if m == 'constant' or n >= MIN_STARS_PER_PARAMETER * (1 + num_coefficients(m)))


def select_floor(residual_z: np.ndarray, sigma_z: np.ndarray, pred: np.ndarray,
                 models: Sequence[str] = tuple(FLOOR_MODELS)) -> tuple[str, dict[str, float]]:
  """The floor model of one label by K-fold CV on its stars, one-standard-error rule.

  Args:
    residual_z, sigma_z: (n,) standardised residuals and raw σ.
    pred: (n, 3) native predicted labels; each fold standardises and clips them by its own
      training stars, as ``apply`` does for new stars.
    models: the candidates, simplest first.
  Returns:
    (the chosen model, {model: mean held-out NLL per star}).
  """
  r2, s2 = np.asarray(residual_z, np.float64) ** 2, np.asarray(sigma_z, np.float64) ** 2
  pred = np.asarray(pred, np.float64)
  if len(models) == 1:
    return models[0], {}
  order = np.random.default_rng(_CV_SEED).permutation(len(r2))
  held_out = {m: np.empty(len(r2)) for m in models}
  for k in range(CV_FOLDS):
    test = order[k::CV_FOLDS]
    train = np.setdiff1d(order, test)
    geometry = _geometry(pred[train])
    z_train, z_test = (_standardise(pred[i], **geometry) for i in (train, test))
    constant = _fit_constant(r2[train], s2[train])
    for m in models:
      theta = _fit_theta(r2[train], s2[train], z_train, m, constant)
      held_out[m][test] = _held_out_nll(theta, r2[test], s2[test], floor_design(z_test, m))
  mean = {m: float(v.mean()) for m, v in held_out.items()}
  best = min(models, key=mean.get)
  for m in models:  # Simplest first: the first within one SE of the best is taken.
    diff = held_out[m] - held_out[best]
    if diff.mean() <= diff.std() / math.sqrt(len(diff)):
      return m, mean
  return best, mean  # Not reached: the best is within 0 of itself.


def fit_label(residual_z: np.ndarray, sigma_z: np.ndarray, pred: np.ndarray | None = None,
              floor: str = 'constant') -> dict[str, Any]:
  """Maximum-likelihood a ≥ 0 and floor of one label, in standardised units.

  Args:
    residual_z: (n,) (pred − label) / label std.
    sigma_z: (n,) raw total σ / label std (finite, ≥ 0).
    pred: (n, 3) native predicted labels of the same stars; needed unless ``floor='constant'``.
    floor: one of FLOOR_CHOICES ('auto': chosen by ``select_floor``).
  Returns:
    {'a', 'model', 'coef' (β of log b_z²), 'cv_nll' ({} unless chosen), 'features' (geometry or
    None), 'b_z' (the median floor over these stars, standardised)}.
  """
  r2 = np.asarray(residual_z, np.float64) ** 2
  s2 = np.asarray(sigma_z, np.float64) ** 2
  if len(r2) < MIN_CALIBRATION_STARS:
    raise CalibrationError(f'{len(r2)} stars with finite σ and label: need at least '
                           f'{MIN_CALIBRATION_STARS} to fit a and b')
  if floor not in FLOOR_CHOICES:
    raise CalibrationError(f'unknown floor {floor!r}; one of {FLOOR_CHOICES}')
  if floor != 'constant' and pred is None:
    raise CalibrationError(f'floor={floor!r} needs the predicted labels of the stars')
  model, cv_nll = select_floor(residual_z, sigma_z, pred, _candidates(len(r2), floor))
  geometry = None if model == 'constant' else _geometry(np.asarray(pred, np.float64))
  z = (np.zeros((len(r2), len(LABEL_NAMES))) if geometry is None
       else _standardise(pred, **geometry))
  theta = _fit_theta(r2, s2, z, model)
  floor_z = np.sqrt(_variance(theta, s2, floor_design(z, model))[2])
  return {'a': math.exp(theta[0] / 2), 'model': model, 'coef': theta[1:].tolist(),
          'cv_nll': cv_nll, 'features': geometry, 'b_z': float(np.median(floor_z))}


def fit(pred: np.ndarray, labels: np.ndarray, sigma: np.ndarray, label_std: np.ndarray,
        floor: str = 'auto', space: LabelSpace = LabelSpace(), **info: Any) -> dict[str, Any]:
  """a and the floor per label from one split's predictions; the JSON record.

  ``pred``, ``labels`` and ``sigma`` come in catalogue units; the fit is made in the network's
  label ``space`` (log10 Teff for Nets II and III, where the noise is Gaussian), in which the
  record's floors then are; the record names that space ('log10_labels') and ``apply`` maps
  through it.

  Args:
    pred, labels, sigma: (n, 3) in LABEL_NAMES order; rows with a non-finite value are left out
      label by label (and, unless ``floor='constant'``, rows with any non-finite prediction:
      the floor is a function of all three).
    label_std: (3,) the standardiser's σ, to fit in standardised units.
    floor: one of FLOOR_CHOICES: 'auto' chooses per label by cross-validation.
    **info: stored beside a and b (checkpoint step, split, 'settings': the σ settings as one
      dict, ``uncertainty.MCSettings.record()``, …).
  Returns:
    {'a': {label: a}, 'b': {label: median floor, native}, 'n': {label: n},
     'floor': {label: {'model', 'coef' (native units), 'cv_nll'}},
     'features': {label: geometry}, 'floor_choice': floor, **info}.
  """
  pred, labels, sigma = (np.asarray(x, np.float64) for x in (pred, labels, sigma))
  if space.log10:
    sigma = space.sigma_from_catalogue(space.from_catalogue(pred), sigma)
    pred, labels = space.from_catalogue(pred), space.from_catalogue(labels)
  out = {'a': {}, 'b': {}, 'n': {}, 'floor': {}, 'features': {}, 'floor_choice': floor, **info}
  if space.log10:
    out['log10_labels'] = list(space.log10)
  for j, name in enumerate(LABEL_NAMES):
    ok = np.isfinite(pred[:, j]) & np.isfinite(labels[:, j]) & np.isfinite(sigma[:, j])
    if floor != 'constant':
      ok &= np.all(np.isfinite(pred), axis=1)
    try:
      f = fit_label((pred[ok, j] - labels[ok, j]) / label_std[j], sigma[ok, j] / label_std[j],
                    pred[ok], floor)
    except CalibrationError as e:
      raise CalibrationError(f'{name}: {e}') from None
    coef = list(f['coef'])
    coef[0] += 2 * math.log(float(label_std[j]))  # b² in the label's unit², not standardised
    out['a'][name], out['b'][name] = f['a'], f['b_z'] * float(label_std[j])
    out['n'][name] = int(ok.sum())
    out['floor'][name] = {'model': f['model'], 'coef': coef, 'cv_nll': f['cv_nll']}
    if f['features'] is not None:
      out['features'][name] = f['features']
  fitted = pred[np.all(np.isfinite(pred), axis=1)]
  b = floor_sigma(out, fitted, len(fitted))
  for j, name in enumerate(LABEL_NAMES):  # b's range on the fitted stars: floor_sigma clips to it
    out['floor'][name]['range'] = [float(b[:, j].min()), float(b[:, j].max())]
  return out


def fitted_settings(record: Mapping[str, Any]) -> dict[str, Any]:
  """The σ settings a record was fitted with, as ``uncertainty.MCSettings.record()`` gives them.

  Records written before the settings were stored as one dict hold them as loose keys
  ('estimator', 'mc', 'error_cap', 'seed', 'linear_draws'); they read the same here.
  """
  if 'settings' in record:
    return dict(record['settings'])
  sigma = record.get('estimator', 'mc')
  out = {'sigma': sigma, 'mc': record.get('mc') if sigma == 'mc' else 0,
         'error_cap': record.get('error_cap'), 'seed': record.get('seed')}
  if sigma == 'linear':
    out['linear_draws'] = record.get('linear_draws', 0)
  return out


def floor_sigma(calibration: Mapping[str, Any], pred: np.ndarray | None, n: int) -> np.ndarray:
  """(n, 3) floor b per label column, native units, for predictions ``pred`` (n, 3)."""
  out = np.empty((n, len(LABEL_NAMES)))
  for j, name in enumerate(LABEL_NAMES):
    floor = calibration.get('floor', {}).get(name)
    if floor is None:  # A record from before these floors: b is the constant floor.
      out[:, j] = calibration['b'][name]
      continue
    if floor['model'] == 'constant':
      z = np.zeros((n, len(LABEL_NAMES)))
    elif pred is None:
      raise CalibrationError(f'{name}: the {floor["model"]!r} floor needs the predictions')
    else:
      z = _standardise(pred, **calibration['features'][name])
    design = floor_design(z, floor['model'])
    out[:, j] = np.sqrt(np.exp(np.clip(design @ np.asarray(floor['coef']), *_LOG_CLIP)))
    out[:, j] = np.clip(out[:, j], *floor.get('range', (0.0, np.inf)))  # the range fit() records
  return out


def apply(sigma: np.ndarray, calibration: Mapping[str, Any] | None,
          pred: np.ndarray | None = None) -> np.ndarray:
  """σ_cal = sqrt((a σ)² + b²) per label column of (n, 3) ``sigma``; unchanged when None.

  ``pred`` (n, 3): the predictions of the same stars, which a floor other than 'constant' is a
  function of.
  """
  sigma = np.asarray(sigma, np.float64)
  if calibration is None:
    return sigma
  a = np.array([calibration['a'][n] for n in LABEL_NAMES])
  space = LabelSpace(LABEL_NAMES, tuple(calibration.get('log10_labels', ())))
  if not space.log10:
    return np.sqrt((a * sigma) ** 2 + floor_sigma(calibration, pred, len(sigma)) ** 2)
  values = space.from_catalogue(pred)  # A record fitted in the family's label space.
  sigma = space.sigma_from_catalogue(values, sigma)
  return space.sigma_to_catalogue(
      values, np.sqrt((a * sigma) ** 2 + floor_sigma(calibration, values, len(sigma)) ** 2))


def describe(record: Mapping[str, Any]) -> str:
  """One line per label: a, the floor model and its median b (for logs and the command line)."""
  return ', '.join(
      f'{n} a={record["a"][n]:.3g} b={record["b"][n]:.3g} '
      f'({record.get("floor", {}).get(n, {}).get("model", "constant")})' for n in LABEL_NAMES)


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
    _check_record(path, record)
  except (OSError, json.JSONDecodeError, TypeError, AttributeError) as e:
    raise CalibrationError(f'{path}: cannot read the calibration: {e}') from e
  return record


def _check_record(path, record: Mapping[str, Any]) -> None:
  """A stored record with finite positive a, non-negative b for every label, a step and valid
  floors, or a CalibrationError naming the file."""
  for key in ('a', 'b', 'step'):
    if key not in record:
      raise CalibrationError(f'{path}: no {key!r} entry')
  for key in ('a', 'b'):
    _check_coefficients(path, key, record[key])
  for name, floor in record.get('floor', {}).items():
    _check_floor(path, name, floor, record.get('features', {}).get(name))


def _check_coefficients(path, key: str, values: Mapping[str, Any]) -> None:
  """Every label's a (finite, positive) or b (finite, non-negative), or a CalibrationError."""
  missing = [n for n in LABEL_NAMES if n not in values]
  if missing:
    raise CalibrationError(f'{path}: {key!r} lacks {missing}')
  bad = [n for n in LABEL_NAMES if not _finite_number(values[n])
         or values[n] < 0 or (key == 'a' and values[n] == 0)]
  if bad:
    raise CalibrationError(f'{path}: {key!r} of {bad} is not a finite '
                           f'{"positive" if key == "a" else "non-negative"} number: '
                           f'{[values[n] for n in bad]}')


def _check_floor(path, name: str, floor: Mapping[str, Any], features: Mapping[str, Any] | None):
  """A stored floor that ``floor_sigma`` can evaluate, or a CalibrationError naming the file."""
  model = floor.get('model')
  if model not in FLOOR_MODELS:
    raise CalibrationError(f'{path}: {name} floor model {model!r} is not one of '
                           f'{tuple(FLOOR_MODELS)}')
  width = num_coefficients(model)
  if len(floor.get('coef', ())) != width:
    raise CalibrationError(f'{path}: {name} {model!r} floor needs {width} coefficients, '
                           f'has {len(floor.get("coef", ()))}')
  if not all(_finite_number(c) for c in floor.get('coef', ())):
    raise CalibrationError(f'{path}: {name} floor coefficients are not all finite numbers: '
                           f'{floor.get("coef")}')
  if model != 'constant' and (features is None or any(
      len(features.get(k, ())) != len(LABEL_NAMES) for k in ('centre', 'scale', 'lo', 'hi'))):
    raise CalibrationError(f'{path}: {name} {model!r} floor lacks its features\' '
                           'centre/scale/lo/hi')


def _finite_number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
