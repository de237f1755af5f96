"""End-to-end evaluation (evaluation.py, evaluate.py) on a tiny checkpoint and real apStar files."""

import csv
import json
import os
import shutil
import subprocess
import sys

import fake_gcs as fake_gcs_lib
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from apogeenet_jax import (
  calibration,
  catalog,
  checkpoint,
  evaluation,
  input_pipeline,
  labels,
  metrics,
  prediction,
  uncertainty,
)
from apogeenet_jax.constants import BAD_PIXEL_ERROR, DATA_TYPES, N_PIXELS
from apogeenet_jax.models.apogee_net import APOGEENet
from apogeenet_jax.normalization import PAPER_STANDARDIZER, Standardizer
from apogeenet_jax.uncertainty import MCSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  model = APOGEENet(channels=(4, 4), hidden=(16,))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, N_PIXELS)))['params']
  directory = str(tmp_path_factory.mktemp('ckpt'))
  manager = checkpoint.make_manager(directory)
  checkpoint.save(manager, 3, {'params': params}, checkpoint.make_meta(model, PAPER_STANDARDIZER))
  return directory


@pytest.fixture
def apstar_dir(tmp_path, real_apstar_files):
  """Three real files plus one broken one that must be skipped, not kill the run."""
  d = tmp_path / 'apstar'
  d.mkdir()
  for path in real_apstar_files[:3]:
    os.symlink(path, d / path.name)
  (d / 'apStar-r6-2M99999999+9999999.fits').write_bytes(b'not a fits file')
  return d


def _files(d):
  return sorted(str(p) for p in d.iterdir())


def test_evaluate_on_real_apstar_files(tiny_checkpoint, apstar_dir, tmp_path):
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  assert meta['step'] == 3
  out = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / 'out'),
                            apstar_files=_files(apstar_dir), settings=MCSettings(mc=6, draw_chunk=3),
                            batch_size=2)
  assert out['n_stars'] == 3 and out['n_skipped'] == 1
  assert out['metrics_json'] is None  # unlabelled: no metrics
  skipped = open(out['skipped_csv']).read()
  assert '2M99999999+9999999' in skipped
  for path in (out['catalog_fits'], out['catalog_csv'], *out['figures']):
    assert os.path.getsize(path) > 0, path
  assert {os.path.basename(p) for p in out['figures']} == {'kiel.png', 'sigma_vs_snr.png'}
  for path in (out['catalog_fits'], out['catalog_csv']):
    t = catalog.read_catalog(path)
    assert len(t) == 3
    assert t['LOGG'].mask.all() and t['TEFF'].mask.all()  # unlabelled
    for name in ('LOGG', 'TEFF', 'FE_H'):
      assert np.all(np.isfinite(t[f'{name}_PRED'])) and np.all(t[f'{name}_ERR'] > 0)
    assert np.all(np.isfinite(t['SNR'])) and np.all(np.isfinite(t['RA']))


def test_mc100_fixed_seed_is_reproducible_and_batch_independent(tiny_checkpoint, apstar_dir,
                                                                tmp_path):
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  files = _files(apstar_dir)
  runs = [evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / f'o{i}'),
                              apstar_files=files, settings=MCSettings(mc=100, seed=7), batch_size=bs,
                              make_figures=False)['table'] for i, bs in enumerate((4, 4, 1))]
  other = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / 'o9'),
                              apstar_files=files, settings=MCSettings(mc=100, seed=8), batch_size=4,
                              make_figures=False)['table']
  for col in ('LOGG_PRED', 'TEFF_ERR', 'FE_H_ERR'):
    np.testing.assert_array_equal(runs[0][col], runs[1][col])
    np.testing.assert_allclose(runs[2][col], runs[0][col], rtol=1e-4)
  assert not np.allclose(other['TEFF_ERR'], runs[0]['TEFF_ERR'])


def _fake_source(n, seed):
  """Records of a built split (as a tfds data source returns them), labels on the model's scale."""
  rng = np.random.default_rng(seed)
  return [{'flux': rng.normal(300, 30, N_PIXELS).astype(np.float32),
           'flux_err': rng.uniform(1, 5, N_PIXELS).astype(np.float32),
           'labels': np.array([4.0, 3500.0 + 10 * i, -0.1], np.float32),
           'data_type': i % len(DATA_TYPES), 'apogee_id': f'2M{i:08d}+0000000',
           'snr': 50.0, 'ra': 10.0, 'dec': 20.0} for i in range(n)]


def _fake_split(n, seed, batch_size):
  """Batches of ``_fake_source`` in the input_pipeline contract (last one padded)."""
  return input_pipeline.eval_batches(_fake_source(n, seed), batch_size)


def _fake_splits(monkeypatch, n, seeds=None):
  """input_pipeline.open_split serves ``_fake_source(n, seeds[split])`` instead of a built data
  set."""
  monkeypatch.setattr(input_pipeline, 'open_split',
                      lambda data_dir, split: _fake_source(n, (seeds or {}).get(split, 0)))


def test_evaluate_on_a_labelled_split_writes_metrics_and_figures(tiny_checkpoint, tmp_path,
                                                                 monkeypatch):
  _fake_splits(monkeypatch, 7)
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  out = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path),
                            splits=['test'], data_dir='unused', settings=MCSettings(mc=4),
                            batch_size=3)
  assert out['n_stars'] == 7  # padding rows dropped
  written = json.load(open(out['metrics_json']))
  test = written['splits']['test']
  assert test['Full']['n'] == 7 and test['Payne']['n'] == 3 and test['YSO']['n'] == 2
  t = out['table']
  assert list(t['DATA_SET']) == ['Test'] * 7
  assert list(t['DATA_TYPE'][:3]) == ['Payne', 'MStar', 'YSO']
  pred = np.stack([t[c].filled(np.nan) for c in ('LOGG_PRED', 'TEFF_PRED', 'FE_H_PRED')], 1)
  labels = np.stack([t[c].filled(np.nan) for c in ('LOGG', 'TEFF', 'FE_H')], 1)
  dz = (pred - labels) / PAPER_STANDARDIZER.std
  assert test['Full']['mse_standardised'] == pytest.approx(np.mean(dz ** 2), rel=1e-9)
  assert test['Full']['scatter']['TEFF'] == pytest.approx(np.std(pred[:, 1] - labels[:, 1]))
  assert {os.path.basename(p) for p in out['figures']} == {
      'labels_vs_predictions.png', 'kiel.png', 'sigma_vs_snr.png', 'calibration.png'}
  lines = metrics.format_metrics(written).splitlines()
  assert lines[0] == '== test =='
  # Ours beside the paper's test column of Table 2 (0.063) and Table 3 (183.74 K for Teff).
  full = next(line.split() for line in lines if line.startswith('Full'))
  assert full[:4] == ['Full', '7', f'{test["Full"]["mse_standardised"]:.4f}', '0.063']
  assert '(183.74)' in full
  # No calibration stored: the catalogue σ is the raw one, and coverage is measured against it.
  assert not out['calibrated'] and written['run']['calibration'] is None
  np.testing.assert_array_equal(t['TEFF_ERR'], t['TEFF_ERR_NOISE'])
  assert t['TEFF_ERR_MODEL'].mask.all()  # one network: no member spread
  err = t['TEFF_ERR'].filled(np.nan)
  assert test['Full']['coverage_1sigma']['TEFF'] == pytest.approx(
      np.mean(np.abs(pred[:, 1] - labels[:, 1]) <= err))
  assert test['YSO']['raw_coverage_2sigma']['TEFF'] == test['YSO']['coverage_2sigma']['TEFF']


def test_compute_metrics_by_hand():
  std = Standardizer(mean=np.zeros(3), std=np.array([1.0, 100.0, 0.5]))
  labels = np.array([[1.0, 4000.0, 0.0], [2.0, 5000.0, 0.0], [3.0, 6000.0, np.nan]])
  pred = labels + np.array([[1.0, 100.0, 0.5], [-1.0, -100.0, -0.5], [9, 9, 9]])
  m = metrics.compute_metrics(pred, labels, np.array([0, 1, 0]), std)
  assert m['Full']['n'] == 2  # the NaN-labelled star is ignored
  assert m['Full']['mse_standardised'] == pytest.approx(1.0)
  assert m['Full']['scatter']['TEFF'] == pytest.approx(100.0)
  assert m['Payne']['bias']['LOGG'] == pytest.approx(1.0) and m['MStar']['n'] == 1
  assert 'YSO' not in m


