"""One label catalogue from the three sources, with a documented precedence (paper §2.2–2.4).

Rule: when a star (APOGEE_ID) has labels from several sources, YSO wins over MStar, and MStar
over Payne. Why: §2.3 derives MStar labels for "bona fide lower MS stars with potentially
erroneous Payne labels", so they replace the Payne ones; §2.3 hands stars in star-forming
regions to the YSO procedure, and §2.4 labels only likely cluster members, for which the
main-sequence relations do not hold. ALSO_IN lists the sources a star's labels did not come from.
"""

import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from astropy.table import Table, vstack

from apogeenet_jax import catalog, constants, labels
from apogeenet_jax.label_sources import common

PRECEDENCE = ('YSO', 'MStar', 'Payne')  # first wins
OUTPUT_COLUMNS = ('APOGEE_ID', *constants.LABEL_NAMES, 'DATA_TYPE', common.PROVENANCE_COLUMN,
                  'ALSO_IN')


def merge(tables: Sequence[Table], report: list[common.Cut] | None = None) -> Table:
  """Stacks source tables (``common.label_table`` columns) and keeps one row per APOGEE_ID."""
  report = [] if report is None else report
  tables = [t for t in tables if t is not None]
  if not tables:
    raise ValueError('no label source given: pass at least one of Payne, MStar, YSO')
  stacked = vstack([t[list(OUTPUT_COLUMNS[:-1])] for t in tables], join_type='exact')
  ids = np.asarray(stacked['APOGEE_ID'], dtype=str)
  rank = np.array([PRECEDENCE.index(t) for t in np.asarray(stacked['DATA_TYPE'], dtype=str)])
  order = np.lexsort((rank, ids))  # by ID, then precedence
  keep = np.zeros(len(stacked), bool)
  also_in = np.full(len(stacked), '', dtype=object)
  start = 0
  while start < len(order):
    stop = start
    while stop < len(order) and ids[order[stop]] == ids[order[start]]:
      stop += 1
    group = order[start:stop]
    keep[group[0]] = True
    also_in[group[0]] = ','.join(str(stacked['DATA_TYPE'][i]) for i in group[1:])
    start = stop
  for loser in PRECEDENCE[1:]:
    lost = (~keep) & (np.asarray(stacked['DATA_TYPE'], dtype=str) == loser)
    if lost.any():
      report.append(common.Cut('merge', f'{loser} rows superseded by a higher-precedence source',
                               int(lost.sum()), int(keep.sum())))
      logging.info('merge: %d %s row(s) superseded (precedence %s)', int(lost.sum()), loser,
                   ' > '.join(PRECEDENCE))
  out = stacked[keep]
  out['ALSO_IN'] = np.array([str(s) for s in also_in[keep]], dtype=str)
  report.append(common.Cut('merge', 'catalogue rows', 0, len(out)))
  return out


def write_labels(table: Table, path: str | os.PathLike) -> list[labels.LabelledStar]:
  """Writes the builder's catalogue and validates it with ``labels.read_label_catalog``."""
  table = table.copy()
  for name in (common.PROVENANCE_COLUMN, 'ALSO_IN'):
    if name in table.colnames:  # FITS strings are ASCII; a user's relation name may not be.
      table[name] = [str(v).encode('ascii', 'replace').decode() for v in table[name]]
  table.meta['COMMENT'] = [
      'apogeenet_jax.make_labels: Olney et al. 2020 section 2.2-2.4 label assembly.',
      f'Precedence for stars in several sources: {" > ".join(PRECEDENCE)}.']
  catalog.write_fits(table, os.fspath(path))
  return labels.read_label_catalog(path)
