"""The floor models of the σ calibration (``calibration``): log b² as a function of a star's
standardised predicted labels, and the error every calibration problem raises.

A model is (the columns of LABEL_NAMES it depends on, its form): degree 0, 1 or 2 polynomials,
or 'hinge', a linear spline with knots at ``HINGE_KNOTS``.
"""

import itertools

import numpy as np

from apogeenet_jax.constants import LABEL_NAMES

# Floor models, simplest first (the order the one-standard-error rule prefers): the predicted
# labels (columns of LABEL_NAMES) log b² depends on, and the polynomial degree in them.
FLOOR_MODELS = {
    'constant': ((), 0),
    'kiel_linear': ((0, 1), 1),
    'labels_linear': ((0, 1, 2), 1),
    'kiel_quadratic': ((0, 1), 2),
    'labels_quadratic': ((0, 1, 2), 2),
    'kiel_hinge': ((0, 1), 'hinge'),
}
# Knots of the 'hinge' floor (standardised predicted labels): log b² is a linear spline in log g
# and Teff with a change of slope at each knot, so the floor can stay flat over one population and
# step up within half a standard deviation to another (hot stars' [Fe/H], which their spectra do
# not carry), where a quadratic can only bend (docs/model_families.md).
HINGE_KNOTS = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
FLOOR_CHOICES = ('auto', *FLOOR_MODELS)  # 'auto': chosen per label by cross-validation


class CalibrationError(ValueError):
  """Calibration cannot be fitted, read or applied."""


def floor_design(features_z: np.ndarray, model: str) -> np.ndarray:
  """(n, p) design matrix Φ of log b² from (n, 3) standardised predicted labels."""
  if model not in FLOOR_MODELS:
    raise CalibrationError(f'unknown floor model {model!r}; one of {tuple(FLOOR_MODELS)}')
  columns, degree = FLOOR_MODELS[model]
  x = np.asarray(features_z, np.float64).reshape(-1, len(LABEL_NAMES))
  terms = [np.ones(len(x))] + [x[:, i] for i in columns]
  if degree == 2:
    terms += [x[:, i] * x[:, j] for i, j in itertools.combinations_with_replacement(columns, 2)]
  elif degree == 'hinge':
    terms += [np.maximum(x[:, i] - k, 0.0) for i in columns for k in HINGE_KNOTS]
  return np.stack(terms, axis=1)


def num_coefficients(model: str) -> int:
  """β's length of a floor model (a not included)."""
  return floor_design(np.zeros((1, len(LABEL_NAMES))), model).shape[1]
