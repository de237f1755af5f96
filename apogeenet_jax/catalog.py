"""The output catalogue (paper Table 4, §3.6, §4): an astropy Table written as FITS and CSV.

Columns (units in each column's ``unit``, meaning in its ``description``):
  APOGEE_ID, RA, DEC (J2000, deg),
  LOGG, LOGG_PRED, LOGG_ERR, LOGG_ERR_NOISE, LOGG_ERR_MODEL (dex), the same for TEFF (K) and
  FE_H (dex) — label; prediction (mean over ensemble members and MC draws); the total σ,
  calibrated on the dev split when the checkpoint carries a calibration (``calibration``), else
  raw; σ_noise, the spread of the MC noise draws (averaged over members); σ_model, the spread of
  the members' means. Raw total = sqrt(σ_noise² + σ_model²). Labels masked (empty) for
  unlabelled stars, σ masked when no Monte Carlo was run (``--mc=0``), σ_model masked for a
  single network (no ensemble: model error unmeasured, only the calibration's floor covers it).
  With ``--uncertainty=linear`` the prediction is the noiseless forward pass and σ_noise the
  first-order propagation of the errors; the header keyword SIGMA ('mc', 'linear', 'none') and the
  column descriptions say which.
  SNR, DATA_SET ('Train'/'Dev'/'Test' or empty), DATA_TYPE ('Payne'/'MStar'/'YSO' or empty),
  FILE (the apStar file: one star observed in several files appears once per file).
Flags, all defined here and nowhere else:
  FLAG_TEFF_GT_6700        TEFF_PRED > 6700 K: the paper leaves these out of its catalogue
                           (edge effect near the 8000 K grid limit, §3.6).
  FLAG_LOW_SNR_UNPHYSICAL  SNR < LOW_SNR and a prediction outside PHYSICAL_RANGES (or non-finite):
                           the paper removes "S/N ≈ 0 with unphysical parameters" (§3.6); the
                           thresholds are ours, the paper gives none.
  YSO_CANDIDATE            (TEFF_PRED, LOGG_PRED) inside the triangle (2200 K, 4.4),
                           (4500 K, 3.9), (3200 K, 1.7), boundary included (§4).
  AGE_BIN                  log g age proxy of YSO candidates (§4): 0 log g < 3.6 (~1 Myr),
                           1 3.6–3.8 (1–2 Myr), 2 3.8–4.0 (2–3 Myr), 3 4.0–4.2 (3–5 Myr),
                           4 ≥ 4.2 (≥ 5 Myr); −1 for stars that are not YSO candidates.
                           Lower edges belong to the bin above (log g = 3.6 is bin 1).
  FLAG_NO_PHOTOMETRY       only for a network that reads photometry (APOGEE Net II): the star
                           had no usable photometric value (no row in the --metadata table, or
                           every value missing), so it was predicted from its spectrum and the
                           network's replacement values; it is kept, not dropped.
The CSV is ECSV (comma-separated, with a commented YAML header carrying units and descriptions):
read it with ``Table.read(path, format='ascii.ecsv')`` or ``pandas.read_csv(path, comment='#')``.
"""

import os
import warnings
from collections.abc import Sequence

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.table import MaskedColumn, Table

from apogeenet_jax import file_io, uncertainty
from apogeenet_jax.constants import LABEL_NAMES, LABEL_UNITS, SPLITS

# §3.6: stars hotter than this are left out of the published catalogue.
TEFF_CATALOG_MAX = 6700.0
# §4: YSO candidate region in (Teff [K], log g [dex]).
YSO_TRIANGLE = ((2200.0, 4.4), (4500.0, 3.9), (3200.0, 1.7))
# §4: log g bin edges of the age proxy and what each bin means.
AGE_BIN_EDGES = (3.6, 3.8, 4.0, 4.2)
NOT_AGE_BINNED = -1
# §3.6 says "S/N ≈ 0 and unphysical parameters" without numbers; these are ours.
LOW_SNR = 1.0
PHYSICAL_RANGES = {'LOGG': (-1.0, 6.0), 'TEFF': (2000.0, 10000.0), 'FE_H': (-3.0, 1.5)}

# What produced *_PRED and *_ERR (header keyword SIGMA) → their column descriptions (the
# estimators' own: ``uncertainty.SIGMA_SOURCES``).
SIGMA_SOURCES = {name: (e.pred_desc, e.err_desc)
                 for name, e in uncertainty.SIGMA_SOURCES.items()}
