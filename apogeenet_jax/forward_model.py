"""The synthetic survey's forward model in JAX: noiseless flux as a function of labels and nuisances.

The same model as ``synthetic.model_flux`` (NumPy; it writes the files), here so that
``jax.jacfwd`` gives the exact Jacobian ∂flux/∂θ for the Cramér–Rao bound and the
maximum-likelihood fit (``cramer_rao``):

  flux(θ) = A · R(x) · B_λ(Teff)/B_λ(Teff, 1.6 μm) · exp(−Σ_g s_g(log g, Teff, [Fe/H]) τ_g(λ) − t τ_⊕(λ))

θ (7,) = (log g [dex], Teff [K], [Fe/H] [dex]: the network's labels in its order, paper §3) then
the nuisances: A the flux scale at 1.6 μm (1e-17 erg/s/cm²/Å), c1, c2 the Legendre coefficients of
the smooth response R(x) = 1 + c1 P1(x) + c2 P2(x) (x ∈ [−1, 1] across the 8575 pixels), t the
strength of the telluric-correction residual. The line and telluric templates τ_g, τ_⊕ are the
fixed arrays of ``synthetic`` (data drawn once from fixed seeds, not a model to differentiate).
Precision follows JAX's: call under ``jax.enable_x64(True)`` for float64 (the bound does).

What the synthetic survey still makes easier than real spectra, even with the per-star scale over
three decades, response and telluric residual:
- the model is exact: the fit family contains the truth (real spectra differ from every model
  grid, and real training labels carry their own errors; here they are exact);
- the noise is Gaussian, independent between pixels and exactly the stated σ (real apStar noise
  is correlated by the visit resampling and combination, and σ is itself an estimate);
- the flux is clean where the errors are huge (real sky-line residuals and persistence put
  spikes in the flux there); no radial-velocity resampling error, one LSF for every fibre;
- no rotation, veiling (YSOs), binaries or starspots; one metallicity drives all metal lines
  (no [α/Fe], C, N); five smooth line groups only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from apogeenet_jax import apstar, synthetic
from apogeenet_jax.constants import LABEL_NAMES

# Parameter vector θ: the labels, then the nuisances.
PARAM_NAMES = (*LABEL_NAMES, 'SCALE', 'RESPONSE_C1', 'RESPONSE_C2', 'TELLURIC')
NUM_LABELS = len(LABEL_NAMES)
# Nuisance groups (names usable on command lines) → their indices in θ.
NUISANCE_GROUPS = {'scale': (3,), 'response': (4, 5), 'telluric': (6,)}
# The value a nuisance has when it is not part of the model (held fixed): no response, no
# telluric residual. The scale is always free in practice (the true one is never known).
NEUTRAL = {3: 1.0, 4: 0.0, 5: 0.0, 6: 0.0}


@functools.cache
def _grids() -> dict[str, np.ndarray]:
  """float64 wavelength (Å), x, line templates (5, 8575) and telluric template (8575,)."""
  return {'wavelength': apstar.wavelength_grid(), 'x': synthetic.pixel_coordinate(),
          'lines': synthetic.line_templates().astype(np.float64),
          'telluric': synthetic.telluric_template().astype(np.float64)}


def _grid(name: str) -> jax.Array:
  """A grid in JAX's current default float dtype (float64 under ``enable_x64``)."""
  return jnp.asarray(_grids()[name], dtype=jnp.result_type(float))


def line_strengths(logg, teff, fe_h) -> jax.Array:
  """(5,) strengths s_g; the piecewise form of ``synthetic.line_strengths`` (max for its clips)."""
  t = teff / 5000.0
  fade = jnp.exp(-jnp.maximum(teff - synthetic.HOT_LINE_ONSET, 0.0) / synthetic.HOT_LINE_SCALE)
  metal = 10.0 ** fe_h * jnp.maximum(1.6 - 0.6 * t, 0.1) * 1.5 * fade
  molecular = jnp.exp(-(teff - 3000.0) / 600.0) * (1.0 + 0.5 * fe_h) * 1.2 * fade
  gravity = (5.2 - logg) / 2.0 * 10.0 ** (0.5 * fe_h) * jnp.maximum(1.5 - 0.5 * t, 0.3) * fade
  pressure = jnp.maximum(logg - 2.0, 0.0) / 2.5
  hydrogen = jnp.maximum((teff - 3500.0) / 2500.0, 0.0) * (0.5 + logg / 9.0)
  return jnp.stack([metal, molecular, gravity, pressure, hydrogen])


def planck_shape(wavelength: jax.Array, teff) -> jax.Array:
  """B_λ(Teff) / B_λ(Teff) at 1.6 μm, same shape as ``wavelength`` (Å)."""
  c2 = 1.4387769e8  # hc/k in Å·K.

  def planck(lam):
    return lam ** -5 / jnp.expm1(c2 / (lam * teff))

  return planck(wavelength) / planck(synthetic._H_BAND_CENTRE)


def response(c1, c2) -> jax.Array:
  """(8575,) R(x) = 1 + c1 P1(x) + c2 P2(x), Legendre P1 = x, P2 = (3x² − 1)/2."""
  x = _grid('x')
  return 1.0 + c1 * x + c2 * 0.5 * (3.0 * x ** 2 - 1.0)


def model_flux(theta: jax.Array) -> jax.Array:
  """θ (7,) in ``PARAM_NAMES`` order → (8575,) noiseless flux, 1e-17 erg/s/cm²/Å."""
  logg, teff, fe_h, scale, c1, c2, t = (theta[i] for i in range(len(PARAM_NAMES)))
  tau = line_strengths(logg, teff, fe_h) @ _grid('lines') + t * _grid('telluric')
  return scale * response(c1, c2) * planck_shape(_grid('wavelength'), teff) * jnp.exp(-tau)


def jacobian(theta: jax.Array) -> jax.Array:
  """(8575, 7) exact ∂flux/∂θ at θ (forward mode: 7 tangents)."""
  return jax.jacfwd(model_flux)(theta)


def parameters(labels, scale=1.0, response_coefficients=(0.0, 0.0), telluric=0.0) -> jax.Array:
  """θ (..., 7) from labels (..., 3) and the nuisances (broadcast)."""
  labels = jnp.asarray(labels, jnp.result_type(float))
  ones = jnp.ones(labels.shape[:-1])
  c = jnp.asarray(response_coefficients, labels.dtype)
  rest = jnp.stack([scale * ones, c[..., 0] * ones, c[..., 1] * ones, telluric * ones], -1)
  return jnp.concatenate([labels, rest], -1)
