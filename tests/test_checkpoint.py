"""Orbax checkpoints carry params plus the meta needed to predict."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apogeenet_jax import checkpoint
from apogeenet_jax.model import APOGEENet
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
