"""The model registry end to end: every config.model field defines the run, APOGEE Net II's
photometry and APOGEE Net III's batch-norm state travel through training, resume, ensembles,
checkpoints and prediction.

Tiny variants on the fake sources of test_training (4 fake CPU devices from the conftest).
"""

import json

import jax
import numpy as np
import pytest
from test_training import _assert_trees_equal, fake_source

from apogeenet_jax import checkpoint, models, prediction, resume, training, uncertainty
from apogeenet_jax.train_state import TrainingError
from configs import default, net2


def _tiny(config, **model):
  """A fast variant of a config: tiny network, small batches, 2 epochs from the start, a
  constant rate without warm-up and a drawn output layer (so that the outputs differ between
  spectra at once)."""
  config.batch_size, config.eval_batch_size, config.max_epochs = 8, 8, 2
  config.num_threads, config.log_every_steps, config.early_stopping_from_epoch = 2, 0, 0
  config.noise_augmentation, config.zero_last_layer, config.optim.warmup_steps = 0.0, False, 0
  config.optim.lr_schedule = 'constant'  # a run of 1 epoch resumes into one of 2
  config.model.update(model)
  return config


def _net3_config():
  config = _tiny(default.get_config())
  config.model = {'name': 'apogee_net_3', 'model_dim': 2, 'dim_mults': (1, 2), 'kernel_size': 4,
                  'pool_size': 16, 'linear_depth': 1, 'linear_width': 8, 'dropout_rate': 0.0}
  return config


def _with_metadata(examples, seed):
  """Photometry rows that follow the labels (so the network can use them), some missing."""
  rng = np.random.default_rng(seed)
  out = []
  for e in examples:
    plx = 1.0 + 0.1 * (e['labels'][1] - 4700) / 700
    mags = 12.0 + 0.5 * (e['labels'][0] - 2.9) + rng.normal(0, 0.01, 6)
    values = np.concatenate([[plx], mags]).astype(np.float32)
    if rng.uniform() < 0.2:
      values[rng.integers(7)] = rng.choice([np.nan, 99.999])
    out.append({**e, 'metadata': values, 'metadata_err': np.full(7, 0.02, np.float32)})
  return out


@pytest.fixture(scope='module')
def sources():
  return {'train': fake_source(32, 0), 'dev': fake_source(12, 1)}


def test_resume_refuses_a_change_of_every_config_model_field(tmp_path):
  """Each field of config.model, changed alone, is refused on resume, by name: the whole
  sub-config defines the run (a field left out of it would resume silently)."""
  for config in (default.get_config(), net2.get_config()):
    saved = {'config': json.loads(config.to_json_best_effort())}
    resume.check_same_run(saved, config.to_dict(), tmp_path)  # the same run resumes
    for field, value in config.model.items():
      changed = config.to_dict()
      if isinstance(value, str):
        changed['model'][field] = value + '_other'
      elif isinstance(value, tuple | list):
        changed['model'][field] = (*value, 1) if value else (1.0,)
      else:
        changed['model'][field] = value + 1
      with pytest.raises(training.ResumeMismatchError, match=rf'model\.{field}:'):
        resume.check_same_run(saved, changed, tmp_path)
  # Execution fields still resume.
  config = default.get_config()
  saved = {'config': json.loads(config.to_json_best_effort())}
  config.num_threads, config.max_epochs = 1, 99
  resume.check_same_run(saved, config.to_dict(), tmp_path)


def test_an_unknown_family_or_argument_is_one_clear_error(sources, tmp_path):
  config = _tiny(default.get_config(), name='apogee_net_9')
  with pytest.raises(TrainingError, match="unknown model family 'apogee_net_9'"):
    training.train_and_evaluate(config, str(tmp_path / 'a'), sources=sources)
  config = _tiny(default.get_config(), chanels=(4, 4))
  with pytest.raises(TrainingError, match='chanels not arguments of family'):
    training.train_and_evaluate(config, str(tmp_path / 'b'), sources=sources)