def _run_evaluate_cli(*flags: str) -> subprocess.CompletedProcess:
  """evaluate.py in a subprocess (one real CPU device), as a user runs it."""
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), *flags],
                        capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.parametrize('estimator', ['mc', 'linear'])
def test_entry_point_runs(tiny_checkpoint, apstar_dir, tmp_path, estimator):
  out = tmp_path / 'cli'
  proc = _run_evaluate_cli(f'--checkpoint={tiny_checkpoint}', f'--apstar_dir={apstar_dir}',
                           '--mc=3', '--batch_size=2', f'--output_dir={out}', '--nofigures',
                           f'--uncertainty={estimator}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'(sigma={estimator}' in proc.stdout
  assert f'Catalogue: {out}/catalog.fits' in proc.stdout
  assert (out / 'catalog.csv').exists() and (out / 'skipped.csv').exists()
  shutil.rmtree(out)


def test_entry_point_bad_checkpoint_is_one_line_not_a_traceback(apstar_dir, tmp_path):
  empty = tmp_path / 'empty_ckpt'
  empty.mkdir()
  proc = _run_evaluate_cli(f'--checkpoint={empty}', f'--apstar_dir={apstar_dir}',
                           f'--output_dir={tmp_path / "o"}')
  assert proc.returncode != 0
  assert f'FATAL {empty}: holds no checkpoint steps' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_all_files_unreadable_is_a_clear_error(tiny_checkpoint, tmp_path):
  bad = tmp_path / 'apStar-r6-2M00000000+0000000.fits'
  bad.write_bytes(b'')
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  with pytest.raises(prediction.EvaluationError, match='no star could be read'):
    evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / 'o'),
                        apstar_files=[str(bad)], settings=MCSettings(mc=2))
  with pytest.raises(checkpoint.CheckpointError, match='no such checkpoint'):
    evaluation.load_checkpoint(workdir=str(tmp_path / 'nowhere'))


def _all_devices_and_one(tiny_checkpoint, **kwargs):
  """predict_batches of 2n − 1 stars in batches of n over all n (fake) devices and over one."""
  if jax.local_device_count() < 2:
    pytest.skip('needs several (fake) devices')
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  model = checkpoint.model_from_meta(meta)
  std = checkpoint.standardizer_from_meta(meta)
  n = jax.local_device_count()
  run = lambda devices: prediction.predict_batches(  # noqa: E731
      params, model, std, _fake_split(2 * n - 1, 3, n), devices=devices, **kwargs)
  return run(None), run(jax.local_devices()[:1]), (params, model, std, n)


def test_sharded_over_fake_devices_equals_one_device(tiny_checkpoint):
  """conftest gives 4 CPU devices: a batch of 4 is split over them, the result must not change."""
  many, one, (_, _, _, n) = _all_devices_and_one(tiny_checkpoint,
                                                settings=MCSettings(mc=8, draw_chunk=4))
  assert len(many['pred']) == 2 * n - 1
  np.testing.assert_allclose(many['pred'], one['pred'], rtol=1e-5)
  np.testing.assert_allclose(many['pred_err'], one['pred_err'], rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Ensembles and calibration.


def _stacked(members):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *members)


def test_ensemble_combines_members_draws_as_specified(tiny_checkpoint):
  """Mean over members and draws; σ_noise² = mean of member variances; σ_model = std of means."""
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  model = checkpoint.model_from_meta(meta)
  std = checkpoint.standardizer_from_meta(meta)
  members = [params] + [jax.jit(model.init)(jax.random.PRNGKey(k), jnp.zeros((1, N_PIXELS)))[
      'params'] for k in (1, 2)]
  kw = dict(settings=MCSettings(mc=6, draw_chunk=3, seed=5), stream=2)
  singles = [prediction.predict_batches(p, model, std, _fake_split(5, 1, 3), **kw)
             for p in members]
  ens = prediction.predict_batches(_stacked(members), model, std, _fake_split(5, 1, 3),
                                   ensemble_size=3, **kw)
  means = np.stack([s['pred'] for s in singles])
  noise = np.stack([s['pred_err_noise'] for s in singles])
  np.testing.assert_allclose(ens['pred'], means.mean(0), rtol=1e-5)
  np.testing.assert_allclose(ens['pred_err_noise'], np.sqrt((noise ** 2).mean(0)), rtol=1e-4)
  np.testing.assert_allclose(ens['pred_err_model'], means.std(0), rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(ens['pred_err'], np.sqrt(ens['pred_err_noise'] ** 2
                                                      + ens['pred_err_model'] ** 2))
  assert np.all(ens['pred_err_model'] > 0)
  # One network: σ_model unmeasured (NaN), the total is σ_noise.
  assert np.isnan(singles[0]['pred_err_model']).all()
  np.testing.assert_array_equal(singles[0]['pred_err'], singles[0]['pred_err_noise'])


def _copy_checkpoint(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _calibrated_and_raw(params, meta, tmp_path):
  """The test split evaluated with the checkpoint's calibration ('auto') and without ('none')."""
  return {mode: evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / mode),
                                    splits=['test'], data_dir='unused', batch_size=8,
                                    settings=MCSettings(mc=4), make_figures=False,
                                    calibration_mode=mode)
          for mode in ('auto', 'none')}


def test_calibrate_stores_applies_and_can_be_switched_off(tiny_checkpoint, tmp_path, monkeypatch):
  _fake_splits(monkeypatch, 24, {'dev': 2, 'test': 3})
  directory = _copy_checkpoint(tiny_checkpoint, tmp_path / 'ckpt')
  params, meta = evaluation.load_checkpoint(checkpoint_dir=directory)
  assert 'calibration' not in meta
  record = evaluation.calibrate(params=params, meta=meta, data_dir='unused',
                                settings=MCSettings(mc=4), batch_size=8)
  assert record['step'] == 3 and record['n']['TEFF'] == 24
  # The σ settings as one dict, as the run header holds them.
  assert record['settings'] == {'sigma': 'mc', 'mc': 4, 'error_cap': 'median', 'seed': 0}
  assert calibration.fitted_settings(record) == MCSettings(mc=4).record()
  assert os.path.exists(os.path.join(directory, 'calibration.json'))
  # orbax still sees exactly its one step beside the sidecar.
  assert checkpoint.make_manager(directory, create=False).all_steps() == [3]
  params, meta = evaluation.load_checkpoint(checkpoint_dir=directory)  # a later run picks it up
  assert meta['calibration']['a'] == pytest.approx(record['a'])
  runs = _calibrated_and_raw(params, meta, tmp_path)
  cal, raw = runs['auto']['table'], runs['none']['table']
  assert runs['auto']['calibrated'] and not runs['none']['calibrated']
  np.testing.assert_array_equal(cal['TEFF_PRED'], raw['TEFF_PRED'])
  np.testing.assert_array_equal(raw['TEFF_ERR'], raw['TEFF_ERR_NOISE'])
  a, b = record['a']['TEFF'], record['b']['TEFF']
  np.testing.assert_allclose(cal['TEFF_ERR'], np.sqrt((a * raw['TEFF_ERR']) ** 2 + b ** 2))
  full = runs['auto']['metrics']['splits']['test']['Full']
  for key in ('coverage_1sigma', 'coverage_2sigma', 'nll', 'raw_coverage_1sigma',
              'raw_coverage_2sigma', 'raw_nll'):
    assert set(full[key]) == {'LOGG', 'TEFF', 'FE_H'}, key
  assert full['raw_coverage_1sigma'] == runs['none']['metrics']['splits']['test']['Full'][
      'coverage_1sigma']
  # The tiny random network is far off: its raw MC σ covers almost nothing; calibrated σ must.
  assert full['raw_coverage_1sigma']['TEFF'] < 0.3 < full['coverage_1sigma']['TEFF']
  assert full['nll']['TEFF'] < full['raw_nll']['TEFF']


