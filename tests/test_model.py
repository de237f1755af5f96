"""The Flax APOGEE Net mirrors paper Appendix B: parameter count, layer shapes, output shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apogeenet_jax.model import APOGEENet

PAPER_PARAM_COUNT = 4_655_275


@pytest.fixture(scope='module')
def params():
  return jax.jit(APOGEENet().init)(jax.random.key(0), jnp.zeros((1, 8575)))['params']


def test_parameter_count(params):
  assert sum(x.size for x in jax.tree.leaves(params)) == PAPER_PARAM_COUNT


def test_layer_shapes(params):
  channels = (8, 8, 16, 16, 16, 16, 32, 32, 32, 32, 64, 64)
  c_in = 1
  for i, c_out in enumerate(channels, start=1):
    assert params[f'conv{i}']['kernel'].shape == (3, c_in, c_out)
    assert params[f'conv{i}']['bias'].shape == (c_out,)
    c_in = c_out
  assert params['fc1']['kernel'].shape == (64 * 133, 512)
  assert params['fc2']['kernel'].shape == (512, 512)
  assert params['fc3']['kernel'].shape == (512, 3)
  assert set(params) == {f'conv{i}' for i in range(1, 13)} | {'fc1', 'fc2', 'fc3'}


def test_accepts_2d_and_3d_flux_and_rejects_wrong_length(params):
  model = APOGEENet()
  flux = jax.random.normal(jax.random.key(1), (4, 8575)) * 100 + 500
  y2 = model.apply({'params': params}, flux)
  y3 = model.apply({'params': params}, flux[..., None])
  assert y2.shape == (4, 3)
  np.testing.assert_array_equal(np.asarray(y2), np.asarray(y3))
  with pytest.raises(ValueError, match='8575'):
    model.apply({'params': params}, jnp.zeros((2, 8000)))


def test_dropout_only_in_training(params):
  model = APOGEENet(dropout_rate=0.5)
  flux = jax.random.normal(jax.random.key(1), (4, 8575)) * 100 + 500
  a = model.apply({'params': params}, flux, train=False)
  b = model.apply({'params': params}, flux, train=False)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = model.apply({'params': params}, flux, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_constructor_arguments_change_the_network():
  small = APOGEENet(channels=(4, 4), hidden=(16,), input_length=64, dropout_rate=0.0)
  p = small.init(jax.random.key(0), jnp.zeros((1, 64)))['params']
  assert p['fc1']['kernel'].shape == (4 * 32, 16)
  assert p['fc2']['kernel'].shape == (16, 3)
