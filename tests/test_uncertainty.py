"""Monte Carlo uncertainties (uncertainty.py): error preparation and the jitted MC."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apogeenet_jax import apstar, uncertainty
from apogeenet_jax.models.apogee_net import APOGEENet
from apogeenet_jax.preprocessing import BAD_PIXEL_ERROR, preprocess_error, preprocess_flux

N_PIX = 8575


@pytest.fixture(scope='module')
def tiny():
  """A small APOGEENet whose outputs depend on the spectrum (raw fluxes ~100s drive them)."""
  model = APOGEENet(channels=(4, 4), hidden=(16,))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, N_PIX)))['params']
  return model, params, uncertainty.model_apply_fn(model)


def _spectra(n, seed=0):
  rng = np.random.default_rng(seed)
  flux = rng.normal(300.0, 40.0, (n, N_PIX)).astype(np.float32)
  err = rng.uniform(2.0, 8.0, (n, N_PIX)).astype(np.float32)
  return flux, err


def _mc(apply_fn, params, flux, scale, *, n=20, chunk=7, seed=0, index=None, first=True):
  fn = uncertainty.make_mc_fn(apply_fn, num_draws=n, draw_chunk=chunk, noiseless_first=first)
  index = np.arange(len(flux), dtype=np.uint32) if index is None else index
  mean, std = fn(params, {'flux': flux}, {'flux': scale}, index, jax.random.PRNGKey(seed))
  return np.asarray(mean), np.asarray(std)


def test_prepare_errors_median_mode_caps_at_five_medians_and_silences_bad_pixels():
  err = np.full(N_PIX, 2.0, np.float32)
  err[:100] = BAD_PIXEL_ERROR
  err[100:110] = 50.0  # above 5 × median = 10
  err[110:120] = 9.0  # below
  out = uncertainty.prepare_errors(err, 'median')
  np.testing.assert_array_equal(out[:100], 0.0)
  np.testing.assert_array_equal(out[100:110], 10.0)
  np.testing.assert_array_equal(out[110:120], 9.0)
  np.testing.assert_array_equal(out[120:], 2.0)


def test_prepare_errors_mean_mode_uses_mean_of_good_pixels():
  err = np.full(N_PIX, 1.0, np.float64)
  err[:500] = BAD_PIXEL_ERROR
  err[500] = 1e6  # one huge finite error dominates the good-pixel mean
  good_mean = err[500:].mean()
  out = uncertainty.prepare_errors(err, 'mean')
  assert out[500] == pytest.approx(5 * good_mean, rel=1e-6)
  np.testing.assert_array_equal(out[:500], 0.0)
  np.testing.assert_array_equal(out[501:], 1.0)
  with pytest.raises(uncertainty.UncertaintyError, match='cap mode'):
    uncertainty.prepare_errors(err, 'max')


def test_vmapped_mc_equals_python_loop_over_the_same_keys(tiny):
  model, params, apply_fn = tiny
  flux, err = _spectra(3)
  scale = uncertainty.prepare_errors(err, 'median')
  n = 9
  mean, std = _mc(apply_fn, params, flux, scale, n=n, chunk=4, seed=3)
  key = jax.random.PRNGKey(3)
  for i in range(len(flux)):
    preds = []
    for d in range(n):
      eps = np.asarray(jax.random.normal(uncertainty.draw_key(key, i, d), (N_PIX,)))
      x = flux[i] + (eps * scale[i] if d > 0 else 0.0)
      preds.append(np.asarray(model.apply({'params': params}, x[None], train=False))[0])
    preds = np.asarray(preds, np.float64)
    np.testing.assert_allclose(mean[i], preds.mean(0), rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(std[i], preds.std(0), rtol=2e-3, atol=1e-4)
  assert np.all(std > 0)


def test_result_does_not_depend_on_batch_or_chunking(tiny):
  _, params, apply_fn = tiny
  flux, err = _spectra(4, seed=1)
  scale = uncertainty.prepare_errors(err)
  mean_a, std_a = _mc(apply_fn, params, flux, scale, n=10, chunk=3)
  # Star 2 alone, with its global index, in a batch padded by a copy, other chunking.
  one = np.stack([flux[2], flux[2]])
  mean_b, std_b = _mc(apply_fn, params, one, np.stack([scale[2]] * 2), n=10, chunk=10,
                      index=np.array([2, 99], np.uint32))
  np.testing.assert_allclose(mean_b[0], mean_a[2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(std_b[0], std_a[2], rtol=1e-4, atol=1e-5)


def test_fixed_seed_reproducible_other_seed_differs(tiny):
  _, params, apply_fn = tiny
  flux, err = _spectra(2, seed=2)
  scale = uncertainty.prepare_errors(err)
  a = _mc(apply_fn, params, flux, scale, n=100, chunk=25, seed=0)
  b = _mc(apply_fn, params, flux, scale, n=100, chunk=25, seed=0)
  c = _mc(apply_fn, params, flux, scale, n=100, chunk=25, seed=1)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.allclose(a[1], c[1])


def test_sigma_zero_without_errors_and_grows_with_them(tiny):
  _, params, apply_fn = tiny
  flux, err = _spectra(2, seed=4)
  for mode in uncertainty.ERROR_CAP_MODES:
    zero = uncertainty.prepare_errors(np.zeros_like(err), mode)
    _mean0, std0 = _mc(apply_fn, params, flux, zero, n=8, first=mode == 'median')
    np.testing.assert_array_equal(std0, 0.0)
    small = _mc(apply_fn, params, flux, uncertainty.prepare_errors(err, mode), n=30)[1]
    large = _mc(apply_fn, params, flux, uncertainty.prepare_errors(10 * err, mode), n=30)[1]
    assert np.all(large > 3 * small), (mode, small, large)


def test_draw_zero_is_noiseless_in_median_mode(tiny):
  model, params, apply_fn = tiny
  flux, err = _spectra(2, seed=5)
  noiseless = np.asarray(model.apply({'params': params}, flux, train=False))
  mean, std = _mc(apply_fn, params, flux, uncertainty.prepare_errors(err), n=1, first=True)
  np.testing.assert_allclose(mean, noiseless, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(std, 0.0)
  mean_noisy, _ = _mc(apply_fn, params, flux, uncertainty.prepare_errors(err), n=1, first=False)
  assert not np.allclose(mean_noisy, noiseless, rtol=1e-6, atol=1e-6)


def test_predict_fn_is_noiseless_with_nan_sigma(tiny):
  model, params, apply_fn = tiny
  flux, _ = _spectra(2, seed=6)
  mean, std = uncertainty.make_predict_fn(apply_fn)(params, {'flux': flux}, None, None, None)
  np.testing.assert_allclose(mean, model.apply({'params': params}, flux, train=False), rtol=1e-6)
  assert np.all(np.isnan(std))
  with pytest.raises(uncertainty.UncertaintyError):
    uncertainty.make_mc_fn(apply_fn, num_draws=0)


def _real(path):
  s = apstar.read_apstar(path)
  return preprocess_flux(s.flux), preprocess_error(s.flux_err)


def test_real_spectra_give_finite_positive_sigma(tiny, real_apstar_files):
  _, params, apply_fn = tiny
  flux, err = map(np.stack, zip(*[_real(p) for p in real_apstar_files], strict=True))
  for mode in uncertainty.ERROR_CAP_MODES:
    scale = uncertainty.prepare_errors(err, mode)
    assert np.all(scale[err >= BAD_PIXEL_ERROR] == 0)  # chip gaps and ends get no noise
    mean, std = _mc(apply_fn, params, flux, scale, n=12, chunk=6, first=mode == 'median')
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(std)), mode
    assert np.all(std > 0), mode


def test_cap_modes_differ_where_real_errors_have_huge_outliers(tiny, real_apstar_files):
  """On a real file whose good-pixel mean error ≫ median, only the median cap tames the outliers."""
  _, params, apply_fn = tiny
  chosen = None
  for path in real_apstar_files:
    flux, err = _real(path)
    good = err[err < BAD_PIXEL_ERROR]
    if good.mean() > 20 * np.median(err):
      chosen = (path, flux, err)
      break
  if chosen is None:
    pytest.skip('no real file with mean error ≫ median error')
  _, flux, err = chosen
  med = uncertainty.prepare_errors(err, 'median')
  mean = uncertainty.prepare_errors(err, 'mean')
  capped_by_median = med < np.where(err < BAD_PIXEL_ERROR, err, 0)
  capped_by_mean = mean < np.where(err < BAD_PIXEL_ERROR, err, 0)
  assert capped_by_median.sum() > capped_by_mean.sum() >= 0
  assert med.max() < mean.max() / 10  # the mean cap leaves the huge errors almost untouched
  std_med = _mc(apply_fn, params, flux[None], med[None], n=30, first=True)[1]
  std_mean = _mc(apply_fn, params, flux[None], mean[None], n=30, first=False)[1]
  assert np.all(std_mean > std_med)


def test_ensemble_map_and_vmap_agree_and_share_the_draws(tiny):
  model, params, apply_fn = tiny
  other = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, N_PIX)))['params']
  stacked = jax.tree.map(lambda *x: jnp.stack(x), params, other)
  flux, err = _spectra(3)
  scale = uncertainty.prepare_errors(err)
  mc = uncertainty.make_mc_fn(apply_fn, num_draws=5, draw_chunk=2)
  args = ({'flux': flux}, {'flux': scale}, np.arange(3, dtype=np.uint32), jax.random.PRNGKey(4))
  mapped = [np.asarray(x) for x in uncertainty.make_ensemble_fn(mc)(stacked, *args)]
  vmapped = [np.asarray(x) for x in uncertainty.make_ensemble_fn(mc, vectorize=True)(stacked,
                                                                                     *args)]
  for a, b in zip(mapped, vmapped, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Two copies of one network: no model spread, and the draws of both copies are the same ones.
  twins = jax.tree.map(lambda x: jnp.stack([x, x]), params)
  mean, noise, spread = uncertainty.make_ensemble_fn(mc)(twins, *args)
  single_mean, single_std = mc(params, *args)
  np.testing.assert_array_equal(np.asarray(spread), 0.0)
  np.testing.assert_allclose(mean, single_mean, rtol=1e-6)
  np.testing.assert_allclose(noise, single_std, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# First-order propagation (make_linear_fn).


class _LinearNet(nn.Module):
  """APOGEENet's first layers with the ReLU and pooling removed: an affine map of the flux."""

  @nn.compact
  def __call__(self, flux, train=False):
    del train
    x = nn.Conv(3, kernel_size=(3,), padding=((1, 1),), name='conv')(flux[..., None])
    return nn.Dense(3, name='dense')(x.reshape(x.shape[0], -1))


