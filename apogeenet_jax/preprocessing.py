"""Flux preprocessing shared by training and inference — defined once, used by both.

The network reads RAW combined flux (paper §3.1: continuum-normalised flux failed to converge).
Like the authors' released code, non-finite flux becomes 0; a non-finite or negative error becomes
BAD_PIXEL_ERROR so that Monte Carlo draws leave that pixel alone (docs/paper_facts.md,
"Released code").

One rule for bad pixels, for flux and error alike (``preprocess``): a pixel whose flux is not
finite, or whose error is not finite or negative, is bad for both — flux 0 and error
BAD_PIXEL_ERROR — so no Monte Carlo draw or noise augmentation adds noise to a pixel the reader
calls bad. Callers that hold both arrays use ``preprocess``; ``preprocess_flux`` alone is for
the flux level (``input_pipeline.median_flux``), which only looks at positive pixels.
NumPy only: runs in input-pipeline workers without touching an accelerator.
"""

import numpy as np

from apogeenet_jax.constants import BAD_PIXEL_ERROR


def bad_pixels(flux: np.ndarray, flux_err: np.ndarray) -> np.ndarray:
  """(..., 8575) bool: flux not finite, or error not finite or negative."""
  flux = np.asarray(flux)
  err = np.asarray(flux_err)
  with np.errstate(invalid='ignore'):
    return ~np.isfinite(flux) | ~np.isfinite(err) | (err < 0)


def preprocess(flux: np.ndarray, flux_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(flux, flux_err) (..., 8575) → float32 pair with one bad-pixel mask: flux 0 and error
  BAD_PIXEL_ERROR wherever either value is unusable (``bad_pixels``)."""
  flux = np.asarray(flux, dtype=np.float32)
  err = np.asarray(flux_err, dtype=np.float32)
  bad = bad_pixels(flux, err)
  return (np.where(bad, np.float32(0.0), flux),
          np.where(bad, np.float32(BAD_PIXEL_ERROR), err))


def preprocess_flux(flux: np.ndarray) -> np.ndarray:
  """flux (..., 8575) 1e-17 erg/s/cm²/Å → float32 with non-finite values set to 0.

  Sees the flux only: where the error is at hand too, use ``preprocess``."""
  flux = np.asarray(flux, dtype=np.float32)
  return np.where(np.isfinite(flux), flux, np.float32(0.0))


def preprocess_error(flux_err: np.ndarray, flux: np.ndarray | None = None) -> np.ndarray:
  """flux_err (..., 8575) → float32; non-finite or negative errors become BAD_PIXEL_ERROR, and so
  do the errors of non-finite ``flux`` pixels when ``flux`` is given (``preprocess``)."""
  if flux is not None:
    return preprocess(flux, flux_err)[1]
  err = np.asarray(flux_err, dtype=np.float32)
  good = np.isfinite(err) & (err >= 0)
  return np.where(good, err, np.float32(BAD_PIXEL_ERROR))
