"""A SYNTHETIC APOGEE survey in the real apStar format: the project's default, self-contained data.

NOT SDSS DATA. Every file says so (TELESCOP = 'SYNTHETIC', FIELD = 'SYNTH…', SYNTHETC = T, IDs
'2M99…', which no 2MASS source has: RA hours only go to 23). The files follow the real layout
(paper §2.1): 10 HDUs, 8575-pixel log-linear grid, 1-D HDUs for one visit and NVISITS+2 rows
otherwise, big-endian float32, flux exactly 0 with error exactly 1e10 at the array ends and the
two chip gaps (edges varying star to star), mask bit 0 there, a few pixels with huge errors.

The forward model makes the labels visible in the RAW flux (the network reads raw flux, §3.1):
  flux = A · R(x) · B_λ(Teff)/B_λ(Teff, 1.6 μm) · exp(−Σ_g s_g(Teff, log g, [Fe/H]) τ_g(λ) − t τ_⊕(λ))
         + noise
with τ_g fixed line templates (metal, molecular, gravity-sensitive, broad hydrogen lines), s_g
smooth label-dependent strengths, and per star: a flux scale A log-uniform over three decades
(10^1.2–10^4.2, as the median fluxes of real apStar files, ~15 to ~15,000), a smooth response
R(x) = 1 + c₁P₁(x) + c₂P₂(x) (Legendre polynomials in the pixel coordinate x ∈ [−1, 1]: flux
calibration and extinction reshape the real continuum star by star, so its slope does not give
Teff away), a telluric-correction residual of strength t on a fixed telluric line template τ_⊕,
and Gaussian noise from the S/N. ``apogeenet_jax.forward_model`` is the same model in JAX (its
Jacobian gives the Cramér–Rao bound, ``cramer_rao``).

Mix (default): 45% Payne-like giants, 15% Payne-like dwarfs, 20% MStar, 20% YSO, so every data
type has dev and test stars. ``--hot_fraction=f`` adds hot OBA-like stars (KIND 'hot', DATA_TYPE
'Payne': APOGEE Net II's hot stars came from Payne-like spectroscopic catalogues; Teff
7,000–20,000 K, hydrogen lines and pressure wings only), the other kinds scaled by 1 − f; at 0
(the default) the survey is bit for bit the one without the option. Labels: catalogue
`labels.fits` (APOGEE_ID, LOGG, TEFF, FE_H, DATA_TYPE, FILE, SNR, NVISITS, KIND, then the
photometry of ``photometry``: DIST_PC, PLX, G, BP, RP, J, H, K and their *_ERR) at the top of the
output directory, the manual_dir layout of tfds_apogee/apogee. The photometry has its own random
stream (seeded from the survey seed and a constant), so the spectra and labels do not depend on it.

  python -m apogeenet_jax.synthetic --output_dir=/tmp/synth [--num_stars=2000] [--seed=0] \
      [--hot_fraction=0.1]
"""

import dataclasses
import functools
import gzip
import os
import pathlib

import numpy as np
from absl import app, flags, logging
from astropy.table import Table

from apogeenet_jax import apstar, constants, photometry

DEFAULT_NUM_STARS = 2000
# Kinds of synthetic star: (name, data type, fraction of the survey).
KINDS = (('giant', 'Payne', 0.45), ('dwarf', 'Payne', 0.15), ('mdwarf', 'MStar', 0.20),
         ('yso', 'YSO', 0.20))
