"""The INPUT label catalogue: read, validate, match rows to apStar files, assign splits.

Catalogue (FITS, CSV or ECSV; read with astropy), one row per star:
  APOGEE_ID  str    2MASS-style ID, unique
  LOGG       float  dex
  TEFF       float  K
  FE_H       float  dex
  DATA_TYPE  str    'Payne', 'MStar' or 'YSO' (paper §2.2-2.4; case-insensitive)
  SPLIT      str    optional: 'train', 'dev' or 'test'; empty = assign from the ID (paper §3)
  FILE       str    optional: apStar path relative to the manual_dir; empty = match by ID
  PLX, G, BP, RP, J, H, K  float  optional photometric "metadata" of APOGEE Net II
             (``constants.METADATA_COLUMNS``: Gaia parallax in mas, magnitudes), and PLX_ERR …
             K_ERR their errors; empty or absent = NaN. 99.999 (catalogues' "missing") is kept as
             given: readers treat values ≥ 98 and non-finite ones as missing.

manual_dir layout: the catalogue as labels.fits, labels.csv or labels.ecsv at the top, apStar
files anywhere below, matched by FILE or by the ID in `apStar-<reduction>-<ID>.fits[.gz]`.
NumPy + astropy only: no JAX here.
"""

import collections
import csv
import dataclasses
import hashlib
import io
import os
import pathlib

import numpy as np
from astropy.table import Table

from apogeenet_jax import apstar, constants, file_io

CATALOG_NAMES = ('labels.fits', 'labels.ecsv', 'labels.csv')
REQUIRED_COLUMNS = ('APOGEE_ID', *constants.LABEL_NAMES, 'DATA_TYPE')
SKIP_REPORT_COLUMNS = ('file', 'apogee_id', 'reason')
# ASPCAP and friends write -9999 for "no value"; such a label must never reach training.
_SENTINEL = -9999.0
# Physical range of each label (ours: wide enough for every star of §2.2–2.4, from brown-dwarf
# boundary M dwarfs to hot stars, giants to dwarfs, the most metal-poor to super-solar). A value
# outside it is a units mix-up or a corrupt row: it would dominate the standardiser and the loss
# (TEFF = 1e30 trains with a Teff mean of 1e28; 1e39 overflows float32).
LABEL_RANGES = {'LOGG': (-1.5, 6.5), 'TEFF': (1000.0, 60000.0), 'FE_H': (-5.0, 2.0)}
# Excel's "CSV UTF-8" starts with a byte-order mark, which astropy would glue to the first name.
_UTF8_BOM = b'\xef\xbb\xbf'


class LabelCatalogError(ValueError):
  """The label catalogue is missing, unreadable or invalid. Message starts with its path."""


@dataclasses.dataclass(frozen=True)
class LabelledStar:
  """One catalogue row. labels: (3,) float32 in LABEL_NAMES order (dex, K, dex)."""
  apogee_id: str
  labels: np.ndarray
  data_type: str
  split: str | None  # From the catalogue's SPLIT column; None = assign_split decides.
  file: str | None  # From the catalogue's FILE column, relative to the manual_dir.
  # (7,) float32 in METADATA_COLUMNS order and their errors; NaN where empty or absent.
  metadata: np.ndarray | None = None
  metadata_err: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Problem:
  """One line of the skip report: which file / row, and why it was left out."""
  file: str
  apogee_id: str
  reason: str


def assign_split(apogee_id: str, data_type: str, seed: int = 0) -> str:
  """Deterministic 'train'/'dev'/'test' for one star with the paper's fractions (§3).

  A hash of (seed, ID) is a uniform draw in [0, 1): the split of a star never depends on which
  other stars are in the catalogue, so adding stars or re-building keeps every split stable.
  """
  if data_type not in constants.SPLIT_FRACTIONS:
    raise ValueError(f'unknown data type {data_type!r}; expected one of {constants.DATA_TYPES}')
  digest = hashlib.sha256(f'{seed}:{apogee_id.strip()}'.encode()).digest()
  u = int.from_bytes(digest[:8], 'big') / 2.0**64
  edges = np.cumsum(constants.SPLIT_FRACTIONS[data_type])
  for split, edge in zip(constants.SPLITS, edges, strict=True):
    if u < edge:
      return split
  return constants.SPLITS[-1]


