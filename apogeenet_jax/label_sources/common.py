"""What every label source shares: its error types, table reading and the cut report.

NumPy + astropy only: no JAX here.
"""

import csv
import dataclasses
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from absl import logging
from astropy.table import Table

from apogeenet_jax import file_io

# Surveys (ASPCAP, the Payne repackaging) write -9999 for "no value" (payne_dr14_columns.txt).
MISSING_VALUE = -9999.0
PROVENANCE_COLUMN = 'PROVENANCE'
CUT_REPORT_COLUMNS = ('source', 'cut', 'removed', 'remaining')


class SourceTableError(ValueError):
  """An input catalogue is missing, unreadable or lacks a column. Message starts with its path."""


class MissingUserDataError(RuntimeError):
  """A relation or grid the paper used is not shipped with this package and was not supplied."""


@dataclasses.dataclass(frozen=True)
class Cut:
  """One line of the cut report: how many rows a cut removed and how many remain."""
  source: str
  cut: str
  removed: int
  remaining: int


def read_table(path: str | os.PathLike) -> Table:
  """A FITS, CSV or ECSV table read with astropy; SourceTableError names the file on failure."""
  path = pathlib.Path(path)
  if problem := file_io.regular_file_problem(path):  # /dev/zero or a FIFO would never end.
    raise SourceTableError(f'{path}: {problem}')
  suffix = path.suffix.lower()
  fmt = {'.csv': 'ascii.csv', '.ecsv': 'ascii.ecsv'}.get(suffix)
  try:
    table = Table.read(path, format=fmt) if fmt else Table.read(path)
  except Exception as e:  # astropy raises many types for malformed tables.
    raise SourceTableError(f'{path}: cannot read table ({type(e).__name__}: {e})') from e
  table.meta['SOURCE_PATH'] = str(path)
  return table


def table_name(table: Table) -> str:
  """The file a table came from (for error messages), or '<table>' for an in-memory one."""
  return str(table.meta.get('SOURCE_PATH', '<table>'))


def find_column(table: Table, name: str | Sequence[str], *, required: bool = True) -> str | None:
  """The table's own spelling of a column, matched case-insensitively; the first of several
  candidate names that exists."""
  candidates = (name,) if isinstance(name, str) else tuple(name)
  by_upper = {c.upper(): c for c in table.colnames}
  for candidate in candidates:
    if candidate.upper() in by_upper:
      return by_upper[candidate.upper()]
  if required:
    raise SourceTableError(f'{table_name(table)}: no column {" or ".join(candidates)}; '
                           f'columns are {table.colnames}')
  return None


def float_column(table: Table, name: str | Sequence[str]) -> np.ndarray:
  """A numeric column as float64 with masked/empty cells as NaN (shape (n,) or (n, k))."""
  column = table[find_column(table, name)]
  try:
    return np.ma.filled(np.ma.asarray(column, dtype=np.float64), np.nan)
  except (TypeError, ValueError) as e:
    raise SourceTableError(f'{table_name(table)}: column {column.name} is not numeric ({e})'
                           ) from e


def string_column(table: Table, name: str | Sequence[str]) -> np.ndarray:
  """A text column as stripped Python strings; masked cells become ''."""
  column = table[find_column(table, name)]
  out = []
  for v in column:
    if np.ma.is_masked(v):
      out.append('')
    else:
      out.append((v.decode() if isinstance(v, bytes) else str(v)).strip())
  return np.asarray(out, dtype=object)


def apply_cut(table: Table, keep: np.ndarray, source: str, cut: str, report: list[Cut]
              ) -> Table:
  """Keeps the rows where ``keep`` and appends one Cut line to ``report``."""
  keep = np.asarray(keep, dtype=bool)
  out = table[keep]
  report.append(Cut(source, cut, int(np.count_nonzero(~keep)), len(out)))
  logging.info('%s: %s removed %d row(s), %d remain', source, cut, report[-1].removed, len(out))
  return out


def first_of_duplicates(ids: np.ndarray) -> np.ndarray:
  """Boolean mask keeping the first row of every ID (catalogue order)."""
  _, first = np.unique(np.asarray(ids, dtype=str), return_index=True)
  keep = np.zeros(len(ids), bool)
  keep[first] = True
  return keep


def label_table(apogee_id: Sequence[str], logg, teff, fe_h, data_type: str,
                provenance: str) -> Table:
  """The builder's label columns (apogeenet_jax.labels) for one source."""
  n = len(apogee_id)
  table = Table()
  table['APOGEE_ID'] = np.asarray(apogee_id, dtype=str)
  table['LOGG'] = np.asarray(logg, np.float64)
  table['TEFF'] = np.asarray(teff, np.float64)
  table['TEFF'].unit = 'K'
  table['FE_H'] = np.asarray(fe_h, np.float64)
  table['DATA_TYPE'] = np.full(n, data_type)
  table[PROVENANCE_COLUMN] = np.full(n, provenance)
  return table


def write_cut_report(report: Sequence[Cut], path: str | os.PathLike) -> None:
  """CSV `source,cut,removed,remaining`, one line per cut in the order applied."""
  with file_io.atomic_path(os.fspath(path)) as tmp, open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(CUT_REPORT_COLUMNS)
    for c in report:
      writer.writerow((c.source, c.cut, c.removed, c.remaining))


def read_cut_report(path: str | os.PathLike) -> list[Cut]:
  with open(path, newline='') as f:
    return [Cut(r['source'], r['cut'], int(r['removed']), int(r['remaining']))
            for r in csv.DictReader(f)]
