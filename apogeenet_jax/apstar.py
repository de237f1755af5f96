"""Read SDSS APOGEE apStar / asStar files (DR13 r6, DR14 r8 and later layouts) with astropy.

HDU layout (paper §2.1; docs/paper_facts.md, "Input spectra"): 0 header only, 1 flux (1e-17 erg/s/cm²/Å), 2 flux error,
3 pixel bitmask, 4-9 sky, telluric, LSF, RV table. With NVISITS > 1 each image HDU has NVISITS+2
rows and row 0 is the pixel-weighted combined spectrum; with one visit it is a 1-D array.

Values are returned raw (no preprocessing: that is `preprocessing.py`'s job) as native-endian
float32. Bad pixels are reported in `bad_pixels`, never hidden. Every problem with a file raises
`ApStarError` whose message starts with the file path. NumPy + astropy only: no JAX here.
"""

import dataclasses
import gzip
import io
import os
import pathlib
import re
import warnings

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from apogeenet_jax import constants, file_io
from apogeenet_jax.constants import BAD_PIXEL_ERROR

# The common grid must match to well below one pixel over 8575 pixels.
_GRID_TOLERANCE = 1e-9
# `apStar-<reduction>-<APOGEE ID>.fits[.gz]`, `asStar-…` for the southern (LCO) telescope.
# The ID itself may contain '-' (2M17334253-1654573), the reduction tag does not.
APSTAR_FILENAME = re.compile(r'^(?:apStar|asStar)-(?P<reduction>[^-]+)-(?P<apogee_id>.+?)'
                             r'\.fits(?:\.gz)?$')
_FLUX_HDU, _ERROR_HDU, _MASK_HDU = 1, 2, 3
# The rules a spectrum must pass to be trained on or predicted (ours; the build and inference
# apply the same ones, ``spectrum_problem``). Largest |flux| (1e-17 erg/s/cm²/Å): real apStar flux
# is orders of magnitude below it; 3e38 in a few pixels overflows the gradient norm, and ×1e28
# leaves the Monte Carlo draws no effect in float32.
FLUX_LIMIT = 1e10
# Smallest median of the good pixels: real files have ~15 to ~15,000; at 1e-30 the float32
# Jacobian of the linear σ overflows, and a raw-flux network sees a constant input.
FLUX_LEVEL_MIN = 1e-3
# Fewest good pixels with positive flux (of 8575; real files have ~7,700): the flux level is the
# median of these, and with a handful the input is constant and the MC cannot move it.
MIN_POSITIVE_PIXELS = 1000
# The most one apStar file may hold, on disk and after gunzip (ours): a real file with 300
# visits is ~80 MB. Bounds a reader's memory and time; a larger file is skipped with the reason.
MAX_FILE_BYTES = 1 << 30


class ApStarError(ValueError):
  """An apStar file cannot be read as an 8575-pixel APOGEE spectrum. Message starts with path."""


@dataclasses.dataclass(frozen=True)
class ApStarSpectrum:
  """The combined spectrum of one apStar file, raw values, native-endian.

  Attributes:
    path: the file read.
    apogee_id: header OBJID (or APOGEE_ID), else the ID from the file name.
    flux: (8575,) float32, 1e-17 erg/s/cm²/Å, combined spectrum (HDU1 row 0).
    flux_err: (8575,) float32, same units (HDU2 row 0).
    mask: (8575,) int32 apStar pixel bitmask (HDU3 row 0; zeros if the HDU is absent).
    wavelength: (8575,) float64 Å, vacuum, 10**(CRVAL1 + CDELT1 * i).
    ra, dec: degrees J2000 (NaN if absent).
    snr: header SNR, the median S/N of the combined spectrum (NaN if absent).
    nvisits: number of visits combined.
    telescope: TELESCOP ('apo25m', 'lco25m', 'apo1m', …).
    field: FIELD.
    bad_pixels: (8575,) bool, flux == 0 with error == 1e10, non-finite flux or error, or a
      negative error.
  """
  path: str
  apogee_id: str
  flux: np.ndarray
  flux_err: np.ndarray
  mask: np.ndarray
  wavelength: np.ndarray
  ra: float
  dec: float
  snr: float
  nvisits: int
  telescope: str
  field: str
  bad_pixels: np.ndarray

  @property
  def n_bad_pixels(self) -> int:
    return int(np.count_nonzero(self.bad_pixels))


