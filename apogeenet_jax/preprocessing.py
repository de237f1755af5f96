"""Flux preprocessing shared by training and inference — defined once, used by both.

The network reads RAW combined flux (paper §3.1: continuum-normalised flux failed to converge).
Like the authors' released code, non-finite flux becomes 0; a non-finite or negative error becomes
BAD_PIXEL_ERROR so that Monte Carlo draws leave that pixel alone (docs/paper_facts.md,
"Released code").
NumPy only: runs in input-pipeline workers without touching an accelerator.
"""

import numpy as np

from apogeenet_jax.constants import BAD_PIXEL_ERROR


def preprocess_flux(flux: np.ndarray) -> np.ndarray:
  """flux (..., 8575) 1e-17 erg/s/cm²/Å → float32 with non-finite values set to 0."""
  flux = np.asarray(flux, dtype=np.float32)
  return np.where(np.isfinite(flux), flux, np.float32(0.0))


def preprocess_error(flux_err: np.ndarray) -> np.ndarray:
  """flux_err (..., 8575) → float32; non-finite or negative errors become BAD_PIXEL_ERROR."""
  err = np.asarray(flux_err, dtype=np.float32)
  good = np.isfinite(err) & (err >= 0)
  return np.where(good, err, np.float32(BAD_PIXEL_ERROR))
