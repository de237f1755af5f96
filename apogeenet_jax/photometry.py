"""The synthetic survey's photometry: parallax and G, BP, RP, J, H, K from the labels and a distance.

APOGEE Net II (Sprague et al. 2022) reads a 7-value vector beside the spectrum, in
``constants.METADATA_COLUMNS`` order: Gaia parallax (mas), G, BP, RP, 2MASS J, H, K (mag). The
synthetic survey writes these columns consistent with each star's labels, with this relation
(written once for NumPy and JAX: pass ``xp=jax.numpy`` to differentiate it, as ``cramer_rao``
does for the photometry's Fisher information):

  mass      log10 M/M☉ = (1 − w) · 1.6 · log10(Teff/T☉) + w · log10(1.2),
            w = 1 / (1 + exp((log g − 3.3)/0.15)): a main-sequence mass–Teff relation for dwarfs
            (0.4 M☉ at 3300 K, 4.6 M☉ at 15,000 K) blending into 1.2 M☉ for giants;
  radius    log10 R/R☉ = (log10 M/M☉ − (log g − log g☉)) / 2          (g = GM/R²);
  absolute  M_b = M_b☉ − 5 log10 R/R☉ − 2.5 log10(B_λb(Teff) / B_λb(T☉)): a blackbody of that
            radius seen at each band's effective wavelength λ_b, zero-pointed on the Sun's
            absolute magnitudes (so L ∝ R² Teff⁴ and the colours follow Teff, monotonically);
  apparent  m_b = M_b + 5 log10(d / 10 pc), parallax ϖ = 1000 / d mas, d in pc.

No [Fe/H] dependence, no extinction, no binaries: the photometry carries information on log g and
Teff (and the distance) only. Errors grow with magnitude like Gaia DR3's and 2MASS's; a few
percent of values are missing (NaN, or 99.999 for 2MASS, as catalogues write it).
NumPy only at import: ``synthetic`` (I/O) uses it without JAX.
"""

import numpy as np

from apogeenet_jax import constants

T_SUN = 5772.0  # K, IAU 2015 nominal.
LOGG_SUN = 4.438  # dex.
GIANT_MASS = 1.2  # M☉, typical red clump / RGB star of APOGEE.
MASS_TEFF_SLOPE = 1.6  # d log10 M / d log10 Teff on the main sequence.
GIANT_LOGG, GIANT_LOGG_WIDTH = 3.3, 0.15  # Centre and width of the dwarf → giant mass blend.
_C2 = 1.4387769e8  # hc/k in Å·K.
# G, BP, RP, J, H, K: effective wavelength (Å, Vega system) and the Sun's absolute magnitude
# (approximately: Casagrande & VandenBerg 2018 for Gaia, Willmer 2018 for 2MASS).
BAND_WAVELENGTHS = (6230.0, 5110.0, 7770.0, 12350.0, 16620.0, 21590.0)
SUN_ABSOLUTE_MAGNITUDES = (4.67, 5.03, 4.18, 3.67, 3.32, 3.27)
# Survey design: apparent H uniform in this range (APOGEE's targets are H ≲ 12.2); the distance
# follows from the star's absolute H.
H_RANGE = (7.0, 12.2)
# Errors: σ = floor + slope · 10^(0.4 (m − m_ref)), at most MAX_MAG_ERROR (mag) / MAX_PLX_ERROR
# (mas; the parallax's grows with G). (floor, slope, m_ref) per column of METADATA_COLUMNS.
ERROR_MODEL = ((0.02, 0.02, 15.0), (0.001, 0.001, 15.0), (0.002, 0.004, 15.0),
               (0.002, 0.004, 15.0), (0.02, 0.01, 14.0), (0.02, 0.01, 13.5), (0.02, 0.01, 13.0))
MAX_MAG_ERROR, MAX_PLX_ERROR = 0.05, 0.3
# Missing values: no Gaia source (parallax, G, BP, RP all NaN); no BP or no RP (NaN); a 2MASS
# band without a measurement (written 99.999, error NaN, as catalogues do). Per star.
P_NO_GAIA, P_NO_BP_RP, P_NO_2MASS_BAND = 0.02, 0.02, 0.02
CATALOGUE_MISSING = 99.999


