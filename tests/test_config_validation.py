"""Every config field with a domain is checked once, before anything is built or written."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from apogeenet_jax import config_validation, training
from configs import test as test_config

CONFIGS = ('default', 'paper', 'test', 'demo', 'adapt', 'yso', 'net2', 'net3', 'net3_small')


def _bad_values(domain: str) -> list:
  """Values outside ``domain`` (the words of config_validation.FIELDS)."""
  if domain.startswith('an integer >= '):
    low = int(domain.split('>= ')[1].split()[0])
    return [low - 1, 1.5, 'abc', True]
  if domain.startswith(('a finite number', 'a number in')):
    return [float('nan'), float('inf'), -1.0, 'abc']
  if domain.startswith("'"):
    return ['bogus', 3]
  if domain.startswith('a non-empty list'):
    return [(), (0, 4), 'abc']
  if domain.startswith('3 finite numbers'):
    return ['abc', ('abc',), (1.0, 1.0, -1.0), (1.0, float('nan'), 1.0), (1.0, 1.0),
            (1.0, 1.0, 1.0, 1.0), (0, 0, 0)]
  if domain == 'True or False':
    return ['yes', 1]
  if domain in ('a path (text)', 'a non-empty name'):
    return [3]
  raise AssertionError(f'no bad values for the domain {domain!r}: add them to this test')


@pytest.mark.parametrize('name', CONFIGS)
def test_every_shipped_config_is_valid(name):
  assert config_validation.problems(importlib.import_module(f'configs.{name}').get_config()) == []


def test_every_field_refuses_values_outside_its_domain():
  config = importlib.import_module('configs.default').get_config()
  assert config_validation.problems(config) == []
  for field, (domain, _) in config_validation.FIELDS.items():
    for bad in _bad_values(domain):
      broken = config.to_dict()  # A plain dict: ConfigDict would refuse some types itself.
      parent, _, leaf = field.rpartition('.')
      (broken[parent] if parent else broken)[leaf] = bad
      found = config_validation.problems(broken)
      assert len(found) == 1 and found[0].startswith(f'{field} must be'), (field, bad, found)


def test_model_fields_are_checked_under_config_model_too():
  config = test_config.get_config()
  with config.unlocked():
    config.model.flux_scaling = 'bogus'
    config.model.dropout_rate = 1.0
    config.model.input_scale = -1.0
  found = config_validation.problems(config)
  assert [f.split()[0] for f in found] == ['model.dropout_rate', 'model.flux_scaling',
                                           'model.input_scale']


@pytest.mark.parametrize('field,value', [('loss_weights', (1.0, 1.0, -1.0)),
                                         ('loss_weights', (0.0, 0.0, 0.0)),
                                         ('patience', 0), ('patience', -1),
                                         ('model.flux_scaling', 'bogus')])
def test_training_refuses_a_bad_config_before_it_writes_anything(tmp_path, field, value):
  config = test_config.get_config()
  with config.unlocked():
    parent, _, leaf = field.rpartition('.')
    (config[parent] if parent else config)[leaf] = value
  workdir = tmp_path / 'run'
  with pytest.raises(config_validation.ConfigError, match=rf'{field} must be'):
    training.train_and_evaluate(config, workdir, sources={'train': [], 'dev': []})
  assert not workdir.exists()


def test_train_py_bad_overrides_are_one_line_and_write_nothing(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, 'PYTHONPATH': str(root), 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  cases = [('--config.noise_augmentaton=1', "no field 'noise_augmentaton' (did you mean "
            "'noise_augmentation'?)"),
           ('--config.model.flux_scaling=bogus', "flux_scaling must be 'none', 'median'"),
           ('--config.flux_scaling=median', "no field 'flux_scaling'"),  # moved to config.model
           ('--config.patience=0', 'patience must be an integer >= 1')]
  procs = [subprocess.Popen([sys.executable, str(root / 'train.py'),
                             f'--config={root}/configs/test.py', f'--workdir={tmp_path}/w{k}',
                             flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env) for k, (flag, _) in enumerate(cases)]
  for k, (proc, (flag, message)) in enumerate(zip(procs, cases, strict=True)):
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode != 0 and 'Traceback' not in err, (flag, err[-1000:])
    assert lines[-1].startswith('FATAL') and message in lines[-1], (flag, lines[-3:])
    assert sum(line.startswith('FATAL') for line in lines) == 1, (flag, lines)
    assert not (tmp_path / f'w{k}').exists(), flag
