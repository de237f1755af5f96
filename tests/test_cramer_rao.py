"""apogeenet_jax.cramer_rao: the bound is the analytic one where that is known, and a
maximum-likelihood fit of the synthetic survey's spectra attains it.

float64 inside ``jax.enable_x64(True)`` only, so x64 never leaks into other tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apogeenet_jax import constants, cramer_rao, forward_model, photometry, synthetic


def test_inverse_variance_gives_bad_pixels_no_weight():
  flux = np.array([1.0, 2.0, 0.0, 3.0, 4.0, 5.0])
  err = np.array([0.5, 2.0, 1e10, 1e10, 1e9, 2e8])
  w = np.asarray(cramer_rao.inverse_variance(flux, err))
  np.testing.assert_allclose(w, [4.0, 0.25, 0.0, 0.0, 0.0, 1 / 4e16], rtol=1e-6)


def test_free_indices():
  assert cramer_rao.free_indices(()) == (0, 1, 2)
  assert cramer_rao.free_indices(('telluric', 'scale')) == (0, 1, 2, 3, 6)
  assert cramer_rao.free_indices() == tuple(range(len(forward_model.PARAM_NAMES)))
  with pytest.raises(ValueError, match='unknown nuisance'):
    cramer_rao.free_indices(('sky',))


def test_linear_toy_model_bound_is_analytic_with_the_nuisances_marginalised():
  """flux = A θ + noise, θ = 3 labels + 2 nuisances: σ_CRB = sqrt(diag((AᵀΣ⁻¹A)⁻¹)) over the good
  pixels, the nuisances marginalised (not fixed: that bound is smaller here), and the ML fit of
  many noise draws scatters exactly so."""
  rng = np.random.default_rng(0)
  n, p = 300, 5
  a = rng.normal(size=(n, p))
  a[:, 3] += 2.0 * a[:, 0]  # nuisances correlated with the labels: marginalising matters
  a[:, 4] += 1.5 * a[:, 1] - 1.5 * a[:, 2]
  sigma = rng.uniform(0.5, 2.0, n)
  theta = np.array([1.0, -2.0, 0.5, 3.0, 1.5])
  flux = a @ theta
  bad = rng.choice(n, 40, replace=False)  # apStar bad pixels: flux 0, error 1e10
  flux[bad[:30]], sigma[bad] = 0.0, constants.BAD_PIXEL_ERROR
  good = np.setdiff1d(np.arange(n), bad)
  ag, wg = a[good], 1 / sigma[good] ** 2
  expected = np.sqrt(np.diag(np.linalg.inv(ag.T @ (wg[:, None] * ag)))[:3])
  fixed = np.sqrt(np.diag(np.linalg.inv(ag[:, :3].T @ (wg[:, None] * ag[:, :3]))))
  assert (fixed < 0.8 * expected).all()  # so a bound that fixed the nuisances would fail below

  with jax.enable_x64(True):
    def model(t):
      return jnp.asarray(a) @ t

    w = cramer_rao.inverse_variance(jnp.asarray(flux), jnp.asarray(sigma))
    got = np.asarray(cramer_rao.crb_sigma(jnp.asarray(theta), w, tuple(range(p)), model))
    np.testing.assert_allclose(got, expected, rtol=1e-10)

    draws = 3000
    noisy = flux + rng.normal(size=(draws, n)) * np.where(np.isin(np.arange(n), bad), 0, sigma)
    noisy[:, bad[:30]] = 0.0
    fit = jax.jit(jax.vmap(lambda f: cramer_rao.levenberg_marquardt(
        jnp.asarray(theta) + 1.0, f, w, tuple(range(p)), num_steps=8, model_fn=model)[0]))
    est = np.asarray(fit(jnp.asarray(noisy)))
  scatter = np.sqrt(np.mean((est[:, :3] - theta[:3]) ** 2, 0))
  # Sampling error of an rms over 3000 Gaussian draws: 1/sqrt(6000) = 1.3%; 4% is 3σ.
  np.testing.assert_allclose(scatter / expected, 1.0, atol=0.04)


@pytest.fixture(scope='module')
def simulated():
  """100 in-memory stars of the synthetic survey (all kinds): combined flux, error, truth θ."""
  rng = np.random.default_rng(20)
  flux, err, theta = [], [], []
  for i in range(100):
    kind, data_type, _ = synthetic.KINDS[i % len(synthetic.KINDS)]
    star = synthetic.draw_star(i, 20, kind, data_type, rng)
    f, e, _, _ = synthetic.simulate_rows(star, rng)
    flux.append(f[0])
    err.append(e[0])
    theta.append((star.logg, star.teff, star.fe_h, star.scale, *star.response, star.telluric))
  return np.array(flux, np.float64), np.array(err, np.float64), np.array(theta)


@pytest.mark.slow
def test_nuisances_fitted_at_the_true_labels_give_the_bound_of_the_true_ones(simulated):
  """The records hold no true scale/response/telluric: the bound at their ML values for the true
  labels is the bound at the true values (to 1%)."""
  flux, err, theta = simulated
  with jax.enable_x64(True):
    fns = cramer_rao.make_batch_fns(cramer_rao.free_indices())
    w = cramer_rao.inverse_variance(jnp.asarray(flux), jnp.asarray(err))
    fitted = fns['fit_nuisances'](jnp.asarray(theta[:, :3]), jnp.asarray(flux), w)
    at_fit = np.asarray(fns['crb'](fitted, w))
    at_truth = np.asarray(fns['crb'](jnp.asarray(theta), w))
  np.testing.assert_allclose(at_fit, at_truth, rtol=0.01)
  np.testing.assert_allclose(np.asarray(fitted)[:, 3], theta[:, 3], rtol=0.01)


@pytest.mark.slow
def test_maximum_likelihood_fit_attains_the_bound(simulated):
  """LM fits of the forward model (all nuisances free), started a few σ off the true labels,
  scatter by σ_CRB: rms((θ_ML − θ_true)/σ_CRB) ≈ 1 per label. With 100 stars its sampling error
  is 1/sqrt(200) = 7%: the window 0.8–1.2 is ~3σ."""
  flux, err, theta = simulated
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    fns = cramer_rao.make_batch_fns(cramer_rao.free_indices())
    f = jnp.asarray(flux)
    w = cramer_rao.inverse_variance(f, jnp.asarray(err))
    at_truth = fns['fit_nuisances'](jnp.asarray(theta[:, :3]), f, w)
    sigma = np.asarray(fns['crb'](at_truth, w))
    start = at_truth.at[:, :3].add(rng.normal(size=(len(flux), 3)) * [0.05, 50.0, 0.02])
    fit, chi2_fit = fns['fit'](start, f, w)
    chi2_truth = np.asarray(fns['chi2'](at_truth, f, w))
  assert (np.asarray(chi2_fit) <= chi2_truth).all()  # converged past the truth, every star
  z = (np.asarray(fit)[:, :3] - theta[:, :3]) / sigma
  rms_z = np.sqrt(np.mean(z ** 2, 0))
  assert ((0.8 < rms_z) & (rms_z < 1.2)).all(), rms_z


# ------------------------------------------------------------------------------------------------
# Photometry's information (APOGEE Net II's metadata) and the log10 Teff label space.


def test_linear_toy_bound_with_photometry_is_analytic_and_never_larger():
  """Spectra: flux = A (labels, 2 nuisances); photometry: 7 values = B (labels, distance), B's
  [Fe/H] column 0, two values missing (NaN, 99.999). The combined bound is that of the stacked
  linear system in which the distance enters only the photometry and the nuisances only the
  spectra; it is never above the spectra's alone and equals it when nothing is measured."""
  rng = np.random.default_rng(1)
  n = 200
  a = rng.normal(size=(n, 5))
  a[:, 3] += 2.0 * a[:, 0]
  sigma = rng.uniform(0.5, 2.0, n)
  b = rng.normal(size=(7, 4))
  b[:, 2] = 0.0  # No [Fe/H] in the photometry.
  b[:, 3] += 1.5 * b[:, 0]  # Distance degenerate with log g in part: marginalising matters.
  metadata = rng.normal(size=7) + 10.0
  metadata[2], metadata[5] = np.nan, 99.999
  metadata_err = rng.uniform(0.05, 0.2, 7)
  theta = np.array([1.0, -2.0, 0.5, 3.0, 1.5])
  keep = np.array([1, 1, 0, 1, 1, 0, 1], bool)
  x = np.zeros((n + 7, 6))
  x[:n, :5] = a
  x[n:, :3], x[n:, 5] = b[:, :3], b[:, 3]
  w = np.concatenate([1 / sigma ** 2, np.where(keep, 1 / metadata_err ** 2, 0.0)])
  expected = np.sqrt(np.diag(np.linalg.inv(x.T @ (w[:, None] * x)))[:3])

  with jax.enable_x64(True):
    weights = jnp.asarray(1 / sigma ** 2)
    phot_weights = cramer_rao.photometry_weights(jnp.asarray(metadata), jnp.asarray(metadata_err))
    np.testing.assert_array_equal(np.asarray(phot_weights) > 0, keep)

    def bound(pw):
      return np.asarray(cramer_rao.crb_sigma_with_photometry(
          jnp.asarray(theta), weights, tuple(range(5)), jnp.asarray(7.0), pw,
          model_fn=lambda t: jnp.asarray(a) @ t, phot_fn=lambda p: jnp.asarray(b) @ p))

    got = bound(phot_weights)
    spectra = np.asarray(cramer_rao.crb_sigma(jnp.asarray(theta), weights, tuple(range(5)),
                                              lambda t: jnp.asarray(a) @ t))
    nothing = bound(jnp.zeros(7))
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  assert np.all(got <= spectra * (1 + 1e-12)) and got[0] < 0.95 * spectra[0]
  np.testing.assert_allclose(nothing, spectra, rtol=1e-12)