def find_apstar_files(directory: str | os.PathLike) -> list[str]:
  """All apStar-*/asStar-* .fits[.gz] files below `directory` (recursive), sorted, each once."""
  return scan_apstar_files(directory)[0]


def scan_apstar_files(directory: str | os.PathLike) -> tuple[list[str], list[str]]:
  """(apStar files, near misses) below `directory`: each real file once, symlink loops cut.

  Directory symlinks are followed (surveys are often assembled from links to other disks), but
  a directory or file whose real path was already seen is not visited again: a link back to a
  parent would otherwise repeat its stars or never end. Near misses are files named like an
  apStar file (apstar…/asstar…, any case) that APSTAR_FILENAME does not match, e.g.
  `apStar-2M01.fits` or `apstar-r8-2M01.fits.bz2`: the caller reports them instead of dropping
  them silently.
  """
  root = pathlib.Path(directory)
  if not root.is_dir():
    raise ApStarError(f'{root}: not a directory')
  found, near_misses = [], []
  seen_dirs, seen_files = set(), set()
  stack = [os.fspath(root)]
  while stack:  # Depth first, children sorted: the first path to a real directory wins.
    dirpath = stack.pop()
    real_dir = os.path.realpath(dirpath)
    if real_dir in seen_dirs:
      continue
    seen_dirs.add(real_dir)
    try:
      entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
    except OSError:  # Unreadable folder: skipped, as os.walk does.
      continue
    subdirs = []
    for entry in entries:
      if entry.is_dir():  # Follows symlinks.
        subdirs.append(entry.path)
      elif APSTAR_FILENAME.match(entry.name):
        # scandir knows the link status without a system call: realpath only for links, so a
        # survey-sized tree costs one realpath per folder, not per file.
        real = (os.path.realpath(entry.path) if entry.is_symlink()
                else os.path.join(real_dir, entry.name))
        if real not in seen_files:
          seen_files.add(real)
          found.append(entry.path)
      elif entry.name.lower().startswith(('apstar', 'asstar')):
        near_misses.append(entry.path)
    stack.extend(reversed(subdirs))
  return sorted(found), sorted(near_misses)


def apogee_id_from_filename(path: str | os.PathLike) -> str | None:
  """'…/apStar-r8-2M03290406+3117075.fits' → '2M03290406+3117075'; None if not that form."""
  match = APSTAR_FILENAME.match(os.path.basename(os.fspath(path)))
  return match.group('apogee_id') if match else None


def wavelength_grid(crval1: float = constants.LOG10_WAVE_START,
                    cdelt1: float = constants.LOG10_WAVE_STEP,
                    nwave: int = constants.N_PIXELS) -> np.ndarray:
  """(nwave,) float64 vacuum wavelengths in Å of the log-linear apStar grid."""
  return 10.0 ** (crval1 + cdelt1 * np.arange(nwave, dtype=np.float64))


def bad_pixel_mask(flux: np.ndarray, flux_err: np.ndarray) -> np.ndarray:
  """(…, 8575) bool: the apStar bad-pixel convention (flux 0, error 1e10), non-finite values or
  a negative error (``preprocessing.bad_pixels``: bad for the flux and the error alike)."""
  flux = np.asarray(flux)
  flux_err = np.asarray(flux_err)
  with np.errstate(invalid='ignore'):
    flagged = (flux == 0) & (flux_err >= BAD_PIXEL_ERROR)
    return flagged | ~np.isfinite(flux) | ~np.isfinite(flux_err) | (flux_err < 0)