# The hot OBA-like kind of APOGEE Net II's surveys: off by default (write_survey's hot_fraction).
HOT_KIND = ('hot', 'Payne')
# Above this Teff (K; hotter than every default kind, so their spectra are unchanged) metal,
# molecular and CO-like lines fade as exp(−(Teff − onset)/scale): hot stars show hydrogen lines
# and their pressure (Stark) wings only.
HOT_LINE_ONSET, HOT_LINE_SCALE = 6500.0, 1500.0
# The photometry's random stream: default_rng([seed, this]), independent of the spectra's.
_PHOTOMETRY_STREAM = 20220309
TELESCOPE = 'SYNTHETIC'
# The line list is part of the "physics", the same for every survey seed.
_LINE_LIST_SEED = 20200521
# Approximate pixel edges of the real arrays' good ranges (real apStar files: blue chip from
# ~205 to ~3306, green ~3544-6113, red ~6300-8366); each star jitters them.
_CHIP_EDGES = ((205, 3306), (3544, 6113), (6300, 8366))
_EDGE_JITTER = 12
# apStar PIXMASK bits: BADPIX (bit 0) on bad pixels, SIG_SKYLINE (bit 12) on huge-error pixels.
_BADPIX, _SIG_SKYLINE = 1, 1 << 12
# Real spectra have a few finite but huge errors (sky lines): the mean error of the good pixels
# can be 1000x the median. Number of such pixels per star and their factor.
_HUGE_ERROR_PIXELS = (5, 40)
_HUGE_ERROR_FACTOR = (1e2, 1e5)
_H_BAND_CENTRE = 16000.0  # Å: continuum normalisation point.
# The telluric line list, also fixed for every survey.
_TELLURIC_SEED = 20200522
# Per-star nuisances. Flux scale: log10 A ~ U(1.2, 4.2), the ~1000x spread of real median fluxes
# (~15 to ~15,000). Response: Legendre coefficients c1, c2 ~ N(0, σ); real files' chip-to-chip
# flux ratios (blue/green 0.86–1.19, red/green 0.86–1.08 in twelve DR13 stars) vary this much
# beyond what Teff explains. Telluric residual strength t ~ N(0, σ) on the telluric template.
LOG10_SCALE_RANGE = (1.2, 4.2)
RESPONSE_SIGMA = (0.08, 0.05)
TELLURIC_SIGMA = 0.15


@dataclasses.dataclass(frozen=True)
class SyntheticStar:
  apogee_id: str
  kind: str
  data_type: str
  logg: float
  teff: float
  fe_h: float
  snr: float
  nvisits: int
  scale: float  # Continuum flux at 1.6 μm, 1e-17 erg/s/cm²/Å.
  ra: float
  dec: float
  field: str
  response: tuple[float, float] = (0.0, 0.0)  # Legendre coefficients c1, c2 of R(x).
  telluric: float = 0.0  # Strength t of the telluric residual.


def synthetic_id(index: int, seed: int) -> str:
  """'2M99iiiiii+sssssss': 2MASS-like form, hour 99 cannot be a real source."""
  return f'2M99{index:06d}+{seed % 10_000_000:07d}'


