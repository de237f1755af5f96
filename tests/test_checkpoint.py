"""Orbax checkpoints carry params plus the meta needed to predict."""

import logging
import os
import shutil
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apogeenet_jax import checkpoint
from apogeenet_jax.models.apogee_net import APOGEENet
from apogeenet_jax.normalization import PAPER_STANDARDIZER


@flax.struct.dataclass
class _State:
  params: dict
  opt_state: optax.OptState
  step: jnp.ndarray


def _state(seed):
  model = APOGEENet(channels=(4, 4), hidden=(8,), input_length=32)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 32)))['params']
  return model, _State(params, optax.sgd(1e-3, momentum=0.9).init(params), jnp.asarray(seed))


def test_best_and_latest_steps_and_full_restore(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path))
  states = {}
  for step, dev_loss in [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.6)]:
    model, states[step] = _state(step)
    checkpoint.save(manager, step, states[step], checkpoint.make_meta(model, PAPER_STANDARDIZER),
                    {'dev_loss': dev_loss})
  assert manager.best_step() == 2
  assert manager.latest_step() == 4
  assert 2 in manager.all_steps() and 4 in manager.all_steps()

  restored, meta = checkpoint.restore_state(manager, 4, states[4])
  assert isinstance(restored, _State)
  jax.tree.map(np.testing.assert_array_equal, restored, states[4])

  params, meta = checkpoint.load_params(str(tmp_path))
  assert meta['step'] == 2
  jax.tree.map(np.testing.assert_array_equal, params, states[2].params)
  assert checkpoint.model_from_meta(meta) == model
  std = checkpoint.standardizer_from_meta(meta)
  np.testing.assert_array_equal(std.std, PAPER_STANDARDIZER.std)


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='no such checkpoint'):
    checkpoint.load_params(str(tmp_path / 'nope'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint steps'):
    checkpoint.load_params(str(tmp_path / 'empty'))


def _truncate_data_files(step_dir):
  # The largest file holds the array chunks; tensorstore then raises a bare Exception.
  path = max(step_dir.glob('state/**/d/*'), key=lambda p: p.stat().st_size)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_metadata(step_dir):
  path = step_dir / 'state' / '_METADATA'
  path.write_bytes(path.read_bytes()[:40])


# Each of these gave a raw orbax/tensorstore error when resuming.
CORRUPTIONS = {
    'truncated OCDBT data file': _truncate_data_files,
    'deleted state item': lambda d: shutil.rmtree(d / 'state'),
    'truncated state/_METADATA': _truncate_metadata,
    'deleted meta/metadata': lambda d: (d / 'meta' / 'metadata').unlink(),
}


# tensorstore leaves the coroutines of a failed read behind; pytest reports them as
# unraisable when they are collected. The failure itself is what these tests assert.
_TENSORSTORE_LEFTOVERS = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')


def _three_steps(directory):
  manager = checkpoint.make_manager(str(directory), keep_latest=2)
  states = {}
  model, _ = _state(0)
  for step, dev_loss in [(1, 0.3), (2, 0.4), (3, 0.5)]:  # best = 1, latest two = 2, 3
    # Random, so incompressible: the chunk data file is large, as a real model's is.
    weights = np.random.default_rng(step).normal(size=100_000).astype(np.float32)
    states[step] = {'params': {'w': jnp.asarray(weights)}, 'step': jnp.asarray(step)}
    checkpoint.save(manager, step, states[step], checkpoint.make_meta(model, PAPER_STANDARDIZER),
                    {'dev_loss': dev_loss})
  assert sorted(manager.all_steps()) == [1, 2, 3]
  return manager, states


@_TENSORSTORE_LEFTOVERS
@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_corrupt_latest_step_falls_back_to_the_newest_good_one(tmp_path, corruption, caplog):
  manager, states = _three_steps(tmp_path / 'ckpt')
  CORRUPTIONS[corruption](tmp_path / 'ckpt' / '3')
  manager = checkpoint.make_manager(str(tmp_path / 'ckpt'), keep_latest=2)
  with caplog.at_level('WARNING'):
    step, restored, _ = checkpoint.restore_newest(manager, states[3])
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, restored, states[2])
  assert any('step 3' in r.getMessage() and 'skipped' in r.getMessage() for r in caplog.records)
  # Set aside, out of orbax's sight: the resumed run can save step 3 again.
  assert sorted(manager.all_steps()) == [1, 2]
  assert [p.name[:2] for p in (tmp_path / 'ckpt.corrupt').iterdir()] == ['3-']
  model, _ = _state(3)
  checkpoint.save(manager, 3, states[3], checkpoint.make_meta(model, PAPER_STANDARDIZER),
                  {'dev_loss': 0.5})
  assert 3 in manager.all_steps()


@_TENSORSTORE_LEFTOVERS
def test_no_step_restores_is_one_clear_error(tmp_path):
  manager, states = _three_steps(tmp_path / 'ckpt')
  for step in (1, 2, 3):
    _truncate_data_files(tmp_path / 'ckpt' / str(step))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'ckpt: no step restores \(.*ckpt/3: Exception.*new workdir'):
    checkpoint.restore_newest(manager, states[3])
  assert sorted(manager.all_steps()) == [1, 2, 3]  # Nothing moved when nothing restores.


@_TENSORSTORE_LEFTOVERS
@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_load_params_wraps_every_corruption(tmp_path, corruption):
  _three_steps(tmp_path / 'ckpt')
  CORRUPTIONS[corruption](tmp_path / 'ckpt' / '1')  # the best step, which evaluation loads
  with pytest.raises(checkpoint.CheckpointError, match=r'ckpt.*step 1 cannot be restored'):
    checkpoint.load_params(str(tmp_path / 'ckpt'))