def spectrum_problem(flux: np.ndarray, flux_err: np.ndarray) -> str | None:
  """Why a raw (8575,) spectrum cannot give a prediction the data support, or None.

  The one set of rules of the build (such files are skipped) and of inference (such stars are
  skipped with the reason): any |flux| above FLUX_LIMIT (inf included), fewer than
  MIN_POSITIVE_PIXELS good pixels with positive flux, or a median good-pixel flux that is not
  positive or below FLUX_LEVEL_MIN. Good pixels: not ``bad_pixel_mask``.
  """
  flux = np.asarray(flux, np.float32)
  with np.errstate(invalid='ignore'):
    absurd = np.abs(flux) > FLUX_LIMIT
  if absurd.any():
    return (f'{int(absurd.sum())} pixel(s) with |flux| above {FLUX_LIMIT:g}, e.g. '
            f'{float(flux[absurd][0]):g} at pixel {int(np.flatnonzero(absurd)[0])}: not a real '
            'spectrum')
  good = flux[~bad_pixel_mask(flux, flux_err)]
  positive = int(np.count_nonzero(good > 0))
  if positive < MIN_POSITIVE_PIXELS:
    return (f'{positive} good pixel(s) with positive flux (of {good.size} good), fewer than '
            f'{MIN_POSITIVE_PIXELS}: too little spectrum for a prediction')
  level = float(np.median(good))
  if not level >= FLUX_LEVEL_MIN:
    return (f'median good-pixel flux {level:.3g} is {"not positive" if level <= 0 else "below"}'
            f'{"" if level <= 0 else f" {FLUX_LEVEL_MIN:g}"}: not a real spectrum\'s flux level')
  return None


def _header_value(header: fits.Header, keys: tuple[str, ...], default=None):
  for key in keys:
    if key in header and header[key] is not None and not isinstance(header[key],
                                                                     fits.card.Undefined):
      return header[key]
  return default


def _as_float(value) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return float('nan')


def _combined_row(path: str, hdul: fits.HDUList, index: int, what: str,
                  nvisits: int | None) -> np.ndarray:
  """Row 0 of a 2-D image HDU, or the 1-D array itself, as a native-endian array."""
  try:
    data = hdul[index].data
  except IndexError:
    raise ApStarError(f'{path}: missing HDU{index} ({what}); apStar files have 10 HDUs') from None
  if data is None:
    raise ApStarError(f'{path}: HDU{index} ({what}) holds no data')
  if data.ndim == 2:
    # NVISITS > 1: rows are [pixel-weighted combined, global-weighted combined, visits…].
    if nvisits is not None and nvisits > 1 and data.shape[0] != nvisits + 2:
      raise ApStarError(f'{path}: HDU{index} ({what}) has {data.shape[0]} rows, expected '
                        f'NVISITS + 2 = {nvisits + 2}')
    data = data[0]
  elif data.ndim != 1:
    raise ApStarError(f'{path}: HDU{index} ({what}) has shape {data.shape}, expected 1-D or 2-D')
  if data.shape[0] != constants.N_PIXELS:
    raise ApStarError(f'{path}: HDU{index} ({what}) has {data.shape[0]} pixels, expected '
                      f'{constants.N_PIXELS}')
  return np.array(data)  # Copy: detaches from the file and the FITS big-endian buffer.


def _check_grid(path: str, header: fits.Header) -> tuple[float, float, int]:
  crval1 = _header_value(header, ('CRVAL1',))
  cdelt1 = _header_value(header, ('CDELT1',))
  nwave = _header_value(header, ('NWAVE', 'NAXIS1'))
  if crval1 is None or cdelt1 is None or nwave is None:
    raise ApStarError(f'{path}: no wavelength grid in the header (CRVAL1/CDELT1/NWAVE missing)')
  if int(nwave) != constants.N_PIXELS:
    raise ApStarError(f'{path}: NWAVE = {nwave}, expected {constants.N_PIXELS}: not the apStar '
                      'combined-spectrum grid')
  if (abs(float(crval1) - constants.LOG10_WAVE_START) > _GRID_TOLERANCE
      or abs(float(cdelt1) - constants.LOG10_WAVE_STEP) > _GRID_TOLERANCE * 1e-3):
    raise ApStarError(f'{path}: wavelength grid CRVAL1 = {crval1}, CDELT1 = {cdelt1}, expected '
                      f'{constants.LOG10_WAVE_START}, {constants.LOG10_WAVE_STEP}')
  return float(crval1), float(cdelt1), int(nwave)


def _bounded_source(path: str):
  """What fits.open reads: the path, or for a .gz file its contents, decompressed up to
  MAX_FILE_BYTES (a small gzip can expand without bound). Only regular files of at most
  MAX_FILE_BYTES are opened at all: nothing else is (``file_io.regular_file_problem``)."""
  if problem := file_io.regular_file_problem(path, MAX_FILE_BYTES):
    raise ApStarError(f'{path}: {problem}')
  if not path.endswith('.gz'):
    return path
  with gzip.open(path, 'rb') as f:
    data = f.read(MAX_FILE_BYTES + 1)
  if len(data) > MAX_FILE_BYTES:
    raise ApStarError(f'{path}: decompresses to more than {MAX_FILE_BYTES} bytes, the limit for '
                      'one file')
  return io.BytesIO(data)