def draw_labels(kind: str, rng: np.random.Generator) -> tuple[float, float, float]:
  """(log g dex, Teff K, [Fe/H] dex) for one star of `kind`; plausible ranges per paper §2."""
  if kind == 'giant':  # Red clump / RGB: log g falls with Teff along the giant branch.
    teff = rng.normal(4700, 350)
    teff = float(np.clip(teff, 3700, 5500))
    logg = 2.5 + (teff - 4700) / 500 + rng.normal(0, 0.3)
    fe_h = rng.normal(-0.2, 0.3)
    return float(np.clip(logg, 0.5, 3.7)), teff, float(np.clip(fe_h, -2.0, 0.5))
  if kind == 'dwarf':  # Payne keeps dwarfs only above 4000 K (paper §2.2).
    teff = float(rng.uniform(4300, 6500))
    logg = 4.55 - (teff - 4300) / 2200 * 0.4 + rng.normal(0, 0.12)
    return float(np.clip(logg, 3.8, 4.9)), teff, float(np.clip(rng.normal(-0.1, 0.25), -1.5, 0.5))
  if kind == 'mdwarf':  # Mann et al. 2015 / Hejazi ranges: 2700-4100 K, -0.73 ≤ [Fe/H] ≤ 0.3.
    teff = float(rng.uniform(2800, 4000))
    logg = 4.65 + (4000 - teff) / 1200 * 0.5 + rng.normal(0, 0.06)
    return float(logg), teff, float(rng.uniform(-0.7, 0.3))
  if kind == 'yso':  # Pre-main-sequence: cool, log g 3-4.5 (paper §2.4, §4 triangle).
    teff = float(rng.uniform(2700, 4800))
    logg = float(rng.uniform(3.0, 4.5))
    return logg, teff, float(np.clip(rng.normal(-0.05, 0.1), -0.4, 0.3))
  if kind == 'hot':  # A/B main sequence, log-uniform in Teff (Net II predicts log10 Teff).
    log_teff = rng.uniform(np.log10(7000.0), np.log10(20000.0))
    logg = 4.3 - 0.5 * (log_teff - np.log10(7000.0)) / np.log10(20000 / 7000) + rng.normal(0, 0.2)
    fe_h = float(np.clip(rng.normal(-0.1, 0.2), -1.0, 0.5))
    return float(np.clip(logg, 3.5, 4.5)), float(10.0 ** log_teff), fe_h
  raise ValueError(f'unknown synthetic star kind {kind!r}')


def _planck_shape(wavelength: np.ndarray, teff: float) -> np.ndarray:
  """B_λ(T) normalised to 1 at 1.6 μm: the Teff-dependent continuum slope."""
  c2 = 1.4387769e8  # hc/k in Å·K.
  def planck(lam):
    return lam ** -5 / np.expm1(c2 / (lam * teff))
  return planck(wavelength) / planck(_H_BAND_CENTRE)


@functools.cache
def line_templates() -> np.ndarray:
  """(5, 8575) float32 optical-depth templates τ_g: metal, molecular, gravity (CO-like),
  pressure-broadened (dwarf) and hydrogen (Brackett-like) lines. Fixed for all surveys."""
  rng = np.random.default_rng(_LINE_LIST_SEED)
  pixels = np.arange(constants.N_PIXELS, dtype=np.float64)
  groups = (  # (number of lines, width σ in pixels range, depth range)
      (300, (1.2, 2.0), (0.05, 0.6)),  # metal
      (400, (1.2, 1.8), (0.05, 0.5)),  # molecular (OH, H2O, CN)
      (80, (1.5, 2.5), (0.1, 0.6)),  # gravity-sensitive (strong in giants)
      (40, (4.0, 8.0), (0.1, 0.5)),  # pressure-broadened wings (strong in dwarfs)
      (10, (15.0, 30.0), (0.1, 0.3)),  # hydrogen Brackett-like
  )
  templates = np.zeros((len(groups), constants.N_PIXELS))
  for g, (n, width, depth) in enumerate(groups):
    centres = rng.uniform(0, constants.N_PIXELS, n)
    widths = rng.uniform(*width, n)
    depths = rng.uniform(*depth, n)
    for c, w, d in zip(centres, widths, depths, strict=True):
      lo, hi = int(max(c - 6 * w, 0)), int(min(c + 6 * w + 1, constants.N_PIXELS))
      templates[g, lo:hi] += d * np.exp(-0.5 * ((pixels[lo:hi] - c) / w) ** 2)
  return templates.astype(np.float32)


