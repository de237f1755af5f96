"""Payne labels (paper §2.2): Ting et al. 2019's DR14 catalogue, quality flag and the paper's cut.

Layout (docs/paper_facts.md, "Label sources"; Leung & Bovy's public repackaging, one
row per DR14 allStar row): ``APOGEE_ID``, ``payne`` — a float array
[Teff, log g, C/H, …, Fe/H (index 19), …] with −9999 for "no value" — and ``good_flag``
(1 good, 0 bad). Ting's original column names were not found in any stored source, so every name
and index is configurable (``PayneColumns``); a table with scalar TEFF/LOGG/FE_H columns works
with ``array=None``.

Steps, each counted in the cut report: the quality flag; rows with a −9999 (or empty) Teff,
log g or [Fe/H]; the paper's cut, kept where Teff > 4000 K or log g < 3.5 (strict, as printed);
repeated APOGEE_IDs (allStar lists a star once per field/telescope), first row kept.
Trust: the cut is the paper's words; the layout is the repackaging's README, not Ting's file.
"""

import dataclasses
import os

import numpy as np
from astropy.table import Table

from apogeenet_jax.label_sources import common

SOURCE = 'Payne'
# §2.2: "labels … from the Payne's outputs for stars with Teff > 4000 K or log g < 3.5".
TEFF_MIN = 4000.0  # K
LOGG_MAX = 3.5  # dex
PROVENANCE = 'Payne DR14 (Ting et al. 2019); Teff>4000 K or logg<3.5 (Olney+2020 sec. 2.2)'


@dataclasses.dataclass(frozen=True)
class PayneColumns:
  """Where the labels are. ``array=None``: scalar columns ``teff``, ``logg``, ``fe_h``."""
  apogee_id: str = 'APOGEE_ID'
  array: str | None = 'payne'
  teff_index: int = 0
  logg_index: int = 1
  fe_h_index: int = 19
  teff: str = 'TEFF'
  logg: str = 'LOGG'
  fe_h: str = 'FE_H'
  flag: str | None = 'good_flag'  # None: no quality flag in the file.
  good_value: int = 1


def paper_cut(teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
  """True where §2.2 keeps the Payne label: Teff > 4000 K or log g < 3.5."""
  return (np.asarray(teff) > TEFF_MIN) | (np.asarray(logg) < LOGG_MAX)


def _labels(table: Table, columns: PayneColumns) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  if columns.array is None:
    return (common.float_column(table, columns.teff), common.float_column(table, columns.logg),
            common.float_column(table, columns.fe_h))
  values = common.float_column(table, columns.array)
  need = max(columns.teff_index, columns.logg_index, columns.fe_h_index) + 1
  if values.ndim != 2 or values.shape[1] < need:
    raise common.SourceTableError(
        f'{common.table_name(table)}: column {columns.array} has shape {values.shape}; expected '
        f'(rows, >= {need}) with Teff, log g, [Fe/H] at indices {columns.teff_index}, '
        f'{columns.logg_index}, {columns.fe_h_index}')
  return (values[:, columns.teff_index], values[:, columns.logg_index],
          values[:, columns.fe_h_index])


def payne_labels(catalog: str | os.PathLike | Table, columns: PayneColumns = PayneColumns(),
                 report: list[common.Cut] | None = None) -> Table:
  """The Payne rows the paper trained on, as builder label columns (DATA_TYPE 'Payne').

  Args:
    catalog: the catalogue file (FITS; CSV/ECSV with scalar columns) or a Table.
    columns: column names and array indices.
    report: list to which one ``common.Cut`` per step is appended.
  """
  report = [] if report is None else report
  table = catalog if isinstance(catalog, Table) else common.read_table(catalog)
  report.append(common.Cut(SOURCE, 'input rows', 0, len(table)))
  ids = common.string_column(table, columns.apogee_id)
  teff, logg, fe_h = _labels(table, columns)
  work = Table({'APOGEE_ID': ids, 'TEFF': teff, 'LOGG': logg, 'FE_H': fe_h})
  work.meta.update(table.meta)
  if columns.flag is not None:
    flag = common.float_column(table, columns.flag)
    work = common.apply_cut(work, flag == columns.good_value, SOURCE,
                            f'{columns.flag} != {columns.good_value}', report)
  for name in ('TEFF', 'LOGG', 'FE_H'):
    v = np.asarray(work[name])
    work = common.apply_cut(work, np.isfinite(v) & (v != common.MISSING_VALUE), SOURCE,
                            f'{name} missing (-9999 or empty)', report)
  work = common.apply_cut(work, paper_cut(work['TEFF'], work['LOGG']), SOURCE,
                          f'not (TEFF > {TEFF_MIN:g} or LOGG < {LOGG_MAX:g})', report)
  work = common.apply_cut(work, common.first_of_duplicates(work['APOGEE_ID']), SOURCE,
                          'repeated APOGEE_ID (first row kept)', report)
  return common.label_table(work['APOGEE_ID'], work['LOGG'], work['TEFF'], work['FE_H'],
                            SOURCE, PROVENANCE)