FLAG_COLUMNS = ('FLAG_TEFF_GT_6700', 'FLAG_LOW_SNR_UNPHYSICAL', 'YSO_CANDIDATE', 'AGE_BIN')
# DATA_SET column: the split's name capitalised ('train' → 'Train').
DATA_SET_NAMES = {s: s.capitalize() for s in SPLITS}
_UNITS = {'dex': u.dex, 'K': u.K}
# How a unit FITS cannot hold ends a FITS column description (TCOMMn).
_UNIT_NOTE = ' [unit: {}]'
_LABEL_DESC = {'LOGG': 'surface gravity log g', 'TEFF': 'effective temperature',
               'FE_H': 'metallicity [Fe/H]'}


class CatalogError(RuntimeError):
  """A catalogue cannot be built or written."""


def in_yso_triangle(teff, logg) -> np.ndarray:
  """True where (teff [K], logg [dex]) lies inside YSO_TRIANGLE or on its edges (§4)."""
  teff = np.asarray(teff, dtype=np.float64)
  logg = np.asarray(logg, dtype=np.float64)
  # Log g spans ~3 dex against Teff's ~2300 K: compare edge sides in units scaled to each axis.
  x, y = teff / 1000.0, logg
  (x1, y1), (x2, y2), (x3, y3) = [(a / 1000.0, b) for a, b in YSO_TRIANGLE]

  def side(ax, ay, bx, by):
    return (bx - ax) * (y - ay) - (by - ay) * (x - ax)

  s1, s2, s3 = side(x1, y1, x2, y2), side(x2, y2, x3, y3), side(x3, y3, x1, y1)
  eps = 1e-12
  inside = ((s1 >= -eps) & (s2 >= -eps) & (s3 >= -eps)) | ((s1 <= eps) & (s2 <= eps) & (s3 <= eps))
  return inside & np.isfinite(x) & np.isfinite(y)


def age_bin(logg) -> np.ndarray:
  """log g [dex] → age-proxy bin 0…4 (meanings: the AGE_BIN description), NOT_AGE_BINNED if NaN."""
  logg = np.asarray(logg, dtype=np.float64)
  bins = np.digitize(logg, AGE_BIN_EDGES, right=False)
  return np.where(np.isfinite(logg), bins, NOT_AGE_BINNED).astype(np.int16)


def compute_flags(pred: np.ndarray, snr: np.ndarray) -> dict[str, np.ndarray]:
  """Flag columns from predictions (n, 3) native units in LABEL_NAMES order and S/N (n,)."""
  pred = np.asarray(pred, dtype=np.float64)
  snr = np.asarray(snr, dtype=np.float64)
  logg, teff = pred[:, LABEL_NAMES.index('LOGG')], pred[:, LABEL_NAMES.index('TEFF')]
  unphysical = ~np.all(np.isfinite(pred), axis=1)
  for j, name in enumerate(LABEL_NAMES):
    lo, hi = PHYSICAL_RANGES[name]
    with np.errstate(invalid='ignore'):
      unphysical |= (pred[:, j] < lo) | (pred[:, j] > hi)
  with np.errstate(invalid='ignore'):
    low_snr = ~(snr >= LOW_SNR)  # NaN S/N counts as low
    hot = teff > TEFF_CATALOG_MAX
  yso = in_yso_triangle(teff, logg)
  return {
      'FLAG_TEFF_GT_6700': hot,
      'FLAG_LOW_SNR_UNPHYSICAL': low_snr & unphysical,
      'YSO_CANDIDATE': yso,
      'AGE_BIN': np.where(yso, age_bin(logg), NOT_AGE_BINNED).astype(np.int16),
  }