def _linear_net(n_pix=N_PIX):
  model = _LinearNet()
  params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, n_pix)))['params']
  return params, uncertainty.model_apply_fn(model)


@pytest.fixture(scope='module')
def linear_net():
  return _linear_net()


def _analytic_jacobian(params):
  """∂f_k/∂x_i of _LinearNet in float64 from its weights, no autodiff: (n_pix, 3)."""
  kernel = np.asarray(params['conv']['kernel'], np.float64)[:, 0, :]  # (3 taps, C)
  n_chan = kernel.shape[1]
  dense = np.asarray(params['dense']['kernel'], np.float64).reshape(-1, n_chan, 3)  # (L, C, 3)
  n_pix = len(dense)
  jac = np.zeros((n_pix, 3))
  # Conv output l reads x[l + t - 1] through tap t, so pixel i reaches output l = i + 1 - t.
  for t in range(3):
    lo, hi = max(0, t - 1), min(n_pix, n_pix + t - 1)
    jac[lo:hi] += np.einsum('lck,c->lk', dense[lo + 1 - t:hi + 1 - t], kernel[t])
  return jac


def _linear(apply_fn, params, flux, scale, mode='vjp', **kwargs):
  fn = uncertainty.make_linear_fn(apply_fn, mode=mode, **kwargs)
  z, sigma = fn(params, {'flux': flux}, {'flux': scale}, np.arange(len(flux), dtype=np.uint32),
                jax.random.PRNGKey(0))
  return np.asarray(z), np.asarray(sigma)