def test_a_varying_floor_follows_each_star_into_the_catalogue(tiny_checkpoint, tmp_path,
                                                           monkeypatch):
  """A floor that is a function of the predicted labels is evaluated per catalogue row."""
  _fake_splits(monkeypatch, 30, {'dev': 2, 'test': 3})
  directory = _copy_checkpoint(tiny_checkpoint, tmp_path / 'ckpt')
  params, meta = evaluation.load_checkpoint(checkpoint_dir=directory)
  record = evaluation.calibrate(params=params, meta=meta, data_dir='unused', floor='kiel_linear',
                                settings=MCSettings(mc=4), batch_size=8)
  assert {f['model'] for f in record['floor'].values()} == {'kiel_linear'}
  params, meta = evaluation.load_checkpoint(checkpoint_dir=directory)
  runs = _calibrated_and_raw(params, meta, tmp_path)
  cal, raw = runs['auto']['table'], runs['none']['table']
  names = ('LOGG', 'TEFF', 'FE_H')
  pred = np.stack([np.asarray(raw[f'{n}_PRED'], float) for n in names], 1)
  raw_sigma = np.stack([np.asarray(raw[f'{n}_ERR'], float) for n in names], 1)
  expected = calibration.apply(raw_sigma, record, pred)
  for j, n in enumerate(names):
    np.testing.assert_allclose(cal[f'{n}_ERR'], expected[:, j], rtol=1e-12)
  floor = calibration.floor_sigma(record, pred, len(pred))
  assert np.ptp(floor, axis=0).min() > 0  # not one b for every star
  assert runs['auto']['metrics']['run']['calibration']['floor'] == record['floor']


def test_calibration_of_another_step_is_ignored(tiny_checkpoint, tmp_path):
  directory = _copy_checkpoint(tiny_checkpoint, tmp_path / 'ckpt')
  names = ('LOGG', 'TEFF', 'FE_H')
  calibration.save(directory, {'a': dict.fromkeys(names, 2.0), 'b': dict.fromkeys(names, 0.0),
                               'step': 99})
  _, meta = evaluation.load_checkpoint(checkpoint_dir=directory)
  assert 'calibration' not in meta


def test_ensemble_checkpoint_is_detected_from_meta(tmp_path, monkeypatch):
  _fake_splits(monkeypatch, 5)
  model = APOGEENet(channels=(4, 4), hidden=(16,))
  members = [jax.jit(model.init)(jax.random.PRNGKey(k), jnp.zeros((1, N_PIXELS)))['params']
             for k in range(2)]
  manager = checkpoint.make_manager(str(tmp_path / 'ens'))
  checkpoint.save(manager, 1, {'params': _stacked(members)},
                  checkpoint.make_meta(model, PAPER_STANDARDIZER, ensemble_size=2))
  params, meta = evaluation.load_checkpoint(checkpoint_dir=str(tmp_path / 'ens'))
  assert checkpoint.ensemble_size(meta) == 2
  out = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / 'o'),
                            splits=['test'], data_dir='unused', settings=MCSettings(mc=3),
                            make_figures=False)
  t = out['table']
  assert out['metrics']['run']['ensemble'] == 2
  assert np.all(t['TEFF_ERR_MODEL'] > 0) and not t['TEFF_ERR_MODEL'].mask.any()
  np.testing.assert_allclose(t['TEFF_ERR'], np.hypot(t['TEFF_ERR_NOISE'], t['TEFF_ERR_MODEL']))
  manager = checkpoint.make_manager(str(tmp_path / 'bad'))
  checkpoint.save(manager, 1, {'params': members[0]},
                  checkpoint.make_meta(model, PAPER_STANDARDIZER, ensemble_size=2))
  with pytest.raises(checkpoint.CheckpointError, match='ensemble_size 2'):
    evaluation.load_checkpoint(checkpoint_dir=str(tmp_path / 'bad'))


# ------------------------------------------------------------------------------------------------
# --uncertainty=linear: first-order propagation instead of the draws.


def _small_error_batches(files, batch_size, factor):
  """Real apStar batches with every good pixel's error divided by ``factor`` (1e10 kept)."""
  for batch in input_pipeline.eval_batches(input_pipeline.ApStarFiles(files), batch_size):
    err = batch['flux_err']
    batch['flux_err'] = np.where(err < BAD_PIXEL_ERROR, err / factor, err).astype(np.float32)
    yield batch


def test_linear_equals_mc_on_real_spectra_with_errors_scaled_down(real_apstar_files):
  """With 1000× smaller errors the network is linear over the noise: σ_linear / σ_MC → 1.

  Both go through predict_batches, so the error cap and the 1e10 pixels (which the real files
  have, with outliers far above the cap) are applied the same way on both paths.
  """
  model = APOGEENet(channels=(4, 4), hidden=(16,))
  params = jax.jit(model.init)(jax.random.PRNGKey(2), jnp.zeros((1, N_PIXELS)))['params']
  files = [str(p) for p in real_apstar_files]
  n_draws = 3000
  run = lambda estimator, draws: prediction.predict_batches(  # noqa: E731
      params, model, PAPER_STANDARDIZER, _small_error_batches(files, 4, 1000.0),
      MCSettings(mc=n_draws, draw_chunk=250, estimator=estimator, linear_draws=draws))
  mc = run('mc', 0)
  for draws in (0, uncertainty.DEFAULT_LINEAR_DRAWS):
    _check_linear_against_mc(run('linear', draws), mc, n_draws)


def _check_linear_against_mc(linear, mc, n_draws):
  z = linear['pred_z']
  # The comparison means something only if the outputs depend on the spectrum.
  assert np.all(z.std(axis=0) > 0.05 * np.abs(z).max(axis=0)), z
  np.testing.assert_allclose(mc['pred'], linear['pred'], rtol=1e-4)
  ratio = linear['pred_err'] / mc['pred_err']
  # MC sampling error of one σ: 1/√(2·n_draws) (1.3% at 3000 draws); the median of n stars
  # has ~1.25× the error of their mean. With 1000 draws and a fixed 2% bound the median sat at
  # 2.6 of its standard errors on one CPU and passed on another: the bound is now 4 of them.
  se = 1 / np.sqrt(2 * n_draws)
  assert np.all(np.abs(ratio - 1) < 5 * se), ratio
  se_median = 1.25 * se / np.sqrt(len(ratio))
  assert np.all(np.abs(np.median(ratio, axis=0) - 1) < 4 * se_median), np.median(ratio, axis=0)


def test_linear_over_fake_devices_equals_one_device(tiny_checkpoint):
  many, one, (params, model, std, n) = _all_devices_and_one(
      tiny_checkpoint, settings=MCSettings(estimator='linear', linear_draws=0))
  assert len(many['pred']) == 2 * n - 1 and np.all(many['pred_err'] > 0)
  # Split over devices XLA picks other convolution blockings: float32 rounding, no more.
  scale = np.abs(one['pred_z']).max()
  np.testing.assert_allclose(many['pred_z'], one['pred_z'], rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(many['pred_err'], one['pred_err'], rtol=1e-4)
  # Nothing is random in linear mode: another seed gives the same σ.
  again = prediction.predict_batches(params, model, std, _fake_split(2 * n - 1, 3, 3),
                                     MCSettings(seed=5, estimator='linear', linear_draws=0))
  np.testing.assert_allclose(again['pred_err'], many['pred_err'], rtol=1e-5)
  with pytest.raises(uncertainty.UncertaintyError, match='--uncertainty'):
    MCSettings(estimator='delta')


def test_noise_averaged_linear_over_fake_devices_is_recorded(tiny_checkpoint, tmp_path,
                                                             monkeypatch):
  settings = MCSettings(estimator='linear', linear_draws=2)
  many, one, (params, model, std, n) = _all_devices_and_one(tiny_checkpoint, settings=settings)
  np.testing.assert_allclose(many['pred_err'], one['pred_err'], rtol=1e-4)  # per-star keys
  delta = prediction.predict_batches(params, model, std, _fake_split(2 * n - 1, 3, 3),
                                     MCSettings(estimator='linear', linear_draws=0))
  scale = np.abs(delta['pred_z']).max()  # the prediction is the noiseless pass in both
  np.testing.assert_allclose(many['pred_z'], delta['pred_z'], rtol=1e-5, atol=1e-5 * scale)
  assert not np.allclose(many['pred_err'], delta['pred_err'], rtol=1e-3)
  with pytest.raises(uncertainty.UncertaintyError, match='--linear_draws'):
    MCSettings(estimator='linear', linear_draws=1)
  _fake_splits(monkeypatch, 5)
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  out = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path), splits=['test'],
                            data_dir='unused', settings=settings, batch_size=4,
                            make_figures=False)
  run = json.load(open(out['metrics_json']))['run']
  assert (run['sigma'], run['linear_draws']) == ('linear', 2)


