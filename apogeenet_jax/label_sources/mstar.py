"""MStar labels (paper §2.3): low-mass main-sequence stars from photometry and parallax.

Input: a photometry table, one row per APOGEE star, with 2MASS J and K_s, a g magnitude (SDSS or
transformed; the paper's g−K), the Gaia DR2 parallax and its error in mas, and an APOGEE field
name and/or RA/Dec for the star-forming-region exclusion. Names are configurable
(``PhotometryColumns``). No extinction correction: the selected stars are nearby dwarfs, and
the paper names none.

Steps, in order, each counted in the cut report (all inequalities strict, as printed):
  1. rows with an empty J, K, g, parallax or parallax error;
  2. parallax/σ > 3;  3. 0.7 < J−K < 1.05;  4. 3.37 < g−K < 8.46;  5. 5 < M_K < 10;
  6. stars in fields of star-forming regions and young clusters (they belong to the YSO
     procedure): APOGEE field names matched by ``StarFormingRegions.field_patterns`` and sky
     circles. The defaults stand for the paper's Orion Complex, Perseus (IC 348, NGC 1333),
     NGC 2264 and Pleiades; their circles are approximate — pass your own list for real work;
  7. [Fe/H] from the USER's relation (Hejazi 2015 in the paper; not shipped), kept inside the
     relation's validity range;
  8. Teff from Mann 2015 (solve R(M_K) = R(Teff), see ``relations``): M_K in (4.6, 9.8) and a
     solution on the physical branch, (≈2733, 4100) K. Note that the branch ends at
     M_K ≈ 9.5: fainter stars have radii below R(2733 K) and are dropped here. Or, with
     ``teff_relation``, one of Mann's colour relations (Table 2), Teff kept in (2700, 4100) K;
  9. log g from the Veyette 2017 reconstruction, inside 3200 < Teff < 4100 K and
     −0.7 < [Fe/H] < 0.3.
Cross-check (reported, not applied): log g = log10(G·M/R²) from Mann's M(M_K) and R(M_K);
``logg_crosscheck`` gives the median and spread of the difference on the selected stars.
"""

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np
from absl import logging
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from apogeenet_jax.label_sources import common, relations

SOURCE = 'MStar'
# §2.3 selection, strict inequalities as printed.
J_K_RANGE = (0.7, 1.05)
G_K_RANGE = (3.37, 8.46)
MK_RANGE = (5.0, 10.0)
MIN_PARALLAX_SNR = 3.0
PROVENANCE = ('MStar (Olney+2020 sec. 2.3): Teff Mann+2015 R(M_K)=R(Teff); logg Veyette+2017 '
              '(reconstructed); [Fe/H] user relation: ')


@dataclasses.dataclass(frozen=True)
class PhotometryColumns:
  """Column names of the photometry table (case-insensitive)."""
  apogee_id: str = 'APOGEE_ID'
  j: str = 'J'
  k: str = 'K'
  g: str = 'G'
  parallax: str = 'PARALLAX'  # mas
  parallax_error: str = 'PARALLAX_ERROR'  # mas
  field: str = 'FIELD'  # APOGEE field name; optional if RA/DEC exist
  ra: str = 'RA'  # deg; optional if FIELD exists
  dec: str = 'DEC'
  # Only for the Mann 2015 colour–Teff relations (teff_relation='V-J', 'BP-RP,[Fe/H]', …).
  v: str = 'V'
  ic: str = 'I_C'
  r: str = 'SDSS_R'
  z: str = 'SDSS_Z'
  bp: str = 'BP'
  rp: str = 'RP'
  h: str = 'H'

  def band(self, name: str) -> str:
    """The column of a band named as in Mann's relations ('V', 'Ic', 'r', 'z', 'J', 'BP', …)."""
    return {'V': self.v, 'Ic': self.ic, 'r': self.r, 'z': self.z, 'J': self.j, 'BP': self.bp,
            'RP': self.rp, 'H': self.h}[name]


@dataclasses.dataclass(frozen=True)
class SkyCircle:
  name: str
  ra: float  # deg, ICRS
  dec: float  # deg
  radius: float  # deg