def _apstar_like_errors(n, seed):
  """Errors with what prepare_errors must handle: bad pixels at 1e10 and outliers above the cap."""
  _, err = _spectra(n, seed=seed)
  err[:, :250] = BAD_PIXEL_ERROR
  err[:, 4000:4060] = BAD_PIXEL_ERROR
  err[:, 6000:6020] = 500.0
  return err


def test_linear_sigma_of_a_linear_network_is_the_analytic_sigma(linear_net):
  params, apply_fn = linear_net
  flux, _ = _spectra(3, seed=7)
  err = _apstar_like_errors(3, seed=7)
  jac = _analytic_jacobian(params)
  fns = {m: uncertainty.make_linear_fn(apply_fn, mode=m) for m in ('vjp', 'jacrev')}
  for cap in uncertainty.ERROR_CAP_MODES:
    scale = uncertainty.prepare_errors(err, cap)
    expected = np.sqrt(np.einsum('ik,bi->bk', jac ** 2, scale.astype(np.float64) ** 2))
    for mode, fn in fns.items():
      z, sigma = fn(params, {'flux': flux}, {'flux': scale}, None, None)
      np.testing.assert_allclose(sigma, expected, rtol=1e-5, err_msg=f'{cap} {mode}')
      np.testing.assert_allclose(z, apply_fn(params, {'flux': flux}), rtol=1e-6, atol=1e-6)