def test_net2_trains_on_photometry_fits_its_statistics_and_predicts_teff_in_k(sources, tmp_path):
  config = _tiny(net2.get_config(), channels=(4, 4), hidden=(16,))
  with_photometry = {k: _with_metadata(v, i) for i, (k, v) in enumerate(sources.items())}
  state = training.train_and_evaluate(config, str(tmp_path / 'run'), sources=with_photometry)
  params, meta = checkpoint.load_params(str(tmp_path / 'run' / 'checkpoints'))
  assert meta['model']['name'] == 'apogee_net_2'
  assert meta['normalization']['log10_labels'] == ['TEFF']
  # The metadata statistics were fitted on the training split: finite, the fill beyond the data.
  train_values = np.stack([e['metadata'] for e in with_photometry['train']])
  good = np.isfinite(train_values) & (train_values < 98)
  fill = np.asarray(meta['model']['metadata_fill'])
  assert fill[0] == np.min(train_values[good[:, 0], 0])
  assert np.all(fill[1:] == [np.max(train_values[good[:, j], j]) for j in range(1, 7)])
  assert np.all(np.asarray(meta['model']['metadata_std']) > 0)
  # The standardiser is in log10 Teff; the predictions come back in K.
  std = checkpoint.standardizer_from_meta(meta)
  teff = np.array([e['labels'][1] for e in with_photometry['train']], np.float64)
  assert std.mean[1] == pytest.approx(np.mean(np.log10(teff)), rel=1e-6)
  model = checkpoint.model_from_meta(meta)
  from apogeenet_jax import input_pipeline
  out = prediction.predict_batches(
      params, model, std, input_pipeline.eval_batches(with_photometry['dev'], 4),
      prediction.MCSettings(mc=4), ensemble_size=checkpoint.ensemble_size(meta))
  assert meta['ensemble_size'] == 2  # the shipped recipe: a deep ensemble of 2
  assert np.all((out['pred'][:, 1] > 2000) & (out['pred'][:, 1] < 10000))
  z = np.asarray(out['pred_z'])[:, 1]
  np.testing.assert_allclose(out['pred'][:, 1], 10 ** (z * std.std[1] + std.mean[1]), rtol=1e-9)
  assert int(state.epoch) == 2
  # Records without photometry are refused in one line, before any step.
  with pytest.raises(TrainingError, match='carry no metadata'):
    training.train_and_evaluate(config, str(tmp_path / 'none'), sources=sources)
  _net2_predicts_new_apstar_files_with_a_photometry_table(params, meta, tmp_path)


def test_net2_with_colours_fits_them_records_them_and_predicts_through_them(sources, tmp_path):
  """config.model.metadata_transform='colours' reaches the fit, the checkpoint and prediction."""
  config = _tiny(net2.get_config(), channels=(4, 4), hidden=(16,), metadata_transform='colours')
  config.max_epochs, config.ensemble_size = 1, 1  # one network: applied below as it is
  with_photometry = {k: _with_metadata(v, i) for i, (k, v) in enumerate(sources.items())}
  training.train_and_evaluate(config, str(tmp_path / 'run'), sources=with_photometry)
  params, meta = checkpoint.load_params(str(tmp_path / 'run' / 'checkpoints'))
  assert meta['model']['metadata_transform'] == 'colours'
  train_rows = np.stack([e['metadata'] for e in with_photometry['train']])
  from apogeenet_jax.models import apogee_net_2
  want = apogee_net_2.fit_metadata(
      apogee_net_2.APOGEENet2(metadata_fill=(), metadata_mean=(), metadata_std=(),
                              metadata_transform='colours'), {'metadata': train_rows})
  np.testing.assert_allclose(meta['model']['metadata_mean'], want.metadata_mean, rtol=1e-12)
  np.testing.assert_allclose(meta['model']['metadata_fill'], want.metadata_fill, rtol=1e-12)
  model = checkpoint.model_from_meta(meta)
  assert model.metadata_transform == 'colours'
  batch = {'flux': np.stack([e['flux'] for e in with_photometry['dev']]).astype(np.float32),
           'metadata': np.stack([e['metadata'] for e in with_photometry['dev']])}
  out = model.apply({'params': params}, **batch)
  as_magnitudes = model.clone(metadata_transform='magnitudes').apply({'params': params}, **batch)
  assert np.all(np.isfinite(out)) and not np.allclose(out, as_magnitudes)


def _net2_predicts_new_apstar_files_with_a_photometry_table(params, meta, tmp_path):
  """evaluate --apstar_dir with --metadata: a star without a row is kept, predicted with the
  replacement values, and flagged; the row's photometry changes the prediction."""
  import glob

  from astropy.table import Table

  from apogeenet_jax import evaluation, labels, synthetic
  catalogue = Table.read(synthetic.write_survey(tmp_path / 'new', num_stars=3, show_progress=False))
  files = sorted(glob.glob(str(tmp_path / 'new' / '**' / 'apStar-*.fits'), recursive=True))
  first = str(catalogue['APOGEE_ID'][0])
  table = Table({'APOGEE_ID': [first], 'PLX': [1.5], 'G': [12.0], 'H': [99.999]})
  table.write(tmp_path / 'phot.csv', format='ascii.csv')
  photometry = labels.read_photometry_table(tmp_path / 'phot.csv')
  out = {}
  for name, phot in (('with', photometry), ('without', {})):
    evaluation.evaluate(params=params, meta=meta, output_dir=str(tmp_path / name),
                        apstar_files=files, settings=prediction.MCSettings(mc=0),
                        make_figures=False, photometry=phot)
    out[name] = Table.read(tmp_path / name / 'catalog.fits')
  with_row = out['with']['APOGEE_ID'] == first
  assert list(out['with']['FLAG_NO_PHOTOMETRY']) == list(~with_row)
  assert all(out['without']['FLAG_NO_PHOTOMETRY'])
  teff = {k: np.asarray(t['TEFF_PRED'], np.float64) for k, t in out.items()}
  assert teff['with'][with_row][0] != teff['without'][with_row][0]
  np.testing.assert_array_equal(teff['with'][~with_row], teff['without'][~with_row])