@dataclasses.dataclass(frozen=True)
class StarFormingRegions:
  """Where §2.3 hands stars to the YSO procedure instead.

  field_patterns: substrings of APOGEE field names, compared upper-case with spaces, '_' and '-'
    removed. circles: sky regions. The defaults stand for the paper's four regions; the circle
    centres are the clusters' catalogue positions and the radii are rough sizes (≥ an APOGEE
    plate's 1.5°), not the paper's list, which it does not give.
  """
  field_patterns: tuple[str, ...] = ('ORION', 'ONC', 'LAMBDAORI', 'PERSEUS', 'IC348', 'NGC1333',
                                     'NGC2264', 'PLEIADES', 'M45')
  circles: tuple[SkyCircle, ...] = (
      SkyCircle('Orion A / ONC', 84.0, -6.5, 4.0),
      SkyCircle('Orion B / sigma Ori', 85.8, -1.0, 3.0),
      SkyCircle('lambda Ori', 83.8, 9.9, 4.0),
      SkyCircle('IC 348', 56.13, 32.16, 1.5),
      SkyCircle('NGC 1333', 52.30, 31.32, 1.5),
      SkyCircle('NGC 2264', 100.25, 9.88, 1.5),
      SkyCircle('Pleiades', 56.75, 24.12, 3.0),
  )


NO_REGIONS = StarFormingRegions(field_patterns=(), circles=())


def _normalise_field(name: str) -> str:
  return re.sub(r'[\s_\-]', '', name.upper())


def in_star_forming_region(table: Table, regions: StarFormingRegions,
                           columns: PhotometryColumns = PhotometryColumns()) -> np.ndarray:
  """True where a row's FIELD matches a pattern or its RA/Dec lies in a circle.

  SourceTableError when regions are given but the table has neither a field nor RA/Dec column:
  the exclusion is part of the paper's procedure and is never skipped silently.
  """
  hit = np.zeros(len(table), bool)
  if not regions.field_patterns and not regions.circles:
    return hit
  field = common.find_column(table, columns.field, required=False)
  ra = common.find_column(table, columns.ra, required=False)
  dec = common.find_column(table, columns.dec, required=False)
  if field is None and (ra is None or dec is None):
    raise common.SourceTableError(
        f'{common.table_name(table)}: neither a {columns.field} column nor {columns.ra}/'
        f'{columns.dec}: cannot exclude star-forming regions (§2.3); add one, or pass '
        f'regions=NO_REGIONS (--sfr_fields=none) if the table holds none')
  if field is not None and regions.field_patterns:
    hit |= _field_matches(common.string_column(table, field), regions.field_patterns)
  if ra is not None and dec is not None and regions.circles:
    hit |= _inside_circles(common.float_column(table, ra), common.float_column(table, dec),
                           regions.circles)
  return hit


def _field_matches(fields, patterns) -> np.ndarray:
  """True where a FIELD name contains a pattern (case, spaces, _ and - ignored)."""
  patterns = [_normalise_field(p) for p in patterns]
  return np.array([any(p in _normalise_field(f) for p in patterns) for f in fields], bool)


def _inside_circles(ra, dec, circles) -> np.ndarray:
  """True where (RA, Dec) [deg] is finite and inside one of the circles."""
  ok = np.isfinite(ra) & np.isfinite(dec)
  stars = SkyCoord(np.where(ok, ra, 0.0) * u.deg, np.where(ok, dec, 0.0) * u.deg)
  hit = np.zeros(len(ra), bool)
  for c in circles:
    hit |= ok & (stars.separation(SkyCoord(c.ra * u.deg, c.dec * u.deg)) < c.radius * u.deg)
  return hit


def absolute_magnitude(m, parallax_mas):
  """M = m + 5 log10(ϖ / 100 mas) (distance 1/ϖ, no extinction)."""
  return np.asarray(m, np.float64) + 5.0 * np.log10(np.asarray(parallax_mas, np.float64) / 100.0)


def between(x, bounds) -> np.ndarray:
  """low < x < high, the strict inequalities §2.3 prints for every cut and validity range."""
  x = np.asarray(x, np.float64)
  return (x > bounds[0]) & (x < bounds[1])