@pytest.mark.parametrize('estimator, mc, sigma', [('linear', 100, 'linear'), ('mc', 3, 'mc'),
                                                  ('linear', 0, 'none')])
def test_catalog_and_metrics_record_the_estimator(tiny_checkpoint, tmp_path, monkeypatch,
                                                  estimator, mc, sigma):
  _fake_splits(monkeypatch, 5)
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  out = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path), splits=['test'],
                            data_dir='unused', settings=MCSettings(mc=mc, estimator=estimator),
                            batch_size=4, make_figures=False)
  run = json.load(open(out['metrics_json']))['run']
  assert out['sigma'] == run['sigma'] == sigma
  assert run['mc'] == (mc if sigma == 'mc' else 0)  # draws actually made
  for path in (out['catalog_fits'], out['catalog_csv']):
    assert catalog.read_catalog(path).meta['SIGMA'] == sigma, path
  # ECSV keeps the column descriptions (FITS does not).
  t = catalog.read_catalog(out['catalog_csv'])
  assert t['TEFF_ERR_NOISE'].description.endswith(catalog.SIGMA_SOURCES[sigma][1])
  assert t['TEFF_PRED'].description.endswith(catalog.SIGMA_SOURCES[sigma][0])
  assert bool(np.all(out['table']['TEFF_ERR'].mask)) == (sigma == 'none')
def test_apstar_dir_with_links_loops_and_near_misses(tiny_checkpoint, real_apstar_files,
                                                     tmp_path):
  # Each real file once, the run ends, odd names reported, FILE column.
  d = tmp_path / 'survey'
  (d / 'F1').mkdir(parents=True)
  for path in real_apstar_files[:2]:
    shutil.copy(path, d / 'F1' / path.name)
  (d / 'F1' / 'loop').symlink_to(d)
  (d / 'F1' / 'again').symlink_to(d)
  (d / 'alias').symlink_to(d / 'F1')
  near = d / 'apStar-2M01+1.fits'
  near.write_bytes(b'')
  listed = tmp_path / 'list.txt'
  listed.write_text(f'{d / "alias" / real_apstar_files[0].name}\n')
  files, skipped = evaluation.apstar_inputs(str(d), str(listed))
  assert sorted(os.path.basename(f) for f in files) == sorted(p.name for p in real_apstar_files[:2])
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  out = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / 'out'),
                            apstar_files=files, skipped_files=skipped, settings=MCSettings(mc=0),
                            batch_size=2, make_figures=False)
  assert out['n_stars'] == 2
  t = catalog.read_catalog(out['catalog_csv'])
  assert sorted(t['FILE']) == sorted(files)
  reasons = {r['file']: r['reason'] for r in csv.DictReader(open(out['skipped_csv']))}
  assert 'not apStar-<reduction>-<APOGEE_ID>' in reasons[str(near)]
  assert 'the same file as' in reasons[str(d / 'alias' / real_apstar_files[0].name)]


def test_all_bad_folder_still_writes_skipped_csv(tiny_checkpoint, tmp_path):
  d = tmp_path / 'bad'
  d.mkdir()
  (d / 'apStar-r6-2M00000000+0000000.fits').write_bytes(b'')
  (d / 'apstar_r6_2M1.fits').write_bytes(b'')
  files, skipped = evaluation.apstar_inputs(str(d))
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  out_dir = tmp_path / 'o'
  with pytest.raises(prediction.EvaluationError, match=r'no star could be read.*skipped\.csv'):
    evaluation.evaluate(params=params, meta=meta, output_dir=str(out_dir), apstar_files=files,
                        skipped_files=skipped, settings=MCSettings(mc=0))
  # The layout of the builder's report, readable with its reader.
  rows = list(csv.reader(open(out_dir / 'skipped.csv')))
  assert rows[0] == list(labels.SKIP_REPORT_COLUMNS) and len(rows) == 3
  # Only names that are not apStar names: nothing to read, still a report.
  (d / 'apStar-r6-2M00000000+0000000.fits').unlink()
  files, skipped = evaluation.apstar_inputs(str(d))
  assert files == [] and len(skipped) == 1
  with pytest.raises(prediction.EvaluationError, match=r'no star could be read \(1 files'):
    evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / 'o2'),
                        apstar_files=files, skipped_files=skipped, settings=MCSettings(mc=0))
  assert len(labels.read_problems(tmp_path / 'o2' / 'skipped.csv')) == 1
  problems = labels.read_problems(out_dir / 'skipped.csv')
  # Files left out by name come first, then the unreadable ones, with the ID from the name.
  assert problems[0].file.endswith('apstar_r6_2M1.fits') and 'named like' in problems[0].reason
  assert problems[1].apogee_id == '2M00000000+0000000'
  assert 'not a readable FITS' in problems[1].reason


def _parse_evaluate_flags(argv):
  """Parses argv with evaluate.py's own flags and validators (imported once, in-process)."""
  from absl import flags
  evaluate = pytest.importorskip('evaluate')
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(['evaluate.py', *argv])
  finally:
    flags.FLAGS.unparse_flags()
  return evaluate


@pytest.mark.parametrize('argv, message', [
    (['--batch_size=0'], '--batch_size=0: 0 is not a positive integer'),
    (['--batch_size=-3'], 'not a positive integer'),
    (['--mc=-1'], '--mc=-1: -1 is not a non-negative integer'),
    (['--draw_chunk=0'], '--draw_chunk=0: 0 is not a positive integer'),
    (['--shard_index=2', '--num_shards=2'], '--shard_index=2 must be below --num_shards=2'),
    (['--num_shards=2', '--multihost'], 'not with --multihost'),
    (['--workdir=w', '--checkpoint=c'], r'Exactly one of \(workdir, checkpoint, merge\)'),
    (['--merge=d', '--split=test'], r'At most one of \(merge, split\)'),
])
def test_bad_flags_are_refused_when_flags_are_parsed(argv, message):
  # Refused before any work, one line each, not ZeroDivisionError or grain's.
  from absl import flags
  if not any(a.startswith(('--workdir', '--merge')) for a in argv):
    argv = ['--checkpoint=c', '--output_dir=o', *argv]
  with pytest.raises(flags.IllegalFlagValueError, match=message):
    _parse_evaluate_flags(argv)
  with pytest.raises(flags.IllegalFlagValueError, match='--output_dir is required'):
    _parse_evaluate_flags(['--checkpoint=c'])


def test_bad_output_dir_is_refused_when_flags_are_parsed(tmp_path, monkeypatch):
  from absl import flags
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  locked = tmp_path / 'locked'
  locked.mkdir()
  real_access = os.access
  # chmod does not stop root, who runs some CI: pretend the permission bits say no.
  monkeypatch.setattr(os, 'access', lambda p, mode: p != str(locked) and real_access(p, mode))
  for path, message in {str(a_file): 'exists and is not a directory',
                        str(a_file / 'below'): 'is a file',
                        str(locked / 'out'): 'not writable'}.items():
    with pytest.raises(flags.IllegalFlagValueError, match=message):
      _parse_evaluate_flags(['--checkpoint=c', f'--output_dir={path}'])
  _parse_evaluate_flags(['--checkpoint=c', f'--output_dir={tmp_path / "new" / "out"}',
                         '--mc=0'])  # fine
  assert not (tmp_path / 'new').exists()