def build_catalog(*, apogee_id: Sequence[str], ra, dec, pred, pred_err, snr, labels=None,
                  data_set: Sequence[str] | None = None,
                  data_type: Sequence[str] | None = None, pred_err_noise=None,
                  pred_err_model=None, calibrated: bool = False, sigma: str = 'mc',
                  file: Sequence[str] | None = None, no_photometry=None) -> Table:
  """The Table 4 catalogue plus flags.

  Args:
    apogee_id: (n,) 2MASS-style identifiers.
    ra, dec: (n,) J2000 degrees.
    pred, pred_err: (n, 3) mean and total σ in native units, LABEL_NAMES order (σ NaN: not run).
    pred_err_noise, pred_err_model: optional (n, 3) σ_noise and σ_model (NaN: not measured);
      the _ERR_NOISE column defaults to ``pred_err``, _ERR_MODEL to empty.
    calibrated: whether ``pred_err`` is the dev-calibrated σ (it says so in the description).
    snr: (n,) S/N from the apStar header.
    labels: (n, 3) native units with NaN rows for unlabelled stars, or None (all unlabelled).
    data_set: (n,) 'train'/'dev'/'test' (or the capitalised names, or '' when unlabelled).
    data_type: (n,) 'Payne'/'MStar'/'YSO' or ''.
    sigma: what produced pred and pred_err, one of SIGMA_SOURCES; in the column descriptions
      and the header keyword SIGMA.
    file: (n,) the apStar file of each row (as given, or relative to the data set's manual_dir),
      so one star observed in several files can be told apart; '' where unknown.
    no_photometry: (n,) bool for a network that reads photometry (APOGEE Net II): the star had
      no usable photometric value; adds the column FLAG_NO_PHOTOMETRY (absent otherwise).
  """
  if sigma not in SIGMA_SOURCES:
    raise CatalogError(f'sigma must be one of {tuple(SIGMA_SOURCES)}, got {sigma!r}')
  pred_desc, err_desc = SIGMA_SOURCES[sigma]
  n = len(apogee_id)
  pred = _per_label(pred, n)
  pred_err = _per_label(pred_err, n)
  labels = _per_label(labels, n)
  noise = pred_err if pred_err_noise is None else _per_label(pred_err_noise, n)
  model = _per_label(pred_err_model, n)
  total_desc = ('total uncertainty calibrated on the dev split, sqrt((a*sigma)^2 + b^2) of '
                'sigma = sqrt(NOISE^2 + MODEL^2), floor b constant or a function of the '
                'predicted labels (metrics.json run.calibration)' if calibrated else
                'total uncertainty sqrt(NOISE^2 + MODEL^2), not calibrated')
  t = Table()
  t['APOGEE_ID'] = np.asarray([str(s) for s in apogee_id], dtype=str)
  t['APOGEE_ID'].description = '2MASS identifier of the star'
  for name, val, desc in (('RA', ra, 'right ascension (J2000)'),
                          ('DEC', dec, 'declination (J2000)')):
    t[name] = MaskedColumn(np.asarray(val, dtype=np.float64), unit=u.deg, description=desc)
    t[name].mask = ~np.isfinite(t[name].data.data)
  for j, (name, unit) in enumerate(zip(LABEL_NAMES, LABEL_UNITS, strict=True)):
    what = _LABEL_DESC[name]
    for suffix, arr, desc in (('', labels[:, j], f'{what}: reference label (empty: unlabelled)'),
                              ('_PRED', pred[:, j], f'{what}: APOGEE Net, {pred_desc}'),
                              ('_ERR', pred_err[:, j], f'{what}: {total_desc} (empty: no sigma)'),
                              ('_ERR_NOISE', noise[:, j], f'{what}: {err_desc}'),
                              ('_ERR_MODEL', model[:, j],
                               f'{what}: std of the ensemble members\' means '
                               '(empty: a single network)')):
      col = name + suffix
      t[col] = MaskedColumn(arr, mask=~np.isfinite(arr), unit=_UNITS[unit], description=desc)
  t['SNR'] = MaskedColumn(np.asarray(snr, dtype=np.float64), description='S/N of the spectrum')
  t['SNR'].mask = ~np.isfinite(t['SNR'].data.data)
  t['DATA_SET'] = np.asarray([DATA_SET_NAMES.get(s, s) for s in _texts(data_set, n)],
                             dtype='U5')
  t['DATA_SET'].description = 'Train/Dev/Test split of the labelled set; empty: unlabelled'
  t['DATA_TYPE'] = np.asarray(_texts(data_type, n), dtype='U5')
  t['DATA_TYPE'].description = 'label source Payne/MStar/YSO; empty: unlabelled'
  t['FILE'] = np.asarray(_texts(file, n), dtype=str)
  t['FILE'].description = 'apStar file of the spectrum (data set: relative to its manual_dir)'
  flags = compute_flags(pred, snr)
  for name, desc in (
      ('FLAG_TEFF_GT_6700', f'TEFF_PRED > {TEFF_CATALOG_MAX:g} K: outside the published catalogue'),
      ('FLAG_LOW_SNR_UNPHYSICAL', f'SNR < {LOW_SNR:g} and a prediction outside the physical range'),
      ('YSO_CANDIDATE', 'inside the (Teff, log g) YSO triangle of Olney et al. 2020 sec. 4'),
      ('AGE_BIN', 'YSO log g age bin: 0 ~1 Myr, 1 1-2, 2 2-3, 3 3-5, 4 >=5 Myr; -1 not a YSO')):
    t[name] = flags[name]
    t[name].description = desc
  if no_photometry is not None:
    t['FLAG_NO_PHOTOMETRY'] = np.asarray(no_photometry, bool)
    t['FLAG_NO_PHOTOMETRY'].description = (
        'no usable photometry (no row in the --metadata table, or every value missing): '
        'predicted from the spectrum and the network\'s replacement values')
  t.meta['ORIGIN'] = 'apogeenet-jax'
  t.meta['REFERENC'] = 'Olney et al. 2020, AJ 159, 182'
  t.meta['SIGMA'] = sigma
  return t


