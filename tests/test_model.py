"""The Flax APOGEE Net mirrors paper Appendix B: parameter count, layer shapes, output shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apogeenet_jax.models.apogee_net import APOGEENet

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


def _spectra(n=6, seed=0):
  """Spectra with lines, levels 20 to 20,000 and bad pixels (exactly 0), like apStar flux."""
  rng = np.random.default_rng(seed)
  shape = 1 + 0.3 * np.sin(np.arange(8575) / rng.uniform(5, 50, (n, 1)))
  flux = 10 ** rng.uniform(1.3, 4.3, (n, 1)) * shape
  flux[:, :200] = 0
  return flux.astype(np.float32)


@pytest.mark.parametrize('scaling', ['median', 'log_median'])
def test_per_spectrum_scaling_makes_the_network_blind_to_the_flux_level(scaling):
  """A spectrum ×1000 gives the same output under a per-spectrum scaling, not under raw flux
  (the first layer's weights are scaled up so that raw-flux outputs differ between spectra)."""
  flux = _spectra()
  outputs = {}
  for s in ('none', scaling):
    model = APOGEENet(channels=(4, 4), hidden=(16,), flux_scaling=s)
    p = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8575)))['params']
    p = {**p, 'conv1': jax.tree.map(lambda x: 30 * x, p['conv1'])}
    out, out_bright = (np.asarray(model.apply({'params': p}, f)) for f in (flux, flux * 1000))
    assert np.ptp(out, axis=0).min() > 1e-3  # outputs differ between spectra
    outputs[s] = (out, out_bright)
  np.testing.assert_allclose(*outputs[scaling], rtol=1e-5, atol=1e-6)
  assert not np.allclose(*outputs['none'], rtol=1e-2)


def test_median_scaling_divides_by_the_good_pixels_median():
  from apogeenet_jax.models.layers import scale_flux
  flux = _spectra()
  scaled = np.asarray(scale_flux(jnp.asarray(flux), 'median'))
  np.testing.assert_allclose(np.median(scaled[:, 200:], axis=1), 1.0, rtol=1e-6)
  assert np.all(scaled[:, :200] == 0)  # bad pixels stay 0, and do not pull the median down
  np.testing.assert_array_equal(np.asarray(scale_flux(jnp.asarray(flux), 'none')), flux)


@pytest.mark.parametrize('dtype', [np.float32, np.float16])
def test_the_good_pixel_median_is_nanmedians_bit_for_bit_with_its_derivative(dtype):
  """The sort-free median (bisection on the bit patterns) against jnp.nanmedian of the positive
  pixels: values, forward and reverse derivatives, with ties, odd and even counts, rows with one
  or no good pixel."""
  from apogeenet_jax.models.layers import good_pixel_median

  def reference(f):
    return jnp.nanmedian(jnp.where(f > 0, f, jnp.nan), axis=1)

  def checked(fn):  # value, forward derivative along t, gradient of the rows with a good pixel
    return jax.jit(lambda f, t: (*jax.jvp(fn, (f,), (t,)),
                                 jax.grad(lambda x: fn(x)[1:].sum())(f)))

  rng = np.random.default_rng(0)
  for trial, length in enumerate((1, 2, 9, 9, 16, 16)):  # odd and even counts
    f = rng.normal(1, 1, (8, length)).astype(dtype)
    if trial % 2:
      f = np.round(f, 1).astype(dtype)  # ties at the middle ranks
    f[0], f[1] = 0, -1  # no good pixel
    f[1, 0] = 3  # one good pixel
    flux, tangent = jnp.asarray(f), jnp.asarray(rng.normal(size=f.shape).astype(dtype))
    (value, deriv, grad), (value_ref, deriv_ref, grad_ref) = (
        checked(fn)(flux, tangent) for fn in (good_pixel_median, reference))
    np.testing.assert_array_equal(np.asarray(value), np.asarray(value_ref))
    np.testing.assert_array_equal(np.asarray(deriv)[1:], np.asarray(deriv_ref)[1:])
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad_ref))