@functools.cache
def telluric_template() -> np.ndarray:
  """(8575,) float32 optical depth τ_⊕ of telluric lines (H₂O, CO₂-like: denser in the blue chip
  and the red end), fixed for all surveys. A star's residual of the telluric correction is t·τ_⊕,
  t of either sign (under- or over-correction)."""
  rng = np.random.default_rng(_TELLURIC_SEED)
  pixels = np.arange(constants.N_PIXELS, dtype=np.float64)
  centres = np.concatenate([rng.uniform(0, 3300, 90), rng.uniform(3300, 6300, 30),
                            rng.uniform(6300, constants.N_PIXELS, 80)])
  widths = rng.uniform(1.0, 2.0, len(centres))
  depths = rng.uniform(0.05, 0.5, len(centres))
  template = np.zeros(constants.N_PIXELS)
  for c, w, d in zip(centres, widths, depths, strict=True):
    lo, hi = int(max(c - 6 * w, 0)), int(min(c + 6 * w + 1, constants.N_PIXELS))
    template[lo:hi] += d * np.exp(-0.5 * ((pixels[lo:hi] - c) / w) ** 2)
  return template.astype(np.float32)


def pixel_coordinate() -> np.ndarray:
  """(8575,) float64 x ∈ [−1, 1], linear in pixel (= log λ): the response polynomial's variable."""
  return np.linspace(-1.0, 1.0, constants.N_PIXELS)


def response(coefficients) -> np.ndarray:
  """(8575,) float64 smooth multiplicative response R(x) = 1 + c1 P1(x) + c2 P2(x)."""
  return np.polynomial.legendre.legval(pixel_coordinate(), [1.0, *coefficients])


def line_strengths(logg: float, teff: float, fe_h: float) -> np.ndarray:
  """(5,) float64 strengths s_g: smooth, monotonic in each label so each label is visible in the
  flux. ``forward_model.line_strengths`` is the same function in JAX (same piecewise form)."""
  t = teff / 5000.0
  # Exactly 1.0 at and below HOT_LINE_ONSET, so the default kinds' spectra keep every bit.
  fade = np.exp(-max(teff - HOT_LINE_ONSET, 0.0) / HOT_LINE_SCALE)
  metal = 10.0 ** fe_h * max(1.6 - 0.6 * t, 0.1) * 1.5 * fade
  molecular = np.exp(-(teff - 3000.0) / 600.0) * (1.0 + 0.5 * fe_h) * 1.2 * fade
  gravity = (5.2 - logg) / 2.0 * 10.0 ** (0.5 * fe_h) * np.clip(1.5 - 0.5 * t, 0.3, None) * fade
  pressure = np.clip(logg - 2.0, 0.0, None) / 2.5
  hydrogen = np.clip((teff - 3500.0) / 2500.0, 0.0, None) * (0.5 + logg / 9.0)
  return np.array([metal, molecular, gravity, pressure, hydrogen], np.float64)


def model_flux(logg: float, teff: float, fe_h: float, scale: float = 1.0,
               response_coefficients=(0.0, 0.0), telluric: float = 0.0) -> np.ndarray:
  """(8575,) float64 noiseless flux, 1e-17 erg/s/cm²/Å: continuum `scale` at 1.6 μm times the
  response R(x) (Legendre coefficients c1, c2), lines, telluric residual of strength `telluric`."""
  wavelength = apstar.wavelength_grid()
  tau = (line_strengths(logg, teff, fe_h) @ line_templates().astype(np.float64)
         + telluric * telluric_template().astype(np.float64))
  return (scale * response(response_coefficients) * _planck_shape(wavelength, teff)
          * np.exp(-tau))


def bad_pixel_regions(rng: np.random.Generator) -> np.ndarray:
  """(8575,) bool: array ends and two chip gaps, edges jittered per star like the real ones."""
  good = np.zeros(constants.N_PIXELS, bool)
  for lo, hi in _CHIP_EDGES:
    j = rng.integers(-_EDGE_JITTER, _EDGE_JITTER + 1, 2)
    good[lo + j[0]:hi + j[1]] = True
  return ~good