def _stars_with_photometry(kinds=('giant', 'mdwarf', 'hot', 'dwarf')):
  """θ (n, 7), combined flux and error (n, 8575), photometry columns of one star of each kind."""
  rng = np.random.default_rng(5)
  theta, flux, err = [], [], []
  for i, kind in enumerate(kinds):
    star = synthetic.draw_star(i, 5, kind, 'Payne', rng)
    f, e, _, _ = synthetic.simulate_rows(star, rng)
    theta.append((star.logg, star.teff, star.fe_h, star.scale, *star.response, star.telluric))
    flux.append(f[0])
    err.append(e[0])
  theta = np.array(theta)
  return theta, np.array(flux, np.float64), np.array(err, np.float64), photometry.draw(
      theta[:, :3], rng)


def test_photometry_adds_information_and_the_distance_is_recovered():
  theta, flux, err, columns = _stars_with_photometry()
  metadata = np.stack([columns[c] for c in constants.METADATA_COLUMNS], -1)
  metadata_err = np.stack([columns[c] for c in constants.METADATA_ERR_COLUMNS], -1)
  with jax.enable_x64(True):
    fns = cramer_rao.make_batch_fns(cramer_rao.free_indices())
    w = cramer_rao.inverse_variance(jnp.asarray(flux), jnp.asarray(err))
    distance = np.asarray(fns['fit_distance'](jnp.asarray(theta[:, :3]), jnp.asarray(metadata),
                                              jnp.asarray(metadata_err)))
    spectra = np.asarray(fns['crb'](jnp.asarray(theta), w))
    both = np.asarray(fns['crb_photometry'](jnp.asarray(theta), w, jnp.asarray(distance),
                                            jnp.asarray(metadata), jnp.asarray(metadata_err)))
    # The JAX relation's Jacobian is the NumPy relation's (central differences).
    params = np.array([*theta[1, :3], distance[1]])
    jac = np.asarray(jax.jacfwd(cramer_rao.photometry_model)(jnp.asarray(params)))
  np.testing.assert_allclose(distance / columns['DIST_PC'], 1.0, atol=0.01)
  assert np.all(both <= spectra * (1 + 1e-9))
  assert np.all(np.min(both / spectra, 1) < 0.999)  # Every star gains on some label,
  assert np.all(both[[0, 1, 3], 1] < 0.95 * spectra[[0, 1, 3], 1])  # the cool ones on Teff.
  for k, h in enumerate((1e-5, 1e-3, 1e-5, 1e-4)):
    e = np.zeros(4)
    e[k] = h
    fd = (photometry.observables(*(params + e)[[0, 1, 3]])
          - photometry.observables(*(params - e)[[0, 1, 3]])) / (2 * h)
    np.testing.assert_allclose(jac[:, k], fd, rtol=1e-6, atol=1e-9)