def test_a_failed_save_is_one_clear_error_and_leaves_no_temp_folder(tmp_path, monkeypatch):
  # Disk full during a save gave a raw traceback and left orbax's temp folder behind.
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, 1, _state(0)[1], {'note': 'good'})

  def disk_full(step, *args, **kwargs):
    (tmp_path / f'{step}.orbax-checkpoint-tmp-1234').mkdir()
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(manager, 'save', disk_full)
  with pytest.raises(checkpoint.CheckpointError, match=r'step 2.*No space left.*resume'):
    checkpoint.save(manager, 2, _state(1)[1], {'note': 'new'})
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1']


def _log(logger_name, pathname, message):
  try:
    raise OSError(28, 'No space left on device')
  except OSError:
    record = logging.makeLogRecord({
        'name': logger_name, 'levelno': logging.ERROR, 'levelname': 'ERROR',
        'pathname': pathname, 'msg': message, 'exc_info': sys.exc_info()})
  logging.getLogger(logger_name).handle(record)


def test_a_failed_save_shows_none_of_orbaxs_thread_tracebacks(caplog):
  # A real disk-full save printed each orbax writer thread's traceback, asyncio's
  # 'exception was never retrieved' for the sibling writes, then the one FATAL line.
  future_py = f'{os.sep}venv{os.sep}orbax{os.sep}checkpoint{os.sep}_src{os.sep}future.py'
  tmp = '"W/checkpoints/36.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/d/c314"'
  with caplog.at_level(logging.INFO):
    _log('absl', future_py, f'_SignalingThread.run() raised: RESOURCE_EXHAUSTED writing {tmp}')
    _log('absl', future_py, '_SignalingThread.run() raised: [Errno 28] No space left on device')
    _log('asyncio', 'base_events.py', f'Future exception was never retrieved: {tmp}')
    _log('asyncio', 'base_events.py', "Future exception was never retrieved: OSError(28, "
         "'No space left on device')")
    assert caplog.records == []
    # Other errors still show: orbax's own, asyncio's, and a disk-full outside orbax.
    _log('absl', future_py, 'restore failed: bad metadata')
    _log('asyncio', 'base_events.py', 'Task exception was never retrieved: KeyError')
    _log('absl', 'train.py', 'cannot write metrics.jsonl: No space left on device')
  assert len(caplog.records) == 3


def test_closed_loop_callbacks_after_a_failed_save_are_dropped_and_others_kept():
  # ... and TensorStore's late completion callbacks printed 'Event loop is closed' tracebacks.
  seen = []
  hook = checkpoint._drop_closed_loop_callbacks(lambda u: seen.append(str(u.exc_value)))
  for message in ('Event loop is closed', 'something else'):
    hook(types.SimpleNamespace(exc_value=RuntimeError(message)))
  hook(types.SimpleNamespace(exc_value=ValueError('Event loop is closed')))
  assert seen == ['something else', 'Event loop is closed']


_LEGACY = os.path.join(os.path.dirname(__file__), 'fixtures', 'legacy_apogee_net')


def test_a_checkpoint_from_before_the_model_registry_predicts_bit_for_bit(tmp_path):
  """A checkpoint written by the code before the registry (no family name in its meta,
  flux_scaling a top-level config field; fixtures/legacy_apogee_net/make_fixture.py) loads as
  an APOGEE Net I and gives the predictions that code gave, to the last bit."""
  from test_training import fake_source

  from apogeenet_jax import models, uncertainty
  shutil.copytree(_LEGACY, tmp_path / 'legacy')
  params, meta = checkpoint.load_params(str(tmp_path / 'legacy' / 'checkpoints'))
  assert 'name' not in meta['model'] and meta['config']['flux_scaling'] == 'log_median'
  model = checkpoint.model_from_meta(meta)
  assert models.family_of(model).name == 'apogee_net'
  assert model.flux_scaling == 'log_median' and model.channels == (2, 2)
  want = np.load(os.path.join(_LEGACY, 'predictions.npy'))
  assert np.ptp(want, axis=0).min() > 0.1  # the outputs differ between spectra
  flux = np.stack([e['flux'] for e in fake_source(12, 1)])
  got = np.asarray(uncertainty.model_apply_fn(model)(params, {'flux': flux}))
  np.testing.assert_array_equal(got, want)


def test_a_run_from_before_the_model_registry_resumes_with_its_model_fields_in_config_model(
    tmp_path):
  """Its top-level flux_scaling / input_scale / dropout_rate are read as config.model's: the
  same run resumes, another flux_scaling is refused by name."""
  from apogeenet_jax import resume
  from configs import default
  shutil.copytree(_LEGACY, tmp_path / 'legacy')
  _, meta = checkpoint.load_params(str(tmp_path / 'legacy' / 'checkpoints'))
  config = default.get_config()
  for key, value in meta['config'].items():
    if key not in ('model', 'optim', 'flux_scaling', 'input_scale', 'dropout_rate'):
      setattr(config, key, value)
  config.optim.update(meta['config']['optim'])
  config.model.channels, config.model.hidden = (2, 2), (4,)
  resume.check_same_run(meta, config.to_dict(), tmp_path)
  config.model.flux_scaling = 'median'
  with pytest.raises(resume.ResumeMismatchError, match=r"model\.flux_scaling: 'log_median'"):
    resume.check_same_run(meta, config.to_dict(), tmp_path)