def draw_star(index: int, seed: int, kind: str, data_type: str,
              rng: np.random.Generator) -> SyntheticStar:
  logg, teff, fe_h = draw_labels(kind, rng)
  return SyntheticStar(
      apogee_id=synthetic_id(index, seed), kind=kind, data_type=data_type,
      logg=logg, teff=teff, fe_h=fe_h,
      # Real S/N: median ~100, tail down to ~5 and up to several hundred.
      snr=float(np.clip(rng.lognormal(np.log(80.0), 0.6), 8.0, 500.0)),
      nvisits=int(rng.choice([1, 2, 3, 4], p=[0.4, 0.25, 0.2, 0.15])),
      scale=float(10.0 ** rng.uniform(*LOG10_SCALE_RANGE)),
      ra=float(rng.uniform(0, 360)), dec=float(np.degrees(np.arcsin(rng.uniform(-0.5, 1.0)))),
      field=f'SYNTH{index // 250:03d}',
      response=tuple(float(c) for c in rng.normal(0.0, RESPONSE_SIGMA)),
      telluric=float(rng.normal(0.0, TELLURIC_SIGMA)),
  )


def simulate_rows(star: SyntheticStar, rng: np.random.Generator):
  """Flux, error, mask rows (NVISITS+2, 8575) or (1, 8575), and the achieved median S/N.

  Visits each get noise σ·sqrt(NVISITS); rows 0 and 1 are their mean, with error σ.
  """
  model = model_flux(star.logg, star.teff, star.fe_h, star.scale, star.response, star.telluric)
  bad = bad_pixel_regions(rng)
  # Per-pixel error: constant S/N relative to the continuum level, smooth throughput ripple.
  ripple = 1.0 + 0.25 * np.sin(np.arange(constants.N_PIXELS) / 400.0 + rng.uniform(0, 6.3))
  sigma = model.max() / star.snr * ripple * np.sqrt(np.clip(model / model.max(), 0.05, None))
  n = star.nvisits
  visits = model + rng.normal(0.0, 1.0, (n, constants.N_PIXELS)) * sigma * np.sqrt(n)
  combined = visits.mean(axis=0)
  huge = rng.choice(np.flatnonzero(~bad), rng.integers(*_HUGE_ERROR_PIXELS), replace=False)
  err = sigma.copy()
  err[huge] *= 10.0 ** rng.uniform(*np.log10(_HUGE_ERROR_FACTOR), len(huge))
  mask = np.zeros(constants.N_PIXELS, np.int16)
  mask[huge] |= _SIG_SKYLINE
  mask[bad] |= _BADPIX
  rows_flux = [combined, combined, *visits] if n > 1 else [combined]
  rows_err = [err, err] + [err * np.sqrt(n)] * n if n > 1 else [err]
  flux = np.array(rows_flux, np.float32)
  error = np.array(rows_err, np.float32)
  flux[:, bad] = 0.0
  error[:, bad] = constants.BAD_PIXEL_ERROR
  good = ~bad
  snr = float(np.median(flux[0, good] / error[0, good]))
  return flux, error, np.repeat(mask[None], len(flux), axis=0), snr


# A minimal FITS writer. astropy's writer re-verifies every card (~85 ms per 10-HDU file, most of
# a survey's generation time); these files are simple enough to write directly, and every test
# reads them back with astropy, which is the check that they are valid FITS.
_BLOCK = 2880


def _card(key: str, value=None, comment: str = '') -> bytes:
  if key in ('COMMENT', 'HISTORY', 'END'):
    text = f'{key:<8}{comment}' if key != 'END' else 'END'
    return text[:80].ljust(80).encode('ascii')
  if isinstance(value, bool):
    v = f'{"T" if value else "F":>20}'
  elif isinstance(value, int | np.integer):
    v = f'{int(value):>20d}'
  elif isinstance(value, float | np.floating):
    text = repr(float(value)).upper()
    v = f'{text if ("." in text or "E" in text) else text + ".0":>20}'
  else:
    v = ("'" + str(value).replace("'", "''").ljust(8) + "'").ljust(20)
  text = f'{key:<8}= {v}'
  if comment:
    text += ' / ' + comment
  return text[:80].ljust(80).encode('ascii')


