"""Tests of apogeenet_jax.optimizer: every field of ``config.optim`` reaches the compiled step.

The compiled train steps are cached (``steps.compiled_train_steps``) and rebuild their optimiser
from the cache key alone, while the initial optimiser state comes from the config. A field that
the key leaves out would silently take another value inside the jitted step: these tests change
each field in turn and check that the step's optimiser is the config's own, and a different one.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apogeenet_jax import optimizer, sharding, steps
from configs import default

# A change of each optimiser setting that alters the updates: field → (the other fields it needs
# to matter, its new value). The base is configs/default.py (Adam, 1e-3, warm-up 50, clip 1.0,
# 'sqrt' scaling at reference batch 128) at a global batch of 256, with a constant rate after the
# warm-up (the default's cosine needs the run's length, which train_and_evaluate resolves). A new field of config.optim
# fails test_every_optimizer_field_reaches_the_compiled_step until it has its entry here.
_COSINE = {'lr_schedule': 'cosine', 'decay_steps': 4, 'warmup_steps': 0}
_CHANGES = {
    'optimizer': ({}, 'sgd'),
    'learning_rate': ({}, 2e-3),
    'momentum': ({'optimizer': 'sgd'}, 0.9),
    'weight_decay': ({'optimizer': 'adamw'}, 0.1),
    'lr_schedule': ({'decay_steps': 4, 'warmup_steps': 0}, 'cosine'),
    'warmup_steps': ({}, 2),
    'decay_steps': (_COSINE, 8),
    'lr_final_fraction': (_COSINE, 0.5),
    'grad_clip_norm': ({'optimizer': 'sgd'}, 0.01),  # Adam would not see a constant rescale
    'lr_batch_scaling': ({}, 'linear'),
    'lr_reference_batch': ({}, 64),
}


def _config(**optim):
  config = default.get_config()
  config.batch_size = 256
  config.optim.lr_schedule = 'constant'
  config.optim.update(optim)
  return config


def _params_after(tx: optax.GradientTransformation) -> np.ndarray:
  """Parameters after 3 updates of ``tx`` on fixed gradients (global norm > 1)."""
  params = {'w': jnp.array([1.0, -2.0, 3.0])}
  state = tx.init(params)
  for t in range(3):
    grads = {'w': params['w'] * (t + 1.5)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params['w'])


@pytest.fixture
def step_optimizers(monkeypatch):
  """config → the optimiser that ``steps.compiled_train_steps`` builds its step from."""
  monkeypatch.setattr(steps, 'make_train_steps', lambda model, tx, mesh, **kw: tx)
  steps.compiled_train_steps.cache_clear()
  mesh = sharding.make_mesh(1)
  yield lambda config: steps.compiled_train_steps(None, optimizer.optimizer_key(config), mesh,
                                                  False)
  steps.compiled_train_steps.cache_clear()


@pytest.mark.parametrize('field', [*sorted(default.get_config().optim), 'batch_size'])
def test_every_optimizer_field_reaches_the_compiled_step(field, step_optimizers):
  if field == 'batch_size':  # not in config.optim, but the rate scales with it
    before, after = _config(), _config()
    after.batch_size = 512
  else:
    needs, value = _CHANGES[field]
    before, after = _config(**needs), _config(**needs)
    after.optim[field] = value
  in_step = _params_after(step_optimizers(after))
  # The compiled step's optimiser is the config's own (what the initial state is built from) ...
  np.testing.assert_array_equal(
      in_step, _params_after(optimizer.create_optimizer(after.optim, after.batch_size)))
  # ... and not the one compiled before the change.
  assert not np.array_equal(in_step, _params_after(step_optimizers(before)))
  assert optimizer.optimizer_key(after) != optimizer.optimizer_key(before)


def test_every_change_is_of_a_field():
  assert set(_CHANGES) == set(default.get_config().optim)