def _per_label(values, n: int) -> np.ndarray:
  """(n, 3) float64 in LABEL_NAMES order; None → all NaN (not measured)."""
  if values is None:
    return np.full((n, len(LABEL_NAMES)), np.nan)
  return np.asarray(values, dtype=np.float64).reshape(n, len(LABEL_NAMES))


def _texts(values: Sequence[str] | None, n: int) -> list[str]:
  return [''] * n if values is None else [str(v) for v in values]


def write_fits(table: Table, path: str | os.PathLike) -> None:
  """Writes ``table`` to FITS atomically: units FITS readers parse in TUNITn, descriptions in
  TCOMMn.

  FITS (and astropy's FITS reader) has no 'dex' nor log() units: a logarithmic column (log g,
  [Fe/H] and their σ) gets no TUNIT, and its unit goes at the end of its description
  (``_UNIT_NOTE``), from which ``read_catalog`` restores it. Read with plain astropy, the file
  gives no unit warning.
  """
  hdu = fits.table_to_hdu(_ascii_strings(_without_dex(table)))
  for i, col in enumerate(table.columns.values(), start=1):
    description = col.description or ''
    if col.unit is not None:
      try:
        hdu.header[f'TUNIT{i}'] = col.unit.to_string('fits')
      except ValueError:
        description += _UNIT_NOTE.format(col.unit.to_string())
    if description:
      # FITS headers are ASCII; long comments continue on CONTINUE cards.
      hdu.header[f'TCOMM{i}'] = description.encode('ascii', 'replace').decode()
  try:
    with file_io.atomic_path(path) as tmp:
      fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp, overwrite=True)
  except OSError as e:
    raise CatalogError(f'{path}: cannot write the FITS catalogue: {e}') from e


def write_csv(table: Table, path: str | os.PathLike) -> None:
  """Writes ``table`` as comma-separated ECSV atomically (units and descriptions in the header)."""
  try:
    with file_io.atomic_path(path) as tmp:
      table.write(tmp, format='ascii.ecsv', delimiter=',', overwrite=True)
  except OSError as e:
    raise CatalogError(f'{path}: cannot write the CSV catalogue: {e}') from e


def read_catalog(path: str | os.PathLike) -> Table:
  """Reads a catalogue written by ``write_fits`` or ``write_csv``, with its units and column
  descriptions (FITS: from TCOMMn, and the units FITS cannot hold from them)."""
  path = os.fspath(path)
  if path.endswith('.csv'):
    return Table.read(path, format='ascii.ecsv')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', u.UnitsWarning)  # Files written before TCOMM held 'dex'.
    table = Table.read(path)
  header = fits.getheader(path, 1)
  for i, col in enumerate(table.columns.values(), start=1):
    description = str(header.get(f'TCOMM{i}', ''))
    for unit in ('dex',):
      if description.endswith(_UNIT_NOTE.format(unit)):
        description = description[:-len(_UNIT_NOTE.format(unit))]
        col.unit = u.Unit(unit)
    if col.unit is not None and col.unit.to_string() == 'dex':
      col.unit = u.dex
    if description:
      col.description = description
  return table


def _ascii_strings(table: Table) -> Table:
  """FITS strings are ASCII: a non-ASCII file name is stored with backslash escapes
  ('donn\\xe9es'); the CSV catalogue keeps it as it is."""
  for name in table.colnames:
    col = table[name]
    if col.dtype.kind == 'U' and not all(str(v).isascii() for v in col):
      table[name] = np.asarray([str(v).encode('ascii', 'backslashreplace').decode()
                                for v in col], dtype=str)
      table[name].description = col.description
  return table


def _without_dex(table: Table) -> Table:
  # FITS has no 'dex' unit: astropy refuses it, so it goes into TUNIT by hand after conversion.
  out = table.copy(copy_data=False)
  for col in out.columns.values():
    col.unit = None
  return out