def find_catalog(manual_dir: str | os.PathLike) -> pathlib.Path:
  """The one labels.{fits,ecsv,csv} at the top of manual_dir."""
  root = pathlib.Path(manual_dir)
  # lexists: a labels.fits that is a link to /dev/zero is found, then refused by name when read.
  found = [root / name for name in CATALOG_NAMES if os.path.lexists(root / name)]
  if not found:
    raise LabelCatalogError(f'{root}: no label catalogue; expected one of {CATALOG_NAMES}')
  if len(found) > 1:
    raise LabelCatalogError(f'{root}: several label catalogues {[p.name for p in found]}; keep one')
  return found[0]


def _column_strings(table: Table, name: str) -> list[str]:
  column = table[name]
  values = []
  for i, v in enumerate(column):
    if np.ma.is_masked(v):
      values.append('')
    elif isinstance(v, bytes):
      values.append(v.decode().strip())
    else:
      values.append(str(v).strip())
    if values[-1] in ('--', 'nan', 'None'):  # Empty CSV cells.
      values[i] = ''
  return values


def read_label_catalog(path: str | os.PathLike) -> list[LabelledStar]:
  """Reads and validates the INPUT label catalogue (the builder's labels.{fits,ecsv,csv}).

  Not ``catalog.read_catalog``, which reads the catalogue of predictions that evaluate.py writes.

  Raises:
    LabelCatalogError: unreadable, missing columns, duplicate IDs, non-finite or -9999 labels,
      labels outside ``LABEL_RANGES`` (naming the rows), unknown DATA_TYPE or SPLIT.
  """
  path = pathlib.Path(path)
  table = _read_table(path)
  # Accept lower-case column names ('apogee_id', 'teff', …) but use the survey's upper case.
  by_upper = {name.upper(): name for name in table.colnames}
  missing = [c for c in REQUIRED_COLUMNS if c not in by_upper]
  if missing:
    raise LabelCatalogError(f'{path}: missing column(s) {missing}; required {REQUIRED_COLUMNS}')
  if len(table) == 0:
    raise LabelCatalogError(f'{path}: the catalogue has no rows')
  ids = _read_ids(path, table, by_upper['APOGEE_ID'])
  labels = _read_labels(path, table, by_upper, ids)
  data_types = _read_data_types(path, _column_strings(table, by_upper['DATA_TYPE']), ids)
  splits = _read_split_column(path, table, by_upper, ids)
  files = _column_strings(table, by_upper['FILE']) if 'FILE' in by_upper else [''] * len(table)
  metadata = _read_optional_columns(path, table, by_upper, constants.METADATA_COLUMNS)
  metadata_err = _read_optional_columns(path, table, by_upper, constants.METADATA_ERR_COLUMNS)
  return [
      LabelledStar(apogee_id=i, labels=labels[k].astype(np.float32), data_type=t,
                   split=s or None, file=f or None, metadata=metadata[k],
                   metadata_err=metadata_err[k])
      for k, (i, t, s, f) in enumerate(zip(ids, data_types, splits, files, strict=True))
  ]


