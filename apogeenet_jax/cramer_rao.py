"""The Cramér–Rao bound on (log g, Teff, [Fe/H]) of one spectrum, and the maximum-likelihood fit
that attains it.

With Gaussian pixel noise of known σ_i the Fisher information of the parameters θ is
F = Jᵀ Σ⁻¹ J, J = ∂flux/∂θ (pixels × P) at the true θ. Every unbiased estimator has
Cov(θ̂) ≥ F⁻¹, so a label's bound is σ_CRB = sqrt((F⁻¹)_kk) over the labels AND the free
nuisances (flux scale, response, telluric residual): the nuisances are marginalised (the inverse
of the Schur complement of their block), not fixed at their true values, which would give the
smaller sqrt(((F_ll)⁻¹)_kk) that no estimator can reach without knowing them.

Pixels: σ exactly as stored (the records' ``flux_err``); a bad pixel (error ≥ 1e9, the apStar
1e10 convention, or flux exactly 0) carries no information: inverse variance 0.

Photometry (APOGEE Net II's metadata, ``photometry``): a star's parallax and magnitudes carry
their own information, F_phot = J_phᵀ diag(1/σ²) J_ph, J_ph = ∂(ϖ, G, BP, RP, J, H, K)/∂(labels,
d) of the survey's photometric relation, a missing value (non-finite, ≥ 98, or without a
positive error) weight 0. The distance d enters only the photometry and the spectral nuisances
only the spectra, so the total Fisher matrix over (labels, spectral nuisances, d) is the sum of
the two blocks on the labels they share; the bound is the labels' block of its inverse (d is
marginalised like the other nuisances) — ``crb_sigma_with_photometry``.

Label space: a family that predicts log10 Teff (APOGEE Net II, III) is compared with the bound
in its own space, σ_log10 Teff = σ_Teff / (Teff ln 10), exact for a reparameterisation of one
label (the Fisher matrix transforms with the Jacobian diag(1, 1/(Teff ln 10), 1)).

Parameters held fixed are given by ``free``, a tuple of indices into θ (the labels first, then
the free nuisances, ``free_indices``). Functions work on one star; ``jax.vmap`` them for batches
(``*_batch``). Call them under ``jax.enable_x64(True)``: Teff in K and the scale in flux units
make F span many decades (its Jacobi-scaled form is inverted, but float32 is still too coarse).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from apogeenet_jax import forward_model, photometry
from apogeenet_jax.normalization import Standardizer

# Errors at or above this are bad pixels (apStar writes 1e10); they get zero weight.
BAD_ERROR = 1e9
DEFAULT_NUISANCES = tuple(forward_model.NUISANCE_GROUPS)  # scale, response, telluric
NUM_STEPS = 40  # Levenberg–Marquardt iterations (converged well before on the synthetic survey)


def free_indices(nuisances: Sequence[str] = DEFAULT_NUISANCES) -> tuple[int, ...]:
  """Indices of θ that are estimated: the labels and the named nuisance groups."""
  unknown = set(nuisances) - set(forward_model.NUISANCE_GROUPS)
  if unknown:
    raise ValueError(f'unknown nuisance(s) {sorted(unknown)}; '
                     f'choose from {list(forward_model.NUISANCE_GROUPS)}')
  extra = [i for name in nuisances for i in forward_model.NUISANCE_GROUPS[name]]
  return (*range(forward_model.NUM_LABELS), *sorted(extra))


def inverse_variance(flux: jax.Array, flux_err: jax.Array) -> jax.Array:
  """(..., pixels) 1/σ², 0 on bad pixels (σ ≥ 1e9, flux == 0, or σ not finite and positive)."""
  good = (flux_err < BAD_ERROR) & (flux != 0) & jnp.isfinite(flux_err) & (flux_err > 0)
  return jnp.where(good, 1.0 / jnp.where(good, flux_err, 1.0) ** 2, 0.0)


def fisher_information(jac: jax.Array, weights: jax.Array) -> jax.Array:
  """(P, P) F = Jᵀ diag(weights) J for a Jacobian (pixels, P) and inverse variances (pixels,)."""
  return jac.T @ (weights[:, None] * jac)


def _scaled_inverse(matrix: jax.Array) -> jax.Array:
  """Inverse of a symmetric positive-definite matrix through its Jacobi scaling D⁻¹ M D⁻¹."""
  d = jnp.sqrt(jnp.diag(matrix))
  return jnp.linalg.inv(matrix / jnp.outer(d, d)) / jnp.outer(d, d)


def marginal_sigma(fisher: jax.Array, num_labels: int = forward_model.NUM_LABELS) -> jax.Array:
  """(num_labels,) sqrt(diag(F⁻¹)) of the first num_labels parameters, the rest marginalised."""
  return jnp.sqrt(jnp.diag(_scaled_inverse(fisher))[:num_labels])


def crb_sigma(theta: jax.Array, weights: jax.Array, free: tuple[int, ...],
              model_fn: Callable[[jax.Array], jax.Array] = forward_model.model_flux) -> jax.Array:
  """(3,) σ_CRB of the labels of one star: J = jacfwd(model_fn) at θ, columns ``free``."""
  jac = jax.jacfwd(model_fn)(theta)[:, jnp.asarray(free)]
  return marginal_sigma(fisher_information(jac, weights), forward_model.NUM_LABELS)


def chi2(theta: jax.Array, flux: jax.Array, weights: jax.Array,
         model_fn: Callable[[jax.Array], jax.Array] = forward_model.model_flux) -> jax.Array:
  """Σ_i w_i (flux_i − model_i(θ))², −2 log L up to a constant."""
  return jnp.sum(weights * (flux - model_fn(theta)) ** 2)


def levenberg_marquardt(theta0: jax.Array, flux: jax.Array, weights: jax.Array,
                        free: tuple[int, ...], num_steps: int = NUM_STEPS,
                        model_fn: Callable[[jax.Array], jax.Array] = forward_model.model_flux
                        ) -> tuple[jax.Array, jax.Array]:
  """(θ̂, χ²(θ̂)): the maximum-likelihood θ of one spectrum, parameters outside ``free`` fixed.

  Levenberg–Marquardt with Marquardt's scaling (damping ∝ diag JᵀWJ, so K and dex need no
  rescaling): a step is kept only when it lowers χ², the damping falls ×3 after a kept step and
  rises ×3 after a refused one. A fixed number of steps (one compiled loop, vmappable).
  """
  idx = jnp.asarray(free)
  damp0 = jnp.asarray(1e-3, theta0.dtype)

  def step(carry, _):
    theta, damping, value = carry
    residual = flux - model_fn(theta)
    jac = jax.jacfwd(model_fn)(theta)[:, idx]
    a = fisher_information(jac, weights)
    g = jac.T @ (weights * residual)
    d = jnp.sqrt(jnp.diag(a))
    d = jnp.where(d > 0, d, 1.0)  # a parameter the pixels do not see: no step, no NaN
    scaled = a / jnp.outer(d, d) + damping * jnp.eye(len(free), dtype=a.dtype)
    delta = jnp.linalg.solve(scaled, g / d) / d
    trial = theta.at[idx].add(delta)
    trial_value = chi2(trial, flux, weights, model_fn)
    better = trial_value < value
    return (jnp.where(better, trial, theta), jnp.where(better, damping / 3, damping * 3),
            jnp.where(better, trial_value, value)), None

  start = (theta0, damp0, chi2(theta0, flux, weights, model_fn))
  (theta, _, value), _ = jax.lax.scan(step, start, None, length=num_steps)
  return theta, value


def linear_scale(labels: jax.Array, flux: jax.Array, weights: jax.Array) -> jax.Array:
  """The weighted least-squares flux scale A of the unit-scale model at ``labels`` (closed form:
  Σ w f m / Σ w m², m the model with A = 1, no response, no telluric residual)."""
  m = forward_model.model_flux(forward_model.parameters(labels))
  return jnp.sum(weights * flux * m) / jnp.sum(weights * m * m)


def fit_nuisances(labels: jax.Array, flux: jax.Array, weights: jax.Array,
                  free: tuple[int, ...], num_steps: int = NUM_STEPS) -> jax.Array:
  """θ (7,) at the given labels with the free nuisances fitted (ML at fixed labels).

  The true nuisances of a built survey are not in its records (nor known for real spectra): the
  bound is evaluated at the true labels and these. Starts from the closed-form scale, no response
  and no telluric residual; nuisances outside ``free`` stay at their neutral values.
  """
  theta0 = forward_model.parameters(labels, linear_scale(labels, flux, weights))
  nuisances = tuple(i for i in free if i >= forward_model.NUM_LABELS)
  if not nuisances:
    return theta0
  return levenberg_marquardt(theta0, flux, weights, nuisances, num_steps)[0]


def photometry_model(params: jax.Array) -> jax.Array:
  """params (4,) = (log g, Teff, [Fe/H], distance pc) → (7,) noiseless parallax (mas) and G, BP,
  RP, J, H, K (mag): ``photometry.observables`` in JAX."""
  return photometry.observables(params[0], params[1], params[3], xp=jnp)


def photometry_weights(metadata: jax.Array, metadata_err: jax.Array) -> jax.Array:
  """(..., 7) 1/σ² of the measured values, 0 where missing (``photometry.valid``)."""
  ok = photometry.valid(metadata, metadata_err, xp=jnp)
  return jnp.where(ok, 1.0 / jnp.where(ok, metadata_err, 1.0) ** 2, 0.0)


def combined_fisher(spectral: jax.Array, phot: jax.Array) -> jax.Array:
  """(P+1, P+1) Fisher matrix over (labels, P − 3 spectral nuisances, distance) from the
  spectra's (P, P) and the photometry's (4, 4) over (labels, distance)."""
  p = spectral.shape[0]
  total = jnp.zeros((p + 1, p + 1), spectral.dtype).at[:p, :p].set(spectral)
  shared = jnp.asarray([*range(forward_model.NUM_LABELS), p])
  total = total.at[jnp.ix_(shared, shared)].add(phot)
  # No usable photometry: nothing sees the distance; a unit entry, coupled to nothing, keeps the
  # matrix invertible and leaves the labels' bound that of the spectra alone.
  return total.at[p, p].add(jnp.where(phot[-1, -1] > 0, 0.0, 1.0))


def crb_sigma_with_photometry(
    theta: jax.Array, weights: jax.Array, free: tuple[int, ...], distance: jax.Array,
    phot_weights: jax.Array,
    model_fn: Callable[[jax.Array], jax.Array] = forward_model.model_flux,
    phot_fn: Callable[[jax.Array], jax.Array] = photometry_model) -> jax.Array:
  """(3,) σ_CRB of the labels from the spectrum AND the photometry, the spectral nuisances and
  the distance (pc) marginalised. phot_weights (7,): 1/σ² of the photometry, 0 where missing
  (``photometry_weights``); weights, free, model_fn as for ``crb_sigma``; phot_fn maps
  (labels, distance) (4,) to the photometry (7,)."""
  jac = jax.jacfwd(model_fn)(theta)[:, jnp.asarray(free)]
  spectral = fisher_information(jac, weights)
  params = jnp.concatenate([theta[:forward_model.NUM_LABELS], jnp.reshape(distance, (1,))])
  phot = fisher_information(jax.jacfwd(phot_fn)(params), phot_weights)
  return marginal_sigma(combined_fisher(spectral, phot), forward_model.NUM_LABELS)


def fit_distance(labels: jax.Array, metadata: jax.Array, metadata_err: jax.Array,
                 num_steps: int = NUM_STEPS) -> jax.Array:
  """The maximum-likelihood distance (pc) of one star at its (true) labels from its photometry.

  The records do not carry the distance (real catalogues do not know it): the photometric bound
  is evaluated there, as the spectral one at the nuisances ``fit_nuisances`` finds. Starts from
  the weighted mean distance modulus of the measured magnitudes (else 1000/ϖ, else 1 kpc);
  1 kpc, unused, when nothing is measured.
  """
  weights = photometry_weights(metadata, metadata_err)
  observed = jnp.where(weights > 0, metadata, 0.0)
  absolute = photometry.absolute_magnitudes(labels[0], labels[1], xp=jnp)
  w_mag = weights[1:]
  modulus = jnp.sum(w_mag * (observed[1:] - absolute)) / jnp.maximum(jnp.sum(w_mag), 1e-300)
  from_parallax = jnp.where((weights[0] > 0) & (observed[0] > 0),
                            1000.0 / jnp.where(observed[0] > 0, observed[0], 1.0), 1000.0)
  d0 = jnp.where(jnp.sum(w_mag) > 0, 10.0 ** (modulus / 5.0 + 1.0), from_parallax)
  theta0 = jnp.concatenate([labels, jnp.reshape(d0, (1,))])
  fit, _ = levenberg_marquardt(theta0, observed, weights, (3,), num_steps, photometry_model)
  return fit[3]


LABEL_SPACES = ('teff', 'log_teff')


def label_space_of(meta: dict | None) -> str:
  """'log_teff' for a checkpoint whose network predicts log10 Teff (meta['label_space'], or
  the label space its normalisation records: ``normalization.Standardizer``); 'teff' otherwise
  (APOGEE Net I's checkpoints)."""
  meta = meta or {}
  if meta.get('label_space') in LABEL_SPACES:
    return meta['label_space']
  if 'normalization' not in meta:
    return 'teff'
  space = Standardizer.from_dict(meta['normalization']).space
  return 'log_teff' if 'TEFF' in space.log10 else 'teff'


def to_label_space(labels: np.ndarray, space: str) -> np.ndarray:
  """(n, 3) labels in ``space``: Teff (K) → log10 Teff for 'log_teff'. A copy."""
  out = np.array(labels, np.float64)
  if space == 'log_teff':
    out[:, 1] = np.log10(out[:, 1])
  elif space != 'teff':
    raise ValueError(f'unknown label space {space!r}; choose from {LABEL_SPACES}')
  return out


def sigma_to_label_space(sigma: np.ndarray, labels: np.ndarray, space: str) -> np.ndarray:
  """(n, 3) σ_CRB in ``space`` at the (n, 3) true labels (Teff in K): σ_log10 Teff =
  σ_Teff / (Teff ln 10) for 'log_teff'. A copy."""
  out = np.array(sigma, np.float64)
  if space == 'log_teff':
    out[:, 1] = out[:, 1] / (np.asarray(labels, np.float64)[:, 1] * np.log(10.0))
  elif space != 'teff':
    raise ValueError(f'unknown label space {space!r}; choose from {LABEL_SPACES}')
  return out


def make_batch_fns(free: tuple[int, ...], num_steps: int = NUM_STEPS):
  """Jitted, vmapped (over stars) versions for one choice of free parameters:

  fit_nuisances(labels (B, 3), flux (B, n), weights (B, n)) → θ (B, 7);
  crb(θ (B, 7), weights (B, n)) → σ_CRB (B, 3);
  fit(θ0 (B, 7), flux, weights) → (θ̂ (B, 7), χ² (B,));
  chi2(θ (B, 7), flux, weights) → (B,);
  fit_distance(labels (B, 3), metadata (B, 7), metadata_err (B, 7)) → distance (B,) pc;
  crb_photometry(θ (B, 7), weights, distance (B,), metadata, metadata_err) → σ_CRB (B, 3) of
    spectrum and photometry together.
  """
  return {
      'fit_nuisances': jax.jit(jax.vmap(
          lambda lab, f, w: fit_nuisances(lab, f, w, free, num_steps))),
      'crb': jax.jit(jax.vmap(lambda th, w: crb_sigma(th, w, free))),
      'fit': jax.jit(jax.vmap(lambda th, f, w: levenberg_marquardt(th, f, w, free, num_steps))),
      'chi2': jax.jit(jax.vmap(chi2)),
      'fit_distance': jax.jit(jax.vmap(lambda lab, m, e: fit_distance(lab, m, e, num_steps))),
      'crb_photometry': jax.jit(jax.vmap(
          lambda th, w, d, m, e: crb_sigma_with_photometry(
              th, w, free, d, photometry_weights(m, e)))),
  }