def test_the_default_output_dir_is_checked_only_when_something_is_written_there(tmp_path):
  # --calibrate alone (it writes beside the checkpoint) was refused, with the flags'
  # help, because WORKDIR/eval could not be written.
  from absl import flags
  evaluate = pytest.importorskip('evaluate')
  (tmp_path / 'eval').write_text('a file where WORKDIR/eval would go')
  argv = ['evaluate.py', f'--workdir={tmp_path}', '--data_dir=d', '--calibrate']
  for extra, refused in (([], False), (['--split=test'], True)):
    flags.FLAGS.unparse_flags()
    try:
      flags.FLAGS([*argv, *extra])
      if refused:
        with pytest.raises(SystemExit, match=r'^FATAL --output_dir .*eval: .*not a directory'):
          evaluate._inputs()
      else:
        assert evaluate._inputs()[2:4] == ([], [])
    finally:
      flags.FLAGS.unparse_flags()


def test_outputs_of_an_earlier_run_of_another_mode_are_removed(tiny_checkpoint, apstar_dir,
                                                               tmp_path, monkeypatch):
  # The output folder describes one run, not the union of several.
  _fake_splits(monkeypatch, 5)
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  out_dir = tmp_path / 'out'
  common = dict(params=params, meta=meta, output_dir=str(out_dir), settings=MCSettings(mc=0),
                batch_size=4)
  evaluation.evaluate(apstar_files=_files(apstar_dir), make_figures=False, **common)
  assert (out_dir / 'skipped.csv').exists()
  (out_dir / 'figures').mkdir()
  (out_dir / 'figures' / 'kiel.png').write_bytes(b'last week')
  (out_dir / 'notes.txt').write_text('mine')
  labelled = evaluation.evaluate(splits=['test'], data_dir='unused', make_figures=False, **common)
  assert sorted(os.listdir(out_dir)) == ['catalog.csv', 'catalog.fits', 'figures', 'metrics.json',
                                         'notes.txt']
  assert os.listdir(out_dir / 'figures') == []
  assert labelled['skipped_csv'] is None
  evaluation.evaluate(apstar_files=_files(apstar_dir), make_figures=False, **common)
  assert not (out_dir / 'metrics.json').exists() and (out_dir / 'skipped.csv').exists()


# ------------------------------------------------------------------------------------------------
# Survey scale: shards, parts, merge, jax.distributed. Each must equal one run bit for bit.

_OUTPUT_FILES = ('catalog.csv', 'catalog.fits', 'metrics.json', 'skipped.csv')


def _assert_same_outputs(a, b):
  for name in _OUTPUT_FILES:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _apstar_list(tmp_path, real_apstar_files, n_good=5):
  """A list file of real apStar files with an unreadable one second: skipped, keys unshifted."""
  bad = tmp_path / 'apStar-r6-2M00000000+0000000.fits'
  bad.write_bytes(b'not a fits file')
  files = [str(p) for p in real_apstar_files[:n_good]]
  files.insert(1, str(bad))
  listed = tmp_path / 'apstar.txt'
  listed.write_text('\n'.join(files) + '\n')
  return listed


def test_three_shards_merged_equal_one_run_bit_for_bit(tiny_checkpoint, real_apstar_files,
                                                       tmp_path, monkeypatch):
  _fake_splits(monkeypatch, 13, {'train': 1, 'dev': 2, 'test': 3})
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  files, skipped = evaluation.apstar_inputs(apstar_list=str(_apstar_list(tmp_path,
                                                                          real_apstar_files)))
  common = dict(params=params, meta=meta, splits=['train', 'dev', 'test'], data_dir='unused',
                apstar_files=files, skipped_files=skipped, batch_size=2, make_figures=False,
                settings=MCSettings(mc=5, draw_chunk=2, seed=3))
  one = evaluation.evaluate(output_dir=str(tmp_path / 'one'), **common)
  assert one['n_stars'] == 3 * 13 + 5 and one['n_skipped'] == 1
  parts = [evaluation.evaluate(output_dir=str(tmp_path / 'parts'),
                               shard=prediction.Shard(k, 3), **common) for k in range(3)]
  assert all(p['catalog_fits'] is None for p in parts)
  assert sorted(os.listdir(tmp_path / 'parts')) == [f'part-0000{k}-of-00003.npz' for k in range(3)]
  assert sum(p['n_stars'] for p in parts) == one['n_stars']
  assert min(p['n_stars'] for p in parts) > 0  # every shard did some of the work
  merged = evaluation.merge([str(tmp_path / 'parts')], str(tmp_path / 'merged'),
                            make_figures=False)
  _assert_same_outputs(tmp_path / 'one', tmp_path / 'merged')
  assert merged['metrics'] == one['metrics']
  # Parts of another run, or a part missing, are refused with a reason.
  with pytest.raises(prediction.EvaluationError, match='expected parts 0–2 of 3'):
    evaluation.merge([str(tmp_path / 'parts' / 'part-00000-of-00003.npz')], str(tmp_path / 'x'))
  for what, change in (('run', {'settings': MCSettings(mc=5, draw_chunk=2, seed=4)}),
                       ('inputs', {'apstar_files': files[:-1]})):
    evaluation.evaluate(output_dir=str(tmp_path / what), shard=prediction.Shard(1, 3),
                        **{**common, **change})
    with pytest.raises(prediction.EvaluationError, match=f'different runs: {what} differ'):
      evaluation.merge([str(tmp_path / 'parts' / 'part-00000-of-00003.npz'), str(tmp_path / what),
                        str(tmp_path / 'parts' / 'part-00002-of-00003.npz')], str(tmp_path / 'x'))


def _run_main(argv, capsys):
  """evaluate.py's main in this process (flags, validators, printing), as a user runs it."""
  from absl import flags
  evaluate = pytest.importorskip('evaluate')
  flags.FLAGS.unparse_flags()
  try:
    evaluate.main(flags.FLAGS(['evaluate.py', *argv]))
  finally:
    flags.FLAGS.unparse_flags()
  return capsys.readouterr().out


def test_entry_point_shards_and_merge(tiny_checkpoint, apstar_dir, tmp_path, capsys):
  common = [f'--checkpoint={tiny_checkpoint}', f'--apstar_dir={apstar_dir}', '--mc=3',
            '--batch_size=1', '--nofigures']
  _run_main([*common, f'--output_dir={tmp_path / "one"}'], capsys)
  for k in range(2):
    out = _run_main([*common, f'--output_dir={tmp_path / "parts"}', f'--shard_index={k}',
                     '--num_shards=2'], capsys)
    assert f'Part:      {tmp_path / "parts"}/part-0000{k}-of-00002.npz' in out
    assert 'Catalogue:' not in out and not (tmp_path / 'parts' / 'catalog.csv').exists()
  out = _run_main([f'--merge={tmp_path / "parts"}', f'--output_dir={tmp_path / "merged"}',
                   '--nofigures'], capsys)
  assert f'Catalogue: {tmp_path / "merged"}/catalog.fits' in out
  for name in ('catalog.csv', 'catalog.fits', 'skipped.csv'):
    assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'merged' / name).read_bytes()
  with pytest.raises(SystemExit, match='FATAL no part-'):
    _run_main([f'--merge={tmp_path / "one"}', f'--output_dir={tmp_path / "x"}'], capsys)