def test_photometry_noise_draws_perturb_the_metadata_by_its_errors():
  """--photometry_noise: the draws move the metadata by its errors, not the missing values."""
  settings = uncertainty.MCSettings(mc=4, photometry_noise=True)
  batch = {'flux': np.ones((2, 5), np.float32), 'flux_err': np.ones((2, 5), np.float32),
           'metadata': np.array([[1.0, 99.999, np.nan, 12, 12, 12, 12]] * 2, np.float32),
           'metadata_err': np.array([[0.1, 0.1, 0.1, np.nan, -1, 0.05, 0.0]] * 2, np.float32)}
  scales = settings.noise_scale(batch, ('flux', 'metadata'))
  np.testing.assert_array_equal(scales['metadata'][0], np.float32([0.1, 0, 0, 0, 0, 0.05, 0]))
  assert set(uncertainty.MCSettings(mc=4).noise_scale(batch, ('flux', 'metadata'))) == {'flux'}


def test_net3_batch_norm_state_trains_resumes_exactly_and_predicts_with_running_averages(
    sources, tmp_path):
  config = _net3_config()
  full = training.train_and_evaluate(config, str(tmp_path / 'full'), sources=sources)
  assert set(full.model_state) == {'batch_stats'}
  init = models.create(config.model).init(
      jax.random.PRNGKey(0), **models.get('apogee_net_3').dummy_inputs(models.create(config.model)))
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(full.model_state['batch_stats']),
                                               jax.tree.leaves(init['batch_stats']), strict=True)]
  assert max(moved) > 1e-3  # the running statistics were updated by training
  short = _net3_config()
  short.max_epochs = 1
  training.train_and_evaluate(short, str(tmp_path / 'split'), sources=sources)
  resumed = training.train_and_evaluate(config, str(tmp_path / 'split'), sources=sources)
  _assert_trees_equal(resumed.params, full.params)
  _assert_trees_equal(resumed.model_state, full.model_state)
  # The checkpoint holds the statistics; prediction uses them (eval mode: a star's prediction
  # does not depend on the others in its batch).
  variables, meta = checkpoint.load_params(str(tmp_path / 'full' / 'checkpoints'))
  assert set(variables) == {'params', 'batch_stats'}
  apply = uncertainty.model_apply_fn(checkpoint.model_from_meta(meta))
  flux = np.stack([e['flux'] for e in sources['dev']])
  together = np.asarray(apply(variables, {'flux': flux}))
  alone = np.asarray(apply(variables, {'flux': flux[:1]}))
  np.testing.assert_allclose(alone[0], together[0], rtol=1e-5, atol=1e-6)
  assert np.ptp(together, axis=0).min() > 1e-4


def test_net3_ensemble_members_keep_their_own_batch_statistics(sources, tmp_path):
  config = _net3_config()
  config.ensemble_size, config.max_epochs = 2, 1
  state = training.train_and_evaluate(config, str(tmp_path / 'run'), sources=sources)
  for leaf in jax.tree.leaves(state.model_state):
    assert leaf.shape[0] == 2 and np.abs(leaf[0] - leaf[1]).max() > 0
  variables, meta = checkpoint.load_params(str(tmp_path / 'run' / 'checkpoints'))
  assert meta['ensemble_size'] == 2 and set(variables) == {'params', 'batch_stats'}


def test_table2_mse_of_a_log_teff_family_is_taken_in_its_label_space():
  """The catalogue holds Teff in K; Table 2's standardised MSE of a log10-Teff network is that
  of its own targets (μ, σ of log10 Teff), not K divided by a σ of dex."""
  from apogeenet_jax import metrics
  from apogeenet_jax.normalization import LabelSpace, Standardizer
  labels = np.array([[4.0, 5000.0, 0.0], [2.5, 4500.0, -0.3]])
  pred = np.array([[4.1, 5100.0, 0.05], [2.4, 4400.0, -0.2]])
  std = Standardizer(mean=np.array([3.0, 3.7, -0.2]), std=np.array([1.0, 0.1, 0.3]),
                     space=LabelSpace(log10=('TEFF',)))
  got = metrics.compute_metrics(pred, labels, np.zeros(2, int), std)['Full']['mse_standardised']
  want = np.mean(np.square(std.transform(pred).astype(np.float64) - std.transform(labels)))
  assert got == pytest.approx(want, rel=1e-5)
  assert got < 1  # K over a σ of dex would give ~1e6