def _header_bytes(cards: list[bytes]) -> bytes:
  data = b''.join(cards) + _card('END')
  return data + b' ' * (-len(data) % _BLOCK)


def _data_bytes(array: np.ndarray) -> bytes:
  data = array.tobytes()
  return data + b'\0' * (-len(data) % _BLOCK)


_BITPIX = {np.dtype('>f4'): -32, np.dtype('>f8'): -64, np.dtype('>i2'): 16, np.dtype('>i4'): 32}


def _image_hdu(array: np.ndarray, bunit: str | None = None, grid: bool = True) -> bytes:
  """An IMAGE extension; (1, 8575) arrays are written 1-D as apStar does for one visit."""
  array = np.asarray(array)
  if array.ndim == 2 and len(array) == 1:
    array = array[0]
  array = array.astype(array.dtype.newbyteorder('>'))  # FITS is big-endian.
  cards = [_card('XTENSION', 'IMAGE', 'IMAGE extension'), _card('BITPIX', _BITPIX[array.dtype]),
           _card('NAXIS', array.ndim)]
  cards += [_card(f'NAXIS{i + 1}', n) for i, n in enumerate(reversed(array.shape))]
  cards += [_card('PCOUNT', 0), _card('GCOUNT', 1)]
  if grid:
    cards += [_card('CRVAL1', constants.LOG10_WAVE_START), _card('CDELT1', constants.LOG10_WAVE_STEP),
              _card('CRPIX1', 1), _card('CTYPE1', 'LOG-LINEAR'), _card('DC-FLAG', 1)]
  if bunit:
    cards.append(_card('BUNIT', bunit))
  return _header_bytes(cards) + _data_bytes(array)


def _bintable_hdu(columns: dict[str, np.ndarray]) -> bytes:
  """A BINTABLE extension of float64 columns (the RV table, HDU9)."""
  names = list(columns)
  rows = np.rec.fromarrays([np.asarray(columns[n], '>f8') for n in names], names=names)
  cards = [_card('XTENSION', 'BINTABLE', 'binary table extension'), _card('BITPIX', 8),
           _card('NAXIS', 2), _card('NAXIS1', 8 * len(names)), _card('NAXIS2', len(rows)),
           _card('PCOUNT', 0), _card('GCOUNT', 1), _card('TFIELDS', len(names))]
  for i, name in enumerate(names):
    cards += [_card(f'TTYPE{i + 1}', name), _card(f'TFORM{i + 1}', 'D')]
  return _header_bytes(cards) + _data_bytes(rows)