@pytest.fixture(scope='module')
def survey_data_dir(tmp_path_factory):
  """A built synthetic survey: dev 26, test 18 stars (enough dev stars to calibrate)."""
  build = pytest.importorskip('tfds_apogee.build')
  from apogeenet_jax import synthetic
  root = tmp_path_factory.mktemp('survey')
  synthetic.write_survey(root / 'raw', num_stars=170, seed=1, show_progress=False)
  build.build(manual_dir=str(root / 'raw'), data_dir=str(root / 'tfds'))
  return root / 'tfds'


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_under_jax_distributed_equal_one_process(tiny_checkpoint, survey_data_dir,
                                                               real_apstar_files, tmp_path):
  """evaluate.py --multihost on 2 local CPU processes (1 device each) = 1 process, bit for bit.

  With --calibrate: both processes fit the dev split, process 0 stores the fit, and the test
  split's σ are calibrated alike.
  """
  # A copy: calibration.json lands beside the checkpoint (its path is in the catalogue header).
  ckpt = shutil.copytree(tiny_checkpoint, tmp_path / 'ckpt')
  stored = ckpt / 'calibration.json'

  def flags(name):
    return [f'--checkpoint={ckpt}', f'--data_dir={survey_data_dir}', '--split=dev,test',
            '--calibrate', f'--apstar_list={_apstar_list(tmp_path, real_apstar_files)}',
            '--mc=4', '--draw_chunk=2', '--batch_size=2', '--nofigures',
            f'--output_dir={tmp_path / name}']

  one = _run_evaluate_cli(*flags('one'))
  assert one.returncode == 0, one.stderr[-3000:]
  fit_one = stored.read_bytes()
  stored.unlink()
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_PROCESSES': '2',
         'JAX_COORDINATOR_ADDRESS': f'localhost:{_free_port()}'}
  env.pop('XLA_FLAGS', None)
  two = flags('two')
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'evaluate.py'), *two, '--multihost'],
      env={**env, 'JAX_PROCESS_ID': str(k)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for k in range(2)]
  try:
    outs = [p.communicate(timeout=240) for p in procs]
  finally:  # One process failing leaves the other waiting in the gather: end it.
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert 'Catalogue:' in outs[0][0] and 'Catalogue:' not in outs[1][0]  # process 0 writes
  assert 'Predicting stars 0–8 of 18 of test' in outs[0][1]
  assert 'Predicting stars 8–18 of 18 of test' in outs[1][1]
  _assert_same_outputs(tmp_path / 'one', tmp_path / 'two')
  metrics = json.loads((tmp_path / 'two' / 'metrics.json').read_text())
  assert {s: m['Full']['n'] for s, m in metrics['splits'].items()} == {'dev': 26, 'test': 18}
  assert metrics['run']['calibration']['n']['TEFF'] == 26
  assert stored.read_bytes() == fit_one  # stored again, by process 0, the same fit


@pytest.fixture
def fake_gcs():
  with fake_gcs_lib.installed() as fs:
    yield fs


def test_checkpoint_outputs_parts_and_merge_on_object_storage(tiny_checkpoint, apstar_dir,
                                                               tmp_path, fake_gcs):
  """gs:// (tests/fake_gcs.py's in-process bucket) for the checkpoint, the outputs, the parts and
  the merge: the same bytes as a local run."""
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  manager = checkpoint.make_manager('gs://bucket/ckpt')
  checkpoint.save(manager, meta['step'], {'params': params},
                  checkpoint.make_meta(checkpoint.model_from_meta(meta), PAPER_STANDARDIZER))
  manager.wait_until_finished()
  remote_params, remote_meta = evaluation.load_checkpoint(checkpoint_dir='gs://bucket/ckpt')
  assert remote_meta['checkpoint_dir'] == 'gs://bucket/ckpt'
  jax.tree.map(np.testing.assert_array_equal, remote_params, params)
  common = dict(params=params, meta=remote_meta, apstar_files=_files(apstar_dir), batch_size=1,
                settings=MCSettings(mc=3, draw_chunk=2))
  evaluation.evaluate(output_dir=str(tmp_path / 'local'), **common)
  out = evaluation.evaluate(output_dir='gs://bucket/eval', **common)
  assert out['catalog_csv'] == 'gs://bucket/eval/catalog.csv'
  for k in range(2):
    evaluation.evaluate(output_dir='gs://bucket/parts', shard=prediction.Shard(k, 2),
                        make_figures=False, **common)
  evaluation.merge(['gs://bucket/parts'], 'gs://bucket/merged', make_figures=False)
  for remote in ('gs://bucket/eval', 'gs://bucket/merged'):
    for name in ('catalog.csv', 'catalog.fits', 'skipped.csv'):
      assert epath.Path(f'{remote}/{name}').read_bytes() == (tmp_path / 'local' / name).read_bytes()
  assert sorted(p.name for p in epath.Path('gs://bucket/eval/figures').iterdir()) == [
      'kiel.png', 'sigma_vs_snr.png']


# ------------------------------------------------------------------------------------------------
# Every output of a run is staged and moved into place only when all are written.


def test_non_ascii_file_name_keeps_the_run(tiny_checkpoint, real_apstar_files, tmp_path):
  d = tmp_path / 'données'
  d.mkdir()
  os.symlink(real_apstar_files[0], d / real_apstar_files[0].name)
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  out = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / 'o'),
                            apstar_files=_files(d), settings=MCSettings(mc=0),
                            make_figures=False)
  csv_table = catalog.read_catalog(out['catalog_csv'])
  assert csv_table['FILE'][0] == str(d / real_apstar_files[0].name)  # the name, as given
  fits_name = catalog.read_catalog(out['catalog_fits'])['FILE'][0]
  assert fits_name.isascii() and 'donn' in fits_name and fits_name != csv_table['FILE'][0]


def test_a_failing_write_leaves_every_earlier_output_whole(tiny_checkpoint, apstar_dir, tmp_path,
                                                           monkeypatch):
  # Disk full after the catalogue used to leave it beside the old figures.
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  out_dir = tmp_path / 'out'
  common = dict(params=params, meta=meta, output_dir=str(out_dir), batch_size=2,
                apstar_files=_files(apstar_dir))
  evaluation.evaluate(settings=MCSettings(mc=2), **common)
  before = {str(p.relative_to(out_dir)): p.read_bytes() for p in out_dir.rglob('*') if p.is_file()}
  assert 'figures/kiel.png' in before and 'skipped.csv' in before

  def disk_full(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(evaluation.figures, 'plot_sigma_vs_snr', disk_full)
  with pytest.raises(prediction.EvaluationError, match='No space left on device'):
    evaluation.evaluate(settings=MCSettings(mc=3, seed=5), **common)
  after = {str(p.relative_to(out_dir)): p.read_bytes() for p in out_dir.rglob('*') if p.is_file()}
  assert after == before
  assert sorted(os.listdir(out_dir)) == sorted(['catalog.csv', 'catalog.fits', 'figures',
                                                'skipped.csv'])


def test_a_directory_in_the_way_is_refused_before_predicting(tmp_path):
  (tmp_path / 'o' / 'catalog.fits').mkdir(parents=True)
  assert 'catalog.fits' in evaluation.output_dir_problem(tmp_path / 'o')
  (tmp_path / 'p').mkdir()
  (tmp_path / 'p' / 'figures').write_text('a file')
  assert 'figures' in evaluation.output_dir_problem(tmp_path / 'p')


class _BuiltSplit(list):
  """A split source as tfds returns it: the build's DatasetInfo rides along."""

  def __init__(self, records, fingerprint):
    super().__init__(records)
    self.dataset_info = type('Info', (), {'metadata': {'input_fingerprint': fingerprint}})()


def test_merge_refuses_parts_of_another_build_of_the_same_size(tiny_checkpoint, tmp_path,
                                                               monkeypatch):
  # Same split sizes, other labels: the parts used to merge into a mix.
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  common = dict(params=params, meta=meta, splits=['test'], data_dir='unused', batch_size=2,
                make_figures=False, settings=MCSettings(mc=0), output_dir=str(tmp_path / 'p'))
  for k, build in ((0, 'build-A'), (1, 'build-B')):
    monkeypatch.setattr(input_pipeline, 'open_split',
                        lambda data_dir, split, b=build: _BuiltSplit(_fake_source(6, 0), b))
    evaluation.evaluate(shard=prediction.Shard(k, 2), **common)
  with pytest.raises(prediction.EvaluationError, match='different runs: inputs differ'):
    evaluation.merge([str(tmp_path / 'p')], str(tmp_path / 'x'))


_NAMES = ('LOGG', 'TEFF', 'FE_H')


@pytest.mark.parametrize('content', ['{"a": ', 'NAN_A', 'NAN_FLOOR'])
def test_a_broken_calibration_names_the_file_and_none_or_calibrate_work_past_it(
    tiny_checkpoint, tmp_path, monkeypatch, content):
  # NaN coefficients blanked every *_ERR with exit 0; a file that failed validation
  # raised from checkpoint loading, even under --calibration=none and --calibrate.
  _fake_splits(monkeypatch, 24, {'dev': 2, 'test': 3})
  directory = _copy_checkpoint(tiny_checkpoint, tmp_path / 'ckpt')
  params, meta = evaluation.load_checkpoint(checkpoint_dir=directory)
  good = evaluation.calibrate(params=params, meta=meta, data_dir='unused',
                              settings=MCSettings(mc=4), batch_size=8, floor='constant')
  path = os.path.join(directory, 'calibration.json')
  record = json.load(open(path))
  if content == 'NAN_A':
    record['a']['TEFF'] = float('nan')
    content = json.dumps(record)
  elif content == 'NAN_FLOOR':
    record['floor']['FE_H']['coef'] = [float('nan')]
    content = json.dumps(record)
  with open(path, 'w') as f:
    f.write(content)
  params, meta = evaluation.load_checkpoint(checkpoint_dir=directory)
  assert 'calibration' not in meta
  with pytest.raises(prediction.EvaluationError, match=r'calibration\.json.*--calibration=none'):
    _calibrated_and_raw(params, meta, tmp_path)
  raw = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / 'none'),
                            splits=['test'], data_dir='unused', settings=MCSettings(mc=4),
                            make_figures=False, calibration_mode='none')
  assert np.all(np.isfinite(raw['table']['TEFF_ERR']))
  again = evaluation.calibrate(params=params, meta=meta, data_dir='unused',
                               settings=MCSettings(mc=4), batch_size=8, floor='constant')
  assert again['a'] == good['a']
  assert evaluation.load_checkpoint(checkpoint_dir=directory)[1]['calibration']['a'] == good['a']