def test_forward_mode_gives_the_analytic_sigma_too():
  """'jvp' (one tangent per pixel) on short spectra; 600 pixels leave a ragged last chunk."""
  n_pix = 600
  params, apply_fn = _linear_net(n_pix)
  flux, err = (a[:, :n_pix] for a in _spectra(2, seed=10))
  err[:, :20] = BAD_PIXEL_ERROR
  scale = uncertainty.prepare_errors(err)
  expected = np.sqrt(np.einsum('ik,bi->bk', _analytic_jacobian(params) ** 2,
                               scale.astype(np.float64) ** 2))
  z, sigma = _linear(apply_fn, params, flux, scale, mode='jvp', pixel_chunk=128)
  np.testing.assert_allclose(sigma, expected, rtol=1e-5)
  np.testing.assert_allclose(z, apply_fn(params, {'flux': flux}), rtol=1e-6, atol=1e-6)


def test_mc_of_a_linear_network_agrees_with_linear_within_sampling_error(linear_net):
  params, apply_fn = linear_net
  flux, _ = _spectra(4, seed=8)
  scale = uncertainty.prepare_errors(_apstar_like_errors(4, seed=8))
  n = 400
  _, sigma_lin = _linear(apply_fn, params, flux, scale)
  _, sigma_mc = _mc(apply_fn, params, flux, scale, n=n, chunk=100, first=False)
  ratio = sigma_mc / sigma_lin
  # The sample σ of n Gaussian draws has relative standard error 1/√(2n) = 3.5% for n = 400;
  # the 4 stars draw independent noise, their 3 labels share it.
  se = 1 / np.sqrt(2 * n)
  assert np.all(np.abs(ratio - 1) < 4 * se), ratio
  assert abs(ratio.mean() - 1) < 3 * se / np.sqrt(len(flux)), ratio


def test_linear_is_batch_and_padding_independent(tiny):
  _, params, apply_fn = tiny
  flux, err = _spectra(4, seed=9)
  scale = uncertainty.prepare_errors(err)
  z_all, sigma_all = _linear(apply_fn, params, flux, scale)
  assert np.all(sigma_all > 0)
  for i in range(4):
    # Star i alone, padded with another star's copy: its pull-back must not pick up the other row.
    pair = np.stack([flux[i], flux[(i + 1) % 4]])
    z, sigma = _linear(apply_fn, params, pair, np.stack([scale[i], scale[(i + 1) % 4]]))
    np.testing.assert_allclose(sigma[0], sigma_all[i], rtol=1e-5)
    np.testing.assert_allclose(z[0], z_all[i], rtol=1e-5, atol=1e-6)
  _, sigma_rev = _linear(apply_fn, params, flux, scale, mode='jacrev')
  np.testing.assert_allclose(sigma_rev, sigma_all, rtol=1e-5)
  with pytest.raises(uncertainty.UncertaintyError, match='linear mode'):
    uncertainty.make_linear_fn(apply_fn, mode='jacfwd')