def write_apstar(path: str | os.PathLike, star: SyntheticStar, flux: np.ndarray,
                 error: np.ndarray, mask: np.ndarray, snr: float) -> None:
  """Writes one apStar-layout FITS file (10 HDUs); flux/error/mask are (rows, 8575)."""
  primary = [
      _card('SIMPLE', True, 'conforms to FITS standard'), _card('BITPIX', 16),
      _card('NAXIS', 0), _card('EXTEND', True),
      _card('OBJID', star.apogee_id, 'Object ID (SYNTHETIC)'),
      _card('SYNTHETC', True, 'SYNTHETIC spectrum: not SDSS data'),
      _card('TELESCOP', TELESCOPE, 'Telescope (SYNTHETIC)'),
      _card('FIELD', star.field, 'Field name (SYNTHETIC)'),
      _card('RA', star.ra, 'right ascension, deg, J2000'),
      _card('DEC', star.dec, 'declination, deg, J2000'),
      _card('NVISITS', star.nvisits, 'number of visit spectra combined'),
      _card('SNR', snr, 'final median Signal/Noise ratio'),
      _card('SYNKIND', star.kind, 'synthetic star kind'),
      _card('SYNLOGG', star.logg, 'true log g (dex), synthetic'),
      _card('SYNTEFF', star.teff, 'true Teff (K), synthetic'),
      _card('SYNFEH', star.fe_h, 'true [Fe/H] (dex), synthetic'),
      _card('SYNSCALE', star.scale, 'true flux scale A at 1.6 um, synthetic'),
      _card('SYNRESP1', star.response[0], 'true response Legendre c1, synthetic'),
      _card('SYNRESP2', star.response[1], 'true response Legendre c2, synthetic'),
      _card('SYNTELL', star.telluric, 'true telluric residual strength, synthetic'),
      _card('NWAVE', constants.N_PIXELS, 'Number of wavelengths in subsequent HDUs'),
      _card('CRVAL1', constants.LOG10_WAVE_START, 'Start log10(wavelength)'),
      _card('CDELT1', constants.LOG10_WAVE_STEP, 'Dispersion in log10(wavelength)'),
      _card('CRPIX1', 1, 'Pixel of starting wavelength'),
      _card('CTYPE1', 'LOG-LINEAR', 'Logarithmic wavelength scale'),
      _card('COMMENT', comment='SYNTHETIC apStar-format file from apogeenet_jax.synthetic: '
            'not SDSS/APOGEE data.'),
  ]
  sky = np.zeros_like(flux)
  telluric = np.ones_like(flux)
  n = star.nvisits
  parts = [
      _header_bytes(primary),
      _image_hdu(flux, 'Flux (10^-17 erg/s/cm^2/Ang)'),
      _image_hdu(error, 'Err (10^-17 erg/s/cm^2/Ang)'),
      _image_hdu(mask.astype(np.int16), 'Flag Mask (bitwise)'),
      _image_hdu(sky, 'Sky (10^-17 erg/s/cm^2/Ang)'),
      _image_hdu(sky, 'Sky Error (10^-17 erg/s/cm^2/Ang)'),
      _image_hdu(telluric, 'Telluric'),
      _image_hdu(np.zeros_like(telluric), 'Telluric Error'),
      _image_hdu(np.zeros(26, np.float64), grid=False),  # LSF coefficients.
      _bintable_hdu({'VHELIO': np.zeros(n), 'TEFF': np.full(n, star.teff),
                     'LOGG': np.full(n, star.logg), 'FEH': np.full(n, star.fe_h)}),
  ]
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'wb') as f:
    for part in parts:
      f.write(part)


def survey_kinds(hot_fraction: float = 0.0) -> tuple[tuple[str, str, float], ...]:
  """KINDS, or with hot_fraction > 0 the hot kind at that fraction and the others scaled by
  1 − hot_fraction."""
  if not 0.0 <= hot_fraction < 1.0:
    raise ValueError(f'hot_fraction must be in [0, 1), got {hot_fraction}')
  if hot_fraction == 0.0:
    return KINDS
  return (*((n, t, f * (1.0 - hot_fraction)) for n, t, f in KINDS), (*HOT_KIND, hot_fraction))


