"""apogeenet_jax.forward_model: the JAX forward model is synthetic.model_flux, with exact derivatives.

float64 inside ``jax.enable_x64(True)`` only, so x64 never leaks into other tests.
"""

import jax
import numpy as np
import pytest

from apogeenet_jax import forward_model, synthetic

# (log g, Teff, [Fe/H]), scale, response (c1, c2), telluric: both sides of every clip of
# line_strengths (Teff below 3500 K: no hydrogen lines; log g below 2: no pressure wings; hot
# stars above synthetic.HOT_LINE_ONSET: metal, molecular and CO-like lines fading, the metal
# factor's floor above 12,500 K).
CASES = [
    ((2.4, 4650.0, -0.3), 250.0, (0.0, 0.0), 0.0),
    ((1.2, 3900.0, -1.1), 17.0, (0.12, -0.04), 0.2),
    ((4.9, 3100.0, 0.2), 12000.0, (-0.1, 0.07), -0.3),
    ((4.3, 6400.0, 0.4), 900.0, (0.03, 0.02), 0.05),
    ((4.2, 8200.0, -0.2), 400.0, (0.05, -0.03), 0.1),
    ((3.7, 17500.0, 0.1), 3000.0, (-0.04, 0.02), -0.1),
]


@pytest.mark.parametrize('labels, scale, response, telluric', CASES)
def test_same_flux_as_the_numpy_model(labels, scale, response, telluric):
  expected = synthetic.model_flux(*labels, scale, response, telluric)
  with jax.enable_x64(True):
    theta = forward_model.parameters(np.array(labels), scale, response, telluric)
    got = np.asarray(forward_model.model_flux(theta))
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize('labels, scale, response, telluric', CASES)
def test_jacobian_matches_finite_differences_of_the_numpy_model(labels, scale, response,
                                                                telluric):
  """Column k of jacfwd against a central difference of synthetic.model_flux in θ_k."""
  theta = np.array([*labels, scale, *response, telluric])
  steps = np.array([1e-4, 1e-2, 1e-4, scale * 1e-6, 1e-5, 1e-5, 1e-5])

  def numpy_flux(t):
    return synthetic.model_flux(t[0], t[1], t[2], t[3], (t[4], t[5]), t[6])

  with jax.enable_x64(True):
    jac = np.asarray(forward_model.jacobian(theta))
  assert jac.shape == (synthetic.constants.N_PIXELS, len(forward_model.PARAM_NAMES))
  for k, h in enumerate(steps):
    e = np.zeros_like(theta)
    e[k] = h
    fd = (numpy_flux(theta + e) - numpy_flux(theta - e)) / (2 * h)
    scale_k = np.abs(fd).max()
    np.testing.assert_allclose(jac[:, k], fd, rtol=0, atol=1e-6 * scale_k,
                               err_msg=forward_model.PARAM_NAMES[k])