# The noise-averaged Jacobian (make_linear_fn num_draws >= 2).


def _statlin(apply_fn, params, flux, scale, index, num_draws, key=0):
  fn = uncertainty.make_linear_fn(apply_fn, num_draws=num_draws)
  z, sigma = fn(params, {'flux': flux}, {'flux': scale}, np.asarray(index, np.uint32),
                jax.random.PRNGKey(key))
  return np.asarray(z), np.asarray(sigma)


def test_noise_averaged_jacobian_of_a_linear_network_is_the_analytic_sigma(linear_net):
  params, apply_fn = linear_net
  flux, _ = _spectra(3, seed=7)
  scale = uncertainty.prepare_errors(_apstar_like_errors(3, seed=7))
  expected = np.sqrt(np.einsum('ik,bi->bk', _analytic_jacobian(params) ** 2,
                               scale.astype(np.float64) ** 2))
  z, sigma = _statlin(apply_fn, params, flux, scale, range(3), num_draws=3)
  np.testing.assert_allclose(sigma, expected, rtol=1e-4)
  np.testing.assert_allclose(z, apply_fn(params, {'flux': flux}), rtol=1e-6, atol=1e-6)


def test_noise_averaged_jacobian_is_unbiased_where_the_delta_method_is_not():
  """f = (Σ relu(x), Σ relu(−x), Σ x) per star under noise N(0, s²): E[∂f/∂x_i] = Φ(x_i/s_i),
  −Φ(−x_i/s_i), 1, so σ_k² = Σ_i s_i² E[J_ki]² exactly; J at x is a step (1[x_i > 0], …).

  With M = 2 draws the plain mean of the Jacobians would give Σ s²(E[J]² + Var J / 2), 5–15%
  too much here; the −v/M term removes that. Thousands of pixels average the per-pixel noise.
  """
  def apply_fn(params, inputs):
    del params
    x = inputs['flux']
    return jnp.stack([jax.nn.relu(x).sum(-1), jax.nn.relu(-x).sum(-1), x.sum(-1)], axis=-1)

  rng = np.random.default_rng(3)
  flux = rng.uniform(-1, 1, (2, 8575)).astype(np.float32)
  scale = rng.uniform(0.2, 0.8, (2, 8575)).astype(np.float32)
  s2 = scale.astype(np.float64) ** 2
  x_over_s = flux / scale.astype(np.float64)
  cdf = lambda v: np.asarray(jax.scipy.stats.norm.cdf(v), np.float64)  # noqa: E731
  expected = np.sqrt(np.stack([np.sum(s2 * cdf(x_over_s) ** 2, -1),
                               np.sum(s2 * cdf(-x_over_s) ** 2, -1), np.sum(s2, -1)], -1))
  _, sigma = _statlin(apply_fn, None, flux, scale, [0, 1], num_draws=2)
  np.testing.assert_allclose(sigma, expected, rtol=0.02)
  _, delta = _linear(apply_fn, None, flux, scale)
  assert np.all(delta[:, :2] / expected[:, :2] > 1.1)  # the step Jacobian over-estimates here


def test_noise_averaged_jacobian_is_batch_and_padding_independent(tiny):
  _, params, apply_fn = tiny
  flux, err = _spectra(4, seed=9)
  scale = uncertainty.prepare_errors(err)
  _, sigma_all = _statlin(apply_fn, params, flux, scale, range(4), num_draws=2)
  _, delta = _linear(apply_fn, params, flux, scale)
  assert np.all(sigma_all > 0) and not np.allclose(sigma_all, delta, rtol=1e-3)
  for i in range(4):
    j = (i + 1) % 4
    _, sigma = _statlin(apply_fn, params, flux[[i, j]], scale[[i, j]], [i, j], num_draws=2)
    np.testing.assert_allclose(sigma[0], sigma_all[i], rtol=1e-5)
  with pytest.raises(uncertainty.UncertaintyError, match='num_draws must be 0'):
    uncertainty.make_linear_fn(apply_fn, num_draws=1)
  with pytest.raises(uncertainty.UncertaintyError, match="needs mode 'vjp'"):
    uncertainty.make_linear_fn(apply_fn, mode='jacrev', num_draws=2)