def write_survey(output_dir: str | os.PathLike, num_stars: int = DEFAULT_NUM_STARS,
                 seed: int = 0, compress: bool = False, show_progress: bool = True,
                 hot_fraction: float = 0.0) -> str:
  """Writes num_stars synthetic apStar files + labels.fits below output_dir (a manual_dir).

  Files go to output_dir/synthetic/<FIELD>/apStar-synth-<ID>.fits[.gz]. Returns the catalogue path.
  hot_fraction: share of hot OBA-like stars (``survey_kinds``); 0 leaves the default mix.
  """
  import tqdm  # Progress bar only; keeps the import out of library users' way.

  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  kinds_table = survey_kinds(hot_fraction)
  names = [k[0] for k in kinds_table]
  data_types = dict((k[0], k[1]) for k in kinds_table)
  # Exact counts per kind (largest remainder), then shuffled, so small surveys keep every type.
  fractions = np.array([k[2] for k in kinds_table])
  counts = np.floor(fractions * num_stars).astype(int)
  counts[np.argsort(-(fractions * num_stars - counts), kind="stable")[:num_stars - counts.sum()]] += 1
  kinds = rng.permutation(np.repeat(names, counts))
  rows = []
  suffix = '.fits.gz' if compress else '.fits'
  for i, kind in enumerate(tqdm.tqdm(kinds, desc='synthetic apStar', disable=not show_progress)):
    star = draw_star(i, seed, str(kind), data_types[str(kind)], rng)
    flux, error, mask, snr = simulate_rows(star, rng)
    relative = pathlib.Path('synthetic') / star.field / f'apStar-synth-{star.apogee_id}{suffix}'
    write_apstar(output_dir / relative, star, flux, error, mask, snr)
    rows.append((star.apogee_id, star.logg, star.teff, star.fe_h, star.data_type, str(relative),
                 snr, star.nvisits, star.kind))
  table = Table(rows=rows, names=('APOGEE_ID', 'LOGG', 'TEFF', 'FE_H', 'DATA_TYPE', 'FILE', 'SNR',
                                  'NVISITS', 'KIND'))
  for name, unit in zip(constants.LABEL_NAMES, constants.LABEL_UNITS, strict=True):
    table[name].unit = None if unit == 'dex' else unit
    table[name].description = f'{name} ({unit}), SYNTHETIC truth'
  _add_photometry(table, seed)
  table.meta['SYNTHETC'] = True
  table.meta['COMMENT'] = ['SYNTHETIC survey from apogeenet_jax.synthetic: not SDSS data.']
  table.meta['SEED'] = seed
  catalog = output_dir / 'labels.fits'
  table.write(catalog, overwrite=True)
  logging.info('Wrote %d SYNTHETIC apStar files and %s', num_stars, catalog)
  return str(catalog)


def _add_photometry(table: Table, seed: int) -> None:
  """DIST_PC (truth) and the noisy PLX … K, PLX_ERR … K_ERR columns of ``photometry.draw``, from
  the photometry's own random stream."""
  labels = np.stack([np.asarray(table[n], np.float64) for n in constants.LABEL_NAMES], -1)
  columns = photometry.draw(labels, np.random.default_rng([seed, _PHOTOMETRY_STREAM]))
  table['DIST_PC'] = columns.pop('DIST_PC')
  table['DIST_PC'].unit = 'pc'
  table['DIST_PC'].description = 'distance (pc), SYNTHETIC truth'
  units = dict(zip(constants.METADATA_COLUMNS, constants.METADATA_UNITS, strict=True))
  for name, values in columns.items():
    table[name] = values
    table[name].unit = units[name.removesuffix('_ERR')]
    table[name].description = (f'{name}, SYNTHETIC; NaN or {photometry.CATALOGUE_MISSING} '
                               'where missing')


def main(argv):
  del argv
  flag_values = flags.FLAGS
  catalog = write_survey(flag_values.output_dir, flag_values.num_stars, flag_values.seed,
                         hot_fraction=flag_values.hot_fraction)
  logging.info('Synthetic survey ready: manual_dir=%s (catalogue %s)', flag_values.output_dir,
               catalog)


def run():
  """Command-line entry point. Flags are defined here, not at import, so that importing this
  library module never clashes with an entry point's own --output_dir / --seed."""
  flags.DEFINE_string('output_dir', None, 'Where to write the synthetic survey (a manual_dir).')
  flags.DEFINE_integer('num_stars', DEFAULT_NUM_STARS, 'Number of synthetic stars.')
  flags.DEFINE_integer('seed', 0, 'Random seed of the survey.')
  flags.DEFINE_float('hot_fraction', 0.0, 'Share of hot OBA-like stars (KIND hot, DATA_TYPE '
                     "Payne), APOGEE Net II's; 0: the default mix, unchanged.")
  flags.mark_flag_as_required('output_dir')
  app.run(main)


if __name__ == '__main__':
  run()