def read_apstar(path: str | os.PathLike) -> ApStarSpectrum:
  """Reads the combined spectrum and metadata of one apStar file.

  Only regular files (after following links) of at most MAX_FILE_BYTES (also after gunzip) are
  opened: a link to /dev/zero or a FIFO is refused before it is opened.

  Raises:
    ApStarError: not a regular file, too large, not FITS, truncated, HDUs missing, wrong grid,
      or all pixels bad.
  """
  path = os.fspath(path)
  try:
    # Truncated files only warn in astropy; make that an error so a half-written file never
    # yields a spectrum padded with zeros.
    with warnings.catch_warnings():
      warnings.simplefilter('error', AstropyUserWarning)
      warnings.simplefilter('error', fits.verify.VerifyWarning)
      with fits.open(_bounded_source(path), memmap=False, lazy_load_hdus=True) as hdul:
        header = hdul[0].header
        nvisits = _header_value(header, ('NVISITS',))
        nvisits = int(nvisits) if nvisits is not None else None
        flux_header = hdul[_FLUX_HDU].header if len(hdul) > _FLUX_HDU else header
        # DR13/DR14 carry the grid in HDU0 (NWAVE) and HDU1 (NAXIS1); later ones at least in HDU1.
        grid_header = header if 'CRVAL1' in header else flux_header
        crval1, cdelt1, nwave = _check_grid(path, grid_header)
        flux = _combined_row(path, hdul, _FLUX_HDU, 'flux', nvisits)
        flux_err = _combined_row(path, hdul, _ERROR_HDU, 'flux error', nvisits)
        if len(hdul) > _MASK_HDU and hdul[_MASK_HDU].data is not None:
          mask = _combined_row(path, hdul, _MASK_HDU, 'pixel mask', nvisits)
        else:
          mask = np.zeros(constants.N_PIXELS, np.int32)
  except ApStarError:
    raise
  except FileNotFoundError:
    raise ApStarError(f'{path}: no such file') from None
  except (OSError, ValueError, TypeError, IndexError, KeyError, EOFError, Warning) as e:
    # astropy raises OSError for "not FITS"/empty files, warnings-as-errors for truncation.
    raise ApStarError(f'{path}: not a readable FITS file ({type(e).__name__}: {e})') from e

  if not np.issubdtype(flux.dtype, np.floating) or not np.issubdtype(flux_err.dtype,
                                                                     np.floating):
    raise ApStarError(f'{path}: flux/error HDUs hold {flux.dtype}/{flux_err.dtype}, not floats')
  flux = flux.astype(np.float32)  # astype: big-endian FITS → native float32.
  flux_err = flux_err.astype(np.float32)
  bad = bad_pixel_mask(flux, flux_err)
  if bad.all():
    raise ApStarError(f'{path}: all {constants.N_PIXELS} pixels are bad (flux 0 with error 1e10, '
                      'or non-finite)')

  apogee_id = _header_value(header, ('OBJID', 'APOGEE_ID', 'APOGEEID'))
  apogee_id = str(apogee_id).strip() if apogee_id else apogee_id_from_filename(path)
  if not apogee_id:
    raise ApStarError(f'{path}: no APOGEE ID in the header (OBJID) or the file name')
  return ApStarSpectrum(
      path=path,
      apogee_id=apogee_id,
      flux=flux,
      flux_err=flux_err,
      mask=mask.astype(np.int32),
      wavelength=wavelength_grid(crval1, cdelt1, nwave),
      ra=_as_float(_header_value(header, ('RA',))),
      dec=_as_float(_header_value(header, ('DEC',))),
      snr=_as_float(_header_value(header, ('SNR',))),
      nvisits=int(nvisits) if nvisits is not None else 1,
      telescope=str(_header_value(header, ('TELESCOP',), '')).strip(),
      field=str(_header_value(header, ('FIELD',), '')).strip(),
      bad_pixels=bad,
  )