def read_photometry_table(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """APOGEE Net II's photometry for new apStar files (``evaluate.py --metadata``): a table
  (FITS, ECSV or CSV) keyed by APOGEE_ID with any of the columns ``constants.METADATA_COLUMNS``
  and their ``*_ERR``. Returns {APOGEE_ID: (values (7,), errors (7,))} float32, NaN where a
  column is absent or a cell empty; values ≥ 98 are kept as given (the network's rule reads them
  as missing).

  Raises:
    LabelCatalogError: unreadable, no APOGEE_ID or none of the photometry columns, duplicate or
      empty IDs, a non-numeric column.
  """
  path = pathlib.Path(path)
  table = _read_table(path)
  by_upper = {name.upper(): name for name in table.colnames}
  if 'APOGEE_ID' not in by_upper:
    raise LabelCatalogError(f'{path}: no APOGEE_ID column')
  if not set(constants.METADATA_COLUMNS) & set(by_upper):
    raise LabelCatalogError(f'{path}: none of the photometry columns '
                            f'{", ".join(constants.METADATA_COLUMNS)}')
  ids = _read_ids(path, table, by_upper['APOGEE_ID'])
  values = _read_optional_columns(path, table, by_upper, constants.METADATA_COLUMNS)
  errors = _read_optional_columns(path, table, by_upper, constants.METADATA_ERR_COLUMNS)
  return {i: (values[k], errors[k]) for k, i in enumerate(ids)}


def _read_optional_columns(path: pathlib.Path, table: Table, by_upper: dict[str, str],
                           names: tuple[str, ...]) -> np.ndarray:
  """(rows, len(names)) float32 of the optional numeric columns; NaN where empty or absent."""
  values = np.full((len(table), len(names)), np.nan, np.float32)
  for j, name in enumerate(names):
    if name not in by_upper:
      continue
    try:
      values[:, j] = np.ma.filled(np.ma.asarray(table[by_upper[name]], dtype=np.float64), np.nan)
    except (TypeError, ValueError) as e:
      raise LabelCatalogError(f'{path}: column {name} is not numeric ({e})') from e
  return values


def _read_table(path: pathlib.Path) -> Table:
  if (problem := file_io.regular_file_problem(path)) and not problem.startswith('no such'):
    raise LabelCatalogError(f'{path}: {problem}')  # /dev/zero or a FIFO would never end.
  try:
    if path.suffix.lower() in ('.csv', '.ecsv'):
      text_format = 'ascii.ecsv' if path.suffix.lower() == '.ecsv' else 'ascii.csv'
      with open(path, 'rb') as f:
        has_bom = f.read(len(_UTF8_BOM)) == _UTF8_BOM
      # Text given to Table.read is parsed as the table itself, not as a file name.
      return (Table.read(path.read_text(encoding='utf-8-sig'), format=text_format) if has_bom
              else Table.read(path, format=text_format))
    return Table.read(path)
  except FileNotFoundError:
    raise LabelCatalogError(f'{path}: no such file') from None
  except Exception as e:  # astropy raises many types for malformed tables.
    raise LabelCatalogError(f'{path}: cannot read table ({type(e).__name__}: {e})') from e


def _read_ids(path: pathlib.Path, table: Table, column: str) -> list[str]:
  ids = _column_strings(table, column)
  empty = [i for i, s in enumerate(ids) if not s]
  if empty:
    raise LabelCatalogError(f'{path}: empty APOGEE_ID in row(s) {empty[:10]}')
  duplicates = [k for k, n in collections.Counter(ids).items() if n > 1]
  if duplicates:
    raise LabelCatalogError(f'{path}: duplicate APOGEE_ID(s) {sorted(duplicates)[:10]} '
                            f'({len(duplicates)} in all)')
  return ids


def _read_labels(path: pathlib.Path, table: Table, by_upper: dict[str, str], ids: list[str]
                 ) -> np.ndarray:
  """(rows, 3) float64 in LABEL_NAMES order; no row may lack a value or hold -9999."""
  labels = np.empty((len(table), len(constants.LABEL_NAMES)), np.float64)
  for j, name in enumerate(constants.LABEL_NAMES):
    column = table[by_upper[name]]
    try:
      values = np.ma.filled(np.ma.asarray(column, dtype=np.float64), np.nan)
    except (TypeError, ValueError) as e:
      raise LabelCatalogError(f'{path}: column {name} is not numeric ({e})') from e
    bad = ~np.isfinite(values) | (values == _SENTINEL)
    if bad.any():
      rows = np.flatnonzero(bad)
      raise LabelCatalogError(
          f'{path}: {len(rows)} non-finite, empty or -9999 {name} value(s), e.g. '
          f'{[ids[i] for i in rows[:5]]}; remove those rows')
    lo, hi = LABEL_RANGES[name]
    rows = np.flatnonzero((values < lo) | (values > hi))
    if len(rows):
      listed = ', '.join(f'row {i} ({ids[i]}: {values[i]:g})' for i in rows[:5])
      raise LabelCatalogError(
          f'{path}: {len(rows)} {name} outside its physical range [{lo:g}, {hi:g}]: {listed}'
          f'{" …" if len(rows) > 5 else ""}; fix or remove those rows')
    labels[:, j] = values
  return labels


def _read_data_types(path: pathlib.Path, values: list[str], ids: list[str]) -> list[str]:
  canonical_type = {t.lower(): t for t in constants.DATA_TYPES}
  data_types = []
  for star_id, t in zip(ids, values, strict=True):
    if t.lower() not in canonical_type:
      raise LabelCatalogError(f'{path}: APOGEE_ID {star_id}: DATA_TYPE {t!r} is not one of '
                              f'{constants.DATA_TYPES}')
    data_types.append(canonical_type[t.lower()])
  return data_types


def _read_split_column(path: pathlib.Path, table: Table, by_upper: dict[str, str],
                       ids: list[str]) -> list[str]:
  """The SPLIT column in lower case ('' = assign_split decides); all '' when absent."""
  if 'SPLIT' not in by_upper:
    return [''] * len(table)
  splits = [s.lower() for s in _column_strings(table, by_upper['SPLIT'])]
  for star_id, s in zip(ids, splits, strict=True):
    if s and s not in constants.SPLITS:
      raise LabelCatalogError(f'{path}: APOGEE_ID {star_id}: SPLIT {s!r} is not one of '
                              f'{constants.SPLITS} (or empty)')
  return splits


def match_files(stars: list[LabelledStar], manual_dir: str | os.PathLike,
                ) -> tuple[list[tuple[LabelledStar, str]], list[Problem]]:
  """Pairs catalogue rows with apStar files below manual_dir.

  Returns:
    matched: (star, absolute file path) in catalogue order.
    problems: rows without a file, files without a row, extra files for one ID (the first
      in sorted path order is used), FILE paths that leave manual_dir, and files named like
      apStar files that the name pattern does not match, one Problem each, for the skip report.
  """
  root = pathlib.Path(manual_dir).resolve()
  roots = (root, pathlib.Path(os.path.abspath(manual_dir)))
  files_by_id = collections.defaultdict(list)
  found, near_misses = apstar.scan_apstar_files(root)
  for path in found:
    files_by_id[apstar.apogee_id_from_filename(path)].append(path)

  matched, problems, used = [], [], set()
  for star in stars:
    if star.file:
      path = _inside(root, star.file, roots)
      if path is None:
        problems.append(Problem(star.file, star.apogee_id, f'FILE is outside the manual_dir '
                                f'{root}; refused (give a path relative to it)'))
        continue
      if problem := file_io.regular_file_problem(path):
        problems.append(Problem(star.file, star.apogee_id, 'FILE given in the catalogue: '
                                + ('does not exist' if problem.startswith('no such') else problem)))
        used.add(str(path))  # Reported once, for its row, not again as a file without one.
        continue
      matched.append((star, str(path)))
      used.add(str(path))
      continue
    candidates = files_by_id.get(star.apogee_id, [])
    if not candidates:
      problems.append(Problem('', star.apogee_id, 'no apStar file for this catalogue row'))
      continue
    matched.append((star, candidates[0]))
    used.add(candidates[0])
    for extra in candidates[1:]:
      problems.append(Problem(relative_path(extra, root), star.apogee_id,
                              f'another file for this APOGEE_ID was used: '
                              f'{relative_path(candidates[0], root)}'))
      used.add(extra)
  for star_id, paths in sorted(files_by_id.items()):
    for path in paths:
      if path not in used:
        problems.append(Problem(relative_path(path, root), star_id,
                                'no catalogue row for this file'))
  for path in near_misses:
    if path not in used:
      problems.append(Problem(relative_path(path, root), '',
                              'named like an apStar file but not apStar-<reduction>-<APOGEE_ID>'
                              '.fits[.gz] (nor asStar-…): not used; rename it or give it in '
                              'the FILE column'))
  return matched, problems


def _inside(root: pathlib.Path, file: str, roots: tuple[pathlib.Path, ...]
            ) -> pathlib.Path | None:
  """root / file, or None when the catalogue's FILE leads out of root (absolute path, '..').

  The catalogue is data, not configuration: its FILE must not reach /etc/passwd or another
  survey. The check is lexical, so symlinks the owner placed inside manual_dir (data on another
  disk) keep working while a '..' or an absolute path written in the catalogue cannot escape.
  """
  path = pathlib.Path(os.path.normpath(root / file))  # An absolute file replaces root here.
  # roots: manual_dir as given and resolved, for absolute FILEs written either way.
  return path if any(path == r or r in path.parents for r in roots) else None


def relative_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
  """path relative to root when below it, else as given."""
  try:
    return str(pathlib.Path(path).resolve().relative_to(pathlib.Path(root).resolve()))
  except ValueError:
    return os.fspath(path)


def write_problems(problems: list[Problem], path: file_io.PathLike) -> None:
  """Writes the skip report: CSV with header `file,apogee_id,reason`, one line per problem.

  Through ``file_io.atomic_path`` (local or gs://…): a crash never leaves half a report.
  """
  with file_io.atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(SKIP_REPORT_COLUMNS)
    for p in problems:
      writer.writerow((p.file, p.apogee_id, p.reason))


def read_problems(path: file_io.PathLike) -> list[Problem]:
  """Reads a skip report written by write_problems (local or gs://…)."""
  rows = csv.DictReader(io.StringIO(file_io.as_path(path).read_text(), newline=''))
  return [Problem(r['file'], r['apogee_id'], r['reason']) for r in rows]