def test_calibration_of_a_retrained_model_at_the_same_step_is_ignored(tiny_checkpoint, tmp_path,
                                                                      monkeypatch):
  # The record named the step only; a retrained model's best step had that number.
  _fake_splits(monkeypatch, 24, {'dev': 2})
  directory = _copy_checkpoint(tiny_checkpoint, tmp_path / 'ckpt')
  params, meta = evaluation.load_checkpoint(checkpoint_dir=directory)
  evaluation.calibrate(params=params, meta=meta, data_dir='unused', settings=MCSettings(mc=4),
                       batch_size=8)
  model = APOGEENet(channels=(4, 4), hidden=(16,))
  other = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, N_PIXELS)))['params']
  retrained = tmp_path / 'retrained'
  checkpoint.save(checkpoint.make_manager(str(retrained)), 3, {'params': other},
                  checkpoint.make_meta(model, PAPER_STANDARDIZER))
  shutil.copy(os.path.join(directory, 'calibration.json'), retrained / 'calibration.json')
  assert 'calibration' in evaluation.load_checkpoint(checkpoint_dir=directory)[1]
  assert 'calibration' not in evaluation.load_checkpoint(checkpoint_dir=str(retrained))[1]


def test_mc_too_small_for_a_sigma_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
  # --mc=1 wrote σ ≡ 0, and --calibrate --mc=1 replaced a good fit by a = 0.0025.
  with pytest.raises(uncertainty.UncertaintyError, match='--mc'):
    MCSettings(mc=1)
  MCSettings(mc=1, estimator='linear')  # linear: mc only asks for a σ
  _fake_splits(monkeypatch, 24, {'dev': 2})
  directory = _copy_checkpoint(tiny_checkpoint, tmp_path / 'ckpt')
  params, meta = evaluation.load_checkpoint(checkpoint_dir=directory)
  evaluation.calibrate(params=params, meta=meta, data_dir='unused', settings=MCSettings(mc=4),
                       batch_size=8)
  before = open(os.path.join(directory, 'calibration.json')).read()
  with pytest.raises(prediction.EvaluationError, match='--calibrate needs at least'):
    evaluation.calibrate(params=params, meta=meta, data_dir='unused',
                         settings=MCSettings(mc=2), batch_size=8)
  assert open(os.path.join(directory, 'calibration.json')).read() == before


