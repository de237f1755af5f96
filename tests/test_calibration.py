"""σ calibration (calibration.py): the maximum-likelihood fit, coverage, NLL, the sidecar file."""

import itertools
import json
import math
import os

import numpy as np
import pytest

from apogeenet_jax import calibration, uncertainty
from apogeenet_jax.normalization import LabelSpace


@pytest.mark.parametrize('a, b', [(3.0, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_fit_recovers_known_a_and_b(a, b):
  rng = np.random.default_rng(0)
  sigma = rng.uniform(0.05, 2.0, 20000)
  residual = rng.normal(size=sigma.size) * np.sqrt((a * sigma) ** 2 + b ** 2)
  f = calibration.fit_label(residual, sigma)  # floor='constant': the literal (a, b)
  a_fit, b_fit = f['a'], math.exp(f['coef'][0] / 2)
  assert f['model'] == 'constant' and f['b_z'] == pytest.approx(b_fit)
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
  pred[0, 1] = np.nan  # left out of TEFF only, with a constant floor
  record = calibration.fit(pred, labels, sigma, std, floor='constant', step=7)
  assert record['step'] == 7 and record['n'] == {'LOGG': n, 'TEFF': n - 1, 'FE_H': n}
  # Other floors are functions of all predicted labels: that star is left out of every label.
  assert calibration.fit(pred[:500], labels[:500], sigma[:500], std)['n'] == dict.fromkeys(
      ('LOGG', 'TEFF', 'FE_H'), 499)
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


# ------------------------------------------------------------------------------------------------
# Floors that depend on the predicted labels.

NAMES = ('LOGG', 'TEFF', 'FE_H')
STD = np.array([1.0, 500.0, 0.3])


def _two_kinds_survey(rng, n, log_b2):
  """Stars in two Kiel groups, 40% dwarfs: predictions, labels, raw σ and the dwarf mask. The
  TEFF residuals have the floor b² = exp(log_b2(log g, Teff)); log g and [Fe/H] a constant one."""
  dwarf = rng.random(n) < 0.4
  logg = np.where(dwarf, rng.normal(4.5, 0.2, n), rng.normal(2.5, 0.5, n))
  teff = np.where(dwarf, rng.normal(3500, 300, n), rng.normal(4700, 350, n))
  labels = np.stack([logg, teff, rng.normal(-0.2, 0.3, n)], axis=1)
  sigma = rng.uniform(0.01, 0.1, (n, 3)) * STD
  floor = np.stack([np.full(n, 0.1), np.sqrt(np.exp(log_b2(logg, teff))), np.full(n, 0.03)], 1)
  pred = labels + rng.normal(size=(n, 3)) * np.sqrt(sigma ** 2 + floor ** 2)
  return pred, labels, sigma, dwarf


def _dwarfs_worse(logg, teff):
  return 2 * np.log(np.where(logg > 3.5, 300.0, 60.0))  # 300 K for dwarfs, 60 K for giants


def test_a_varying_floor_is_chosen_and_covers_each_kind_of_star():
  rng = np.random.default_rng(3)
  pred, labels, sigma, _ = _two_kinds_survey(rng, 1500, _dwarfs_worse)
  auto = calibration.fit(pred, labels, sigma, STD)
  constant = calibration.fit(pred, labels, sigma, STD, floor='constant')
  assert auto['floor']['TEFF']['model'] != 'constant'
  assert auto['floor']['LOGG']['model'] == 'constant'  # its floor does not vary
  test_pred, test_labels, test_sigma, test_dwarf = _two_kinds_survey(rng, 4000, _dwarfs_worse)
  r = test_pred[:, 1] - test_labels[:, 1]
  for record, close in ((auto, True), (constant, False)):
    cal = calibration.apply(test_sigma, record, test_pred)[:, 1]
    for group in (test_dwarf, ~test_dwarf):
      c1 = calibration.coverage(r[group], cal[group], 1.0)
      # 0.05: a smooth floor across this step in the truth under-covers the dwarfs by ~0.02–0.05
      # (hinge and quadratic alike); the constant floor is off by 0.2 and more.
      assert (abs(c1 - calibration.NOMINAL_1SIGMA) < 0.05) == close, (record['floor'], c1)
  cal = calibration.apply(test_sigma, auto, test_pred)[:, 1]
  assert calibration.gaussian_nll(r, cal) < calibration.gaussian_nll(
      r, calibration.apply(test_sigma, constant, test_pred)[:, 1]) - 0.1


def _hot_stars_survey(rng, n):
  """Cool stars (2,800–6,500 K) and 10% hot ones (7,000–20,000 K, log-uniform) whose [Fe/H]
  the spectra do not carry: floor 0.2 dex against 0.01 dex. The hot stars' raw σ is 5× the cool
  stars', as APOGEE Net II's MC gives them, so that the constant model's optimum puts all of the
  error into a (b → 0): a floor fitted from there has no gradient."""
  hot = rng.random(n) < 0.1
  teff = np.where(hot, 10 ** rng.uniform(np.log10(7000), np.log10(20000), n),
                  rng.uniform(2800, 6500, n))
  labels = np.stack([rng.uniform(1.0, 5.0, n), teff, rng.normal(-0.1, 0.25, n)], axis=1)
  sigma = (rng.uniform(0.002, 0.01, (n, 3)) * np.array([1.0, 1000.0, 1.0])
           * np.where(hot, 5.0, 1.0)[:, None])
  floor = np.stack([np.full(n, 0.02), np.full(n, 20.0), np.where(hot, 0.2, 0.01)], axis=1)
  pred = labels + rng.normal(size=(n, 3)) * np.sqrt(sigma ** 2 + floor ** 2)
  return pred, labels, sigma, hot


def test_a_hinge_floor_separates_a_population_whose_label_is_not_in_the_spectra():
  """Hot stars' [Fe/H] floor is 20× the cool stars': a floor linear or quadratic in the labels
  over-covers the cool majority; the hinge floor, which 'auto' picks, covers both groups."""
  rng = np.random.default_rng(11)
  pred, labels, sigma, _ = _hot_stars_survey(rng, 2700)
  test_pred, test_labels, test_sigma, test_hot = _hot_stars_survey(rng, 6000)
  r = test_pred[:, 2] - test_labels[:, 2]
  # Fitted in log10 Teff, as for APOGEE Net II.
  space, std = LabelSpace(log10=('TEFF',)), np.array([1.0, 0.16, 0.3])
  auto = calibration.fit(pred, labels, sigma, std, space=space)
  assert auto['floor']['FE_H']['model'] == 'kiel_hinge'
  for floor, close in (('auto', True), ('kiel_quadratic', False), ('labels_quadratic', False)):
    record = auto if floor == 'auto' else calibration.fit(pred, labels, sigma, std, floor=floor,
                                                          space=space)
    cal = calibration.apply(test_sigma, record, test_pred)[:, 2]
    c1 = [calibration.coverage(r[g], cal[g], 1.0) for g in (test_hot, ~test_hot)]
    assert all(abs(c - calibration.NOMINAL_1SIGMA) < 0.04 for c in c1) == close, (floor, c1)


def test_constant_floor_is_kept_when_nothing_varies():
  """The one-standard-error rule: a homoscedastic floor keeps the 2-number model."""
  chosen = []
  for seed in range(8):
    rng = np.random.default_rng(100 + seed)
    pred, labels, sigma, _ = _two_kinds_survey(rng, 400, lambda g, t: np.full_like(g, 2 * np.log(80)))
    chosen.append(calibration.select_floor((pred[:, 1] - labels[:, 1]) / STD[1],
                                           sigma[:, 1] / STD[1], pred)[0])
  assert chosen.count('constant') >= 7, chosen


def test_floor_never_extrapolates_and_records_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  pred, labels, sigma, _ = _two_kinds_survey(rng, 1500, _dwarfs_worse)
  record = calibration.fit(pred, labels, sigma, STD, floor='labels_quadratic', step=1)
  geometry = record['features']['TEFF']
  edges = np.array([geometry['hi'], geometry['lo']])
  beyond = edges + np.array([[3.0, 2000.0, 1.0], [-3.0, -2000.0, -1.0]])  # far outside the dev range
  ones = np.ones((2, 3))
  np.testing.assert_allclose(calibration.apply(ones, record, beyond),
                             calibration.apply(ones, record, edges))
  inside = calibration.apply(ones, record, np.array([geometry['centre']] * 2))
  assert not np.allclose(inside[:, 1], calibration.apply(ones, record, edges)[:, 1])
  calibration.save(str(tmp_path), record)
  loaded = calibration.load(str(tmp_path))
  np.testing.assert_array_equal(calibration.apply(sigma, loaded, pred),
                                calibration.apply(sigma, record, pred))
  with pytest.raises(calibration.CalibrationError, match='needs the predictions'):
    calibration.apply(sigma, record)
  # A record written before these floors ('a' and 'b' only) applies b as a constant.
  old = {'a': dict.fromkeys(NAMES, 2.0), 'b': dict(zip(NAMES, (0.1, 50.0, 0.02), strict=True)),
         'step': 1}
  np.testing.assert_allclose(calibration.apply(sigma, old),
                             np.sqrt((2 * sigma) ** 2 + np.array([0.1, 50.0, 0.02]) ** 2))


@pytest.mark.parametrize('edit, message', [
    (lambda r: r['floor']['TEFF'].update(model='cubic'), "'cubic' is not one of"),
    (lambda r: r['floor']['TEFF']['coef'].pop(), 'needs 6 coefficients, has 5'),
    (lambda r: r['features'].pop('TEFF'), 'lacks its features'),
])
def test_a_broken_floor_names_the_file(tmp_path, edit, message):
  rng = np.random.default_rng(6)
  pred, labels, sigma, _ = _two_kinds_survey(rng, 300, _dwarfs_worse)
  record = calibration.fit(pred, labels, sigma, STD, floor='kiel_quadratic', step=1)
  edit(record)
  calibration.save(str(tmp_path), record)
  with pytest.raises(calibration.CalibrationError, match=rf'calibration\.json: TEFF .*{message}'):
    calibration.load(str(tmp_path))


def test_richer_floors_need_enough_stars():
  rng = np.random.default_rng(7)
  models = list(calibration.FLOOR_MODELS)
  for n, tried in ((60, models[:1]), (90, models[:2]), (150, models[:4]), (250, models[:5]),
                   (400, models)):
    pred, labels, sigma, _ = _two_kinds_survey(rng, n, _dwarfs_worse)
    record = calibration.fit(pred, labels, sigma, STD)
    assert sorted(record['floor']['TEFF']['cv_nll']) == (sorted(tried) if len(tried) > 1 else [])


@pytest.mark.parametrize('old, settings', [
    ({'mc': 100, 'error_cap': 'median', 'seed': 0, 'estimator': 'mc', 'linear_draws': 2},
     uncertainty.MCSettings()),
    ({'mc': 100, 'error_cap': 'mean', 'seed': 3, 'estimator': 'linear', 'linear_draws': 0},
     uncertainty.MCSettings(error_cap='mean', seed=3, estimator='linear', linear_draws=0)),
])
def test_records_from_before_the_settings_dict_read_as_their_settings(old, settings):
  """Older calibration.json files hold the σ settings as loose keys: they still compare with a
  run's settings (an 'mc' record never carried linear_draws)."""
  assert calibration.fitted_settings({'a': {}, 'b': {}, **old}) == settings.record()
  assert calibration.fitted_settings({'settings': settings.record()}) == settings.record()


def test_a_quadratic_floor_stays_in_the_range_seen_on_dev_at_the_corners_of_the_box():
  """The corners of the clipped label box (high log g with high Teff, …) hold no dev star; a
  quadratic floor's exponent there gave b from 2e-6 to 1e5 dex. b is clipped to its dev range."""
  rng = np.random.default_rng(5)
  pred, labels, sigma, _ = _two_kinds_survey(rng, 1500, _dwarfs_worse)
  record = calibration.fit(pred, labels, sigma, STD, floor='labels_quadratic', step=1)
  dev_b = calibration.floor_sigma(record, pred, len(pred))
  geometry = record['features']['LOGG']
  corners = np.array(list(itertools.product(*zip(geometry['lo'], geometry['hi'], strict=True))))
  b = calibration.floor_sigma(record, corners, len(corners))
  for j, name in enumerate(NAMES):
    assert record['floor'][name]['range'] == [dev_b[:, j].min(), dev_b[:, j].max()]
    assert np.all(b[:, j] >= dev_b[:, j].min()) and np.all(b[:, j] <= dev_b[:, j].max()), name
