"""σ calibration (calibration.py): the maximum-likelihood fit, coverage, NLL, the sidecar file."""

import json
import os

import numpy as np
import pytest

from apogeenet_jax import calibration


@pytest.mark.parametrize('a, b', [(3.0, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_fit_recovers_known_a_and_b(a, b):
  rng = np.random.default_rng(0)
  sigma = rng.uniform(0.05, 2.0, 20000)
  residual = rng.normal(size=sigma.size) * np.sqrt((a * sigma) ** 2 + b ** 2)
  a_fit, b_fit = calibration.fit_label(residual, sigma)
  # At a boundary (a or b = 0) the other parameter is what the data pin down; compare σ_cal.
  np.testing.assert_allclose(np.hypot(a_fit * sigma, b_fit), np.hypot(a * sigma, b), rtol=0.03)
  if a and b:
    assert (a_fit, b_fit) == pytest.approx((a, b), rel=0.03)


def test_fit_in_native_units_and_apply():
  rng = np.random.default_rng(1)
  n = 5000
  std = np.array([1.0, 500.0, 0.3])
  sigma = rng.uniform(0.1, 1.0, (n, 3)) * std
  a_true, b_true = np.array([2.0, 0.5, 1.0]), np.array([0.2, 100.0, 0.0])
  true_sigma = np.sqrt((a_true * sigma) ** 2 + b_true ** 2)
  labels = rng.normal(size=(n, 3)) * std
  pred = labels + rng.normal(size=(n, 3)) * true_sigma
  pred[0, 1] = np.nan  # left out of TEFF only
  record = calibration.fit(pred, labels, sigma, std, step=7)
  assert record['step'] == 7 and record['n'] == {'LOGG': n, 'TEFF': n - 1, 'FE_H': n}
  np.testing.assert_allclose([record['a'][k] for k in ('LOGG', 'TEFF', 'FE_H')], a_true,
                             atol=0.06)
  b_fit = np.array([record['b'][k] for k in ('LOGG', 'TEFF', 'FE_H')])
  assert np.all(np.abs(b_fit - b_true) < 0.03 * std), b_fit
  cal = calibration.apply(sigma, record)
  r = pred - labels
  for j in range(3):
    assert calibration.coverage(r[:, j], cal[:, j], 1.0) == pytest.approx(0.683, abs=0.02)
    assert calibration.coverage(r[:, j], cal[:, j], 2.0) == pytest.approx(0.954, abs=0.01)
  np.testing.assert_array_equal(calibration.apply(sigma, None), sigma)


def test_too_few_stars_is_an_error():
  with pytest.raises(calibration.CalibrationError, match='need at least'):
    calibration.fit_label(np.ones(5), np.ones(5))


def test_coverage_and_nll_by_hand():
  r = np.array([0.5, -1.5, 2.5, np.nan])
  s = np.array([1.0, 1.0, 1.0, 1.0])
  assert calibration.coverage(r, s, 1.0) == pytest.approx(1 / 3)
  assert calibration.coverage(r, s, 2.0) == pytest.approx(2 / 3)
  expected = np.mean(0.5 * np.log(2 * np.pi) + np.array([0.5, 1.5, 2.5]) ** 2 / 2)
  assert calibration.gaussian_nll(r, s) == pytest.approx(expected)
  curve = calibration.coverage_curve(np.linspace(-3, 3, 100001), np.ones(100001),
                                     [calibration.NOMINAL_1SIGMA])
  assert curve[0] == pytest.approx(1 / 3, abs=1e-4)  # uniform on ±3: |r| ≤ 1 is a third


def test_sidecar_round_trip_and_bad_files(tmp_path):
  names = ('LOGG', 'TEFF', 'FE_H')
  record = {'a': dict.fromkeys(names, 1.5), 'b': dict.fromkeys(names, 0.1), 'step': 3}
  path = calibration.save(str(tmp_path), record)
  assert os.listdir(tmp_path) == ['calibration.json']  # no temporary left behind
  assert calibration.load(str(tmp_path)) == record
  assert calibration.load(str(tmp_path / 'none')) is None
  with pytest.raises(calibration.CalibrationError, match='step'):
    calibration.save(str(tmp_path), {'a': {}, 'b': {}})
  with pytest.raises(calibration.CalibrationError, match='cannot write'):
    calibration.save(str(tmp_path / 'calibration.json' / 'x'), record)  # a file, not a folder
  with open(path, 'w') as f:
    json.dump({'a': {'LOGG': 1}, 'b': dict.fromkeys(names, 0.1), 'step': 3}, f)
  with pytest.raises(calibration.CalibrationError, match=r"'a' lacks \['TEFF', 'FE_H'\]"):
    calibration.load(str(tmp_path))