_EVALUATE_CLI = """
import runpy, sys
import numpy as np
from apogeenet_jax import input_pipeline
from apogeenet_jax.constants import N_PIXELS
rng = np.random.default_rng(0)
# A built data set of 3 stars per split: too few to calibrate on.
input_pipeline.open_split = lambda data_dir, split, name='apogee': [
    {'flux': rng.normal(300, 30, N_PIXELS).astype(np.float32),
     'flux_err': np.ones(N_PIXELS, np.float32), 'labels': np.array([4.0, 3500.0, 0.0], np.float32),
     'data_type': 0, 'apogee_id': f'2M{i}', 'snr': 50.0, 'ra': 1.0, 'dec': 2.0} for i in range(3)]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_evaluate_py_shows_each_user_error_as_one_line(tiny_checkpoint, tmp_path, monkeypatch):
  # Each of these was a raw traceback (--linear_draws=100000 ran out of memory).
  (tmp_path / 'o1' / 'catalog.fits').mkdir(parents=True)
  (tmp_path / 'o2').mkdir()
  (tmp_path / 'o2' / 'figures').write_text('a file')
  ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / 'ckpt')
  common = [f'--checkpoint={ckpt}', '--data_dir=unused', '--mc=4', '--nofigures']
  cases = [
      ([*common, '--split=bogus', f'--output_dir={tmp_path}/o'], "'bogus' is not one of"),
      ([*common, '--split=test', '--uncertainty=linear', '--linear_draws=1',
        f'--output_dir={tmp_path}/o'], '--linear_draws must be 0 or 2'),
      ([*common, '--split=test', '--uncertainty=linear', '--linear_draws=100000',
        f'--output_dir={tmp_path}/o'], 'linear_draws'),
      ([*common, '--calibrate', f'--output_dir={tmp_path}/o'], 'need at least'),
      ([*common, '--split=test', f'--output_dir={tmp_path}/o1'], 'catalog.fits is a directory'),
      ([*common, '--split=test', f'--output_dir={tmp_path}/o2'], 'figures is a file'),
  ]
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen([sys.executable, '-c', _EVALUATE_CLI,
                             os.path.join(ROOT, 'evaluate.py'), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for flags, _ in cases]
  for proc, (flags, message) in zip(procs, cases, strict=True):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, flags
    assert 'Traceback' not in err, (flags, err[-2000:])
    assert message in err, (flags, err[-800:])
    assert 'FATAL' in err, (flags, err[-500:])  # FATAL …, or absl's FATAL Flags parsing error


def test_calibrate_on_a_read_only_checkpoint_stops_before_predicting(tiny_checkpoint, tmp_path,
                                                                     monkeypatch):
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  monkeypatch.setattr(evaluation.os, 'access', lambda path, mode: False)  # root ignores chmod
  monkeypatch.setattr(prediction, 'predict_inputs', lambda *a, **k: pytest.fail('predicted'))
  with pytest.raises(prediction.EvaluationError, match='no write permission'):
    evaluation.calibrate(params=params, meta=meta, data_dir='unused', settings=MCSettings(mc=4))


def test_a_truncated_part_file_is_named(tmp_path):
  from apogeenet_jax import shards
  data = shards.part_bytes({'pred': np.zeros((4, 3))}, {'format': 1})
  path = tmp_path / 'part-00000-of-00002.npz'
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(prediction.EvaluationError, match=rf'{path}: not a part file'):
    evaluation.merge([str(path)], str(tmp_path / 'o'))


@pytest.mark.parametrize('estimator', ['mc', 'linear'])
def test_flux_scaling_applies_alike_to_prediction_mc_and_linear_sigma(estimator):
  """Flux and errors of every star ×500: under flux_scaling='median' the prediction and its σ
  (Monte Carlo draws or the first-order σ) are unchanged, because the scaling is part of the
  network and the noise is drawn on the raw flux it scales; after a checkpoint round trip too."""
  model = APOGEENet(channels=(4, 4), hidden=(16,), flux_scaling='median')
  params = jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, N_PIXELS)))['params']
  params = {**params, 'conv1': jax.tree.map(lambda x: 30 * x, params['conv1'])}
  meta = checkpoint.make_meta(model, PAPER_STANDARDIZER)
  restored = checkpoint.model_from_meta(meta)
  assert restored.flux_scaling == 'median'
  source = _fake_source(6, 0)
  bright = [{**r, 'flux': r['flux'] * 500, 'flux_err': r['flux_err'] * 500} for r in source]
  settings = MCSettings(mc=50, estimator=estimator)
  a, b = (prediction.predict_batches(params, restored, PAPER_STANDARDIZER,
                                     input_pipeline.eval_batches(s, 3), settings)
          for s in (source, bright))
  assert np.ptp(a['pred_z'], axis=0).min() > 1e-3
  np.testing.assert_allclose(a['pred'], b['pred'], rtol=1e-4)
  np.testing.assert_allclose(a['pred_err'], b['pred_err'], rtol=2e-3)


# ------------------------------------------------------------------------------------------------
# Inputs at inference: regular files only, and the build's spectrum rules.


def test_special_files_and_absurd_spectra_are_skipped_never_predicted(tiny_checkpoint, tmp_path,
                                                                      real_apstar_files):
  from astropy.io import fits
  d = tmp_path / 'in'
  d.mkdir()
  os.symlink('/dev/zero', d / 'apStar-x-2M99000001+0000000.fits')
  os.mkfifo(d / 'apStar-x-2M99000002+0000000.fits')
  good = real_apstar_files[0]
  os.symlink(good, d / good.name)
  factors = {'2M99000003+0000000': 1e-40, '2M99000004+0000000': 1e28, '2M99000005+0000000': -1}
  for apogee_id, factor in factors.items():
    with fits.open(good) as hdul:
      hdul = fits.HDUList([h.copy() for h in hdul])
      hdul[0].header['OBJID'] = apogee_id
      for k in (1, 2):
        hdul[k].data = hdul[k].data * np.float32(abs(factor))
      hdul[1].data = hdul[1].data * np.float32(np.sign(factor))
      hdul.writeto(d / f'apStar-r6-{apogee_id}.fits')
  listing = tmp_path / 'list.txt'
  listing.write_text(f'{d / "apStar-x-2M99000001+0000000.fits"}\n{good}\n')
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  for name, (files, skipped) in {'dir': evaluation.apstar_inputs(str(d)),
                                 'list': evaluation.apstar_inputs(None, str(listing))}.items():
    out = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / name),
                              apstar_files=files, skipped_files=skipped,
                              settings=MCSettings(mc=4), make_figures=False)
    assert out['n_stars'] == 1, name
    report = {os.path.basename(p.file): p.reason
              for p in labels.read_problems(tmp_path / name / 'skipped.csv')}
    assert 'character device, not a regular file' in report['apStar-x-2M99000001+0000000.fits']
    if name == 'dir':
      assert 'FIFO' in report['apStar-x-2M99000002+0000000.fits']
      assert 'below 0.001' in report['apStar-r6-2M99000003+0000000.fits']
      assert 'above 1e+10' in report['apStar-r6-2M99000004+0000000.fits']
      assert 'too little spectrum' in report['apStar-r6-2M99000005+0000000.fits']


def test_apstar_dir_or_list_that_cannot_be_read_is_one_line(tmp_path):
  with pytest.raises(prediction.EvaluationError, match=r'--apstar_dir .*not a directory'):
    evaluation.apstar_inputs(str(tmp_path / 'missing'))
  (tmp_path / 'f').write_text('x')
  with pytest.raises(prediction.EvaluationError, match=r'--apstar_dir .*not a directory'):
    evaluation.apstar_inputs(str(tmp_path / 'f'))
  with pytest.raises(prediction.EvaluationError, match=r'--apstar_list .*no such file'):
    evaluation.apstar_inputs(None, str(tmp_path / 'missing.txt'))
  with pytest.raises(prediction.EvaluationError, match=r'--apstar_list .*not a regular file'):
    evaluation.apstar_inputs(None, '/dev/zero')


# ------------------------------------------------------------------------------------------------
# Outputs owned: only files whose names the program writes are replaced or removed.


def test_only_files_it_writes_are_removed_and_other_programs_folders_are_refused(
    tiny_checkpoint, apstar_dir, tmp_path):
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  files, skipped = evaluation.apstar_inputs(str(apstar_dir))
  out_dir = tmp_path / 'out'
  (out_dir / 'figures').mkdir(parents=True)
  (out_dir / 'figures' / 'my_plot.png').write_bytes(b'mine')
  (out_dir / 'figures' / 'calibration.png').write_bytes(b'an earlier run')
  (out_dir / 'notes.csv').write_text('mine')
  for make_figures in (True, False):
    evaluation.evaluate(params=params, meta=meta, output_dir=str(out_dir), apstar_files=files,
                        skipped_files=skipped, settings=MCSettings(mc=0),
                        make_figures=make_figures)
    assert (out_dir / 'figures' / 'my_plot.png').read_bytes() == b'mine'
    assert (out_dir / 'notes.csv').read_text() == 'mine'
    assert not (out_dir / 'figures' / 'calibration.png').exists()  # ours, not redrawn
  assert not (out_dir / 'figures' / 'kiel.png').exists()  # --figures=false: ours, removed
  for folder, what in ((tiny_checkpoint, 'a checkpoint folder'),):
    with pytest.raises(prediction.EvaluationError, match=f'is {what}'):
      evaluation.evaluate(params=params, meta=meta, output_dir=str(folder), apstar_files=files,
                          skipped_files=skipped, settings=MCSettings(mc=0))
  data_set = tmp_path / 'tfds' / 'apogee' / '1.0.0'
  data_set.mkdir(parents=True)
  (data_set / 'dataset_info.json').write_text('{}')
  (data_set / 'skipped.csv').write_text('the build\'s report')
  assert 'is a built data set' in evaluation.output_dir_problem(str(data_set))
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  assert 'training workdir' in evaluation.output_dir_problem(str(workdir))
  assert evaluation.output_dir_problem(str(workdir / 'eval')) is None


def test_a_split_star_that_fails_the_spectrum_rules_is_listed_not_lost(tiny_checkpoint, tmp_path,
                                                                       monkeypatch):
  """A data set built before the rules may hold an empty spectrum: at inference it is skipped
  with the reason, in skipped.csv, as an apStar file would be."""
  source = _fake_source(5, 0)
  source[2]['flux'] = np.zeros(N_PIXELS, np.float32)
  source[2]['flux'][100] = 50.0  # one good pixel of 8575
  monkeypatch.setattr(input_pipeline, 'open_split', lambda data_dir, split: source)
  params, meta = evaluation.load_checkpoint(checkpoint_dir=tiny_checkpoint)
  out = evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path), splits=['test'],
                            data_dir='unused', settings=MCSettings(mc=4), make_figures=False)
  assert out['n_stars'] == 4 and '2M00000002+0000000' not in list(out['table']['APOGEE_ID'])
  problems = labels.read_problems(tmp_path / 'skipped.csv')
  assert [p.apogee_id for p in problems] == ['2M00000002+0000000']
  assert 'too little spectrum' in problems[0].reason


def test_a_non_finite_prediction_or_sigma_is_reported_not_catalogued():
  """The linear σ overflowed float32 at a flux level of 1e-30 and gave NaN silently: such a star
  is listed with the reason instead of a catalogue row."""
  merged = {'pred': np.array([[4.0, 5000.0, 0.0], [4.0, 5000.0, 0.0], [np.nan, 1.0, 0.0]]),
            'pred_err_noise': np.array([[0.1, 10.0, 0.01], [np.nan, 10.0, 0.01],
                                        [0.1, 10.0, 0.01]]),
            'apogee_id': np.array(['a', 'b', 'c']), 'file': np.array(['fa', 'fb', 'fc']),
            'problems': np.zeros((0, 3), str)}
  out = evaluation._without_unsupported(merged, 'linear')
  assert list(out['apogee_id']) == ['a'] and len(out['pred_err_noise']) == 1
  assert [row[1] for row in out['problems']] == ['b', 'c']
  assert 'not finite' in out['problems'][0][2]
  # Without σ (--mc=0) only the prediction counts.
  assert list(evaluation._without_unsupported(merged, 'none')['apogee_id']) == ['a', 'b']