def test_label_space_of_checkpoints_and_the_exact_log_teff_bound():
  assert cramer_rao.label_space_of({}) == 'teff'
  linear = {'label_names': ['LOGG', 'TEFF', 'FE_H'], 'mean': [3, 4700, 0], 'std': [1, 700, 0.3]}
  assert cramer_rao.label_space_of({'normalization': linear}) == 'teff'
  assert cramer_rao.label_space_of(
      {'normalization': {**linear, 'log10_labels': ['TEFF']}}) == 'log_teff'
  assert cramer_rao.label_space_of({'label_space': 'log_teff'}) == 'log_teff'
  theta, flux, err, _ = _stars_with_photometry(('hot',))
  with jax.enable_x64(True):
    w = cramer_rao.inverse_variance(jnp.asarray(flux[0]), jnp.asarray(err[0]))
    free = cramer_rao.free_indices()
    sigma = np.asarray(cramer_rao.crb_sigma(jnp.asarray(theta[0]), w, free))

    def log_teff_model(t):  # The same forward model, parameterised by log10 Teff.
      return forward_model.model_flux(t.at[1].set(10.0 ** t[1]))

    log_theta = jnp.asarray(theta[0]).at[1].set(np.log10(theta[0, 1]))
    direct = np.asarray(cramer_rao.crb_sigma(log_theta, w, free, log_teff_model))
  converted = cramer_rao.sigma_to_label_space(sigma[None], theta[:1, :3], 'log_teff')[0]
  np.testing.assert_allclose(converted, direct, rtol=1e-8)
  assert converted[1] == pytest.approx(sigma[1] / (theta[0, 1] * np.log(10)))
  np.testing.assert_allclose(cramer_rao.to_label_space(theta[:1, :3], 'log_teff')[0, 1],
                             np.log10(theta[0, 1]))
  with pytest.raises(ValueError, match='label space'):
    cramer_rao.to_label_space(theta[:1, :3], 'kelvin')