def logg_crosscheck(mk, logg) -> dict[str, float]:
  """Veyette log g minus log10(G·M/R²) from Mann's M(M_K), R(M_K): n, median, std, max |Δ|."""
  mk, logg = np.asarray(mk, np.float64), np.asarray(logg, np.float64)
  other = relations.logg_from_mass_radius(relations.mann_mass_from_mk(mk),
                                          relations.mann_radius_from_mk(mk))
  diff = logg - other
  if not len(diff):
    return {'n': 0, 'median': float('nan'), 'std': float('nan'), 'max_abs': float('nan')}
  return {'n': len(diff), 'median': float(np.median(diff)), 'std': float(np.std(diff)),
          'max_abs': float(np.max(np.abs(diff)))}


TEFF_FROM_MK = 'M_K'


def mstar_labels(photometry: str | os.PathLike | Table, fe_h_relation: relations.FehRelation,
                 *, columns: PhotometryColumns = PhotometryColumns(),
                 teff_relation: str = TEFF_FROM_MK,
                 regions: StarFormingRegions = StarFormingRegions(),
                 fe_h_range: Sequence[float] | None = None,
                 report: list[common.Cut] | None = None,
                 crosscheck: dict | None = None) -> Table:
  """§2.3 labels for the selected low-mass main-sequence stars (DATA_TYPE 'MStar').

  Args:
    photometry: table file or Table (see ``PhotometryColumns``).
    fe_h_relation: (g−K, J−K) → [Fe/H]; e.g. ``relations.load_feh_relation(path)``. None raises
      MissingFehRelationError: there is no default.
    teff_relation: 'M_K' (default: solve R(M_K) = R(Teff)) or a Mann 2015 colour relation,
      a key of ``relations.MANN_COLOUR_TEFF`` ('BP-RP', 'r-J,[Fe/H]', 'V-J,J-H', …), whose
      bands must be columns (``PhotometryColumns.band``); Teff kept inside (2700, 4100) K.
    fe_h_range: validity of the relation; default its own ``fe_h_range`` attribute, else
      Hejazi's (−0.73, 0.3).
    report: list to which one ``common.Cut`` per step is appended.
    crosscheck: dict to fill with ``logg_crosscheck`` of the selected stars.
  """
  if fe_h_relation is None:
    raise relations.MissingFehRelationError(f'no [Fe/H] relation given. {relations.FEH_HELP}')
  if fe_h_range is None:
    fe_h_range = getattr(fe_h_relation, 'fe_h_range', relations.HEJAZI_FEH_RANGE)
  if teff_relation != TEFF_FROM_MK and teff_relation not in relations.MANN_COLOUR_TEFF:
    raise ValueError(f'teff_relation {teff_relation!r}: use {TEFF_FROM_MK!r} or one of '
                     f'{sorted(relations.MANN_COLOUR_TEFF)}')
  report = [] if report is None else report
  table = photometry if isinstance(photometry, Table) else common.read_table(photometry)
  report.append(common.Cut(SOURCE, 'input rows', 0, len(table)))
  needed = ['J', 'K', 'G', 'PLX', 'PLX_ERR']
  work = Table({'APOGEE_ID': common.string_column(table, columns.apogee_id),
                'J': common.float_column(table, columns.j),
                'K': common.float_column(table, columns.k),
                'G': common.float_column(table, columns.g),
                'PLX': common.float_column(table, columns.parallax),
                'PLX_ERR': common.float_column(table, columns.parallax_error),
                'SFR': in_star_forming_region(table, regions, columns)})
  if teff_relation != TEFF_FROM_MK:
    blue, red = teff_relation.split(',')[0].split('-')
    work['COLOUR'] = (common.float_column(table, columns.band(blue))
                      - common.float_column(table, columns.band(red)))
    needed.append('COLOUR')
    if teff_relation.endswith('J-H'):
      work['J_H'] = work['J'] - common.float_column(table, columns.h)
      needed.append('J_H')
  finite = np.all([np.isfinite(np.asarray(work[c])) for c in needed], axis=0)
  work = common.apply_cut(work, finite & (work['PLX_ERR'] > 0), SOURCE,
                          f'missing {", ".join(needed)} or parallax error <= 0', report)
  snr = np.asarray(work['PLX']) / np.asarray(work['PLX_ERR'])
  work = common.apply_cut(work, snr > MIN_PARALLAX_SNR, SOURCE,
                          f'parallax/error <= {MIN_PARALLAX_SNR:g}', report)
  j_k = np.asarray(work['J'] - work['K'])
  work = common.apply_cut(work, between(j_k, J_K_RANGE), SOURCE,
                          f'J-K outside ({J_K_RANGE[0]:g}, {J_K_RANGE[1]:g})', report)
  g_k = np.asarray(work['G'] - work['K'])
  work = common.apply_cut(work, between(g_k, G_K_RANGE), SOURCE,
                          f'g-K outside ({G_K_RANGE[0]:g}, {G_K_RANGE[1]:g})', report)
  work['MK'] = absolute_magnitude(work['K'], work['PLX'])
  work = common.apply_cut(work, between(np.asarray(work['MK']), MK_RANGE), SOURCE,
                          f'M_K outside ({MK_RANGE[0]:g}, {MK_RANGE[1]:g})', report)
  work = common.apply_cut(work, ~np.asarray(work['SFR']), SOURCE,
                          'in a star-forming-region field (left to the YSO procedure)', report)

  fe_h = np.asarray(fe_h_relation(np.asarray(work['G'] - work['K']),
                                  np.asarray(work['J'] - work['K'])), np.float64)
  work['FE_H'] = fe_h
  work = common.apply_cut(work, np.isfinite(fe_h) & between(fe_h, fe_h_range), SOURCE,
                          f'[Fe/H] outside the relation validity ({fe_h_range[0]:g}, '
                          f'{fe_h_range[1]:g})', report)
  if teff_relation == TEFF_FROM_MK:
    teff = relations.mann_teff_from_mk(work['MK'])
    cut = 'Mann 2015: M_K outside (4.6, 9.8) or no Teff on the physical branch'
  else:
    teff = relations.mann_teff_from_colour(
        work['COLOUR'], teff_relation, fe_h=np.asarray(work['FE_H']),
        j_h=np.asarray(work['J_H']) if 'J_H' in work.colnames else None)
    teff = np.where(between(teff, relations.MANN_TEFF_RANGE), teff, np.nan)
    cut = f'Mann 2015 {teff_relation}: Teff outside (2700, 4100) K'
  work['TEFF'] = teff
  work = common.apply_cut(work, np.isfinite(teff), SOURCE, cut, report)
  valid = (between(np.asarray(work['TEFF']), relations.VEYETTE_TEFF_RANGE)
           & between(np.asarray(work['FE_H']), relations.VEYETTE_FEH_RANGE))
  work = common.apply_cut(work, valid, SOURCE, 'Veyette 2017: Teff outside (3200, 4100) K or '
                          '[Fe/H] outside (-0.7, 0.3)', report)
  work = common.apply_cut(work, common.first_of_duplicates(work['APOGEE_ID']), SOURCE,
                          'repeated APOGEE_ID (first row kept)', report)
  logg = relations.veyette_logg(work['TEFF'], work['FE_H'])
  check = logg_crosscheck(work['MK'], logg)
  logging.info('MStar log g cross-check (Veyette − log GM/R² from Mann M_K relations) on %d '
               'stars: median %.3f dex, std %.3f dex, max |Δ| %.3f dex', check['n'],
               check['median'], check['std'], check['max_abs'])
  if crosscheck is not None:
    crosscheck.update(check)
  source = getattr(fe_h_relation, 'source', getattr(fe_h_relation, '__name__', 'callable'))
  provenance = PROVENANCE if teff_relation == TEFF_FROM_MK else PROVENANCE.replace(
      'R(M_K)=R(Teff)', teff_relation)
  return common.label_table(work['APOGEE_ID'], logg, work['TEFF'], work['FE_H'], SOURCE,
                            provenance + str(source))