def log_mass(logg, teff, xp=np):
  """log10 M/M☉ (..., ) from log g (dex) and Teff (K)."""
  w = 1.0 / (1.0 + xp.exp((logg - GIANT_LOGG) / GIANT_LOGG_WIDTH))
  return (1.0 - w) * MASS_TEFF_SLOPE * xp.log10(teff / T_SUN) + w * np.log10(GIANT_MASS)


def absolute_magnitudes(logg, teff, xp=np):
  """(..., 6) absolute G, BP, RP, J, H, K (mag) from log g (dex) and Teff (K), shapes (...)."""
  lam = xp.asarray(BAND_WAVELENGTHS)
  log_radius = 0.5 * (log_mass(logg, teff, xp) - (logg - LOGG_SUN))
  surface = xp.expm1(_C2 / (lam * T_SUN)) / xp.expm1(_C2 / (lam * teff[..., None]))
  return (xp.asarray(SUN_ABSOLUTE_MAGNITUDES) - 5.0 * log_radius[..., None]
          - 2.5 * xp.log10(surface))


def observables(logg, teff, distance, xp=np):
  """(..., 7) noiseless parallax (mas) and apparent G, BP, RP, J, H, K (mag), METADATA_COLUMNS
  order, for log g (dex), Teff (K) and distance (pc), shapes (...)."""
  distance = xp.asarray(distance)
  apparent = absolute_magnitudes(logg, teff, xp) + 5.0 * xp.log10(distance[..., None]) - 5.0
  return xp.concatenate([(1000.0 / distance)[..., None], apparent], axis=-1)


def valid(metadata, metadata_err, xp=np):
  """(..., 7) bool: a measured value: finite, below the catalogues' 99.999 "missing" sentinel
  (≥ MISSING_MAGNITUDE), with a finite positive error."""
  return (xp.isfinite(metadata) & (metadata < constants.MISSING_MAGNITUDE)
          & xp.isfinite(metadata_err) & (metadata_err > 0))


def errors(true_values: np.ndarray) -> np.ndarray:
  """(n, 7) errors of the (n, 7) true observables: magnitude-dependent, Gaia- and 2MASS-like; the
  parallax's grows with G."""
  reference = true_values.copy()
  reference[:, 0] = true_values[:, 1]  # ϖ's error follows G.
  floor, slope, m_ref = (np.array(c) for c in zip(*ERROR_MODEL, strict=True))
  sigma = floor + slope * 10.0 ** (0.4 * (reference - m_ref))
  cap = np.full(len(constants.METADATA_COLUMNS), MAX_MAG_ERROR)
  cap[0] = MAX_PLX_ERROR
  return np.minimum(sigma, cap)


def draw(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Photometry of n stars with (n, 3) labels (log g, Teff, [Fe/H]): {'DIST_PC': (n,), 'PLX':
  (n,), …, 'K_ERR': (n,)} float64, noisy, with missing values. Draws from ``rng`` only (the
  survey's spectra use another generator, so adding photometry changes none of them)."""
  labels = np.asarray(labels, np.float64)
  n = len(labels)
  logg, teff = labels[:, 0], labels[:, 1]
  h_band = constants.METADATA_COLUMNS.index('H') - 1  # Index among the 6 magnitudes.
  distance = 10.0 ** ((rng.uniform(*H_RANGE, n) - absolute_magnitudes(logg, teff)[:, h_band])
                      / 5.0 + 1.0)
  true = observables(logg, teff, distance)
  sigma = errors(true)
  values = true + rng.normal(size=true.shape) * sigma
  u = rng.uniform(size=(n, 4))
  missing = np.zeros(true.shape, bool)
  missing[:, :4] |= (u[:, :1] < P_NO_GAIA)
  missing[:, 2] |= u[:, 1] < P_NO_BP_RP
  missing[:, 3] |= u[:, 2] < P_NO_BP_RP
  # At most one 2MASS band missing per star, each with probability P_NO_2MASS_BAND.
  no_2mass = np.zeros(true.shape, bool)
  no_2mass[np.arange(n), 4 + rng.integers(0, 3, n)] = u[:, 3] < 3 * P_NO_2MASS_BAND
  values[missing] = np.nan
  sigma[missing | no_2mass] = np.nan
  values[no_2mass] = CATALOGUE_MISSING
  out = {'DIST_PC': distance}
  for j, (name, err) in enumerate(zip(constants.METADATA_COLUMNS, constants.METADATA_ERR_COLUMNS,
                                      strict=True)):
    out[name], out[err] = values[:, j], sigma[:, j]
  return out
