"""Synthetic photometry from PARSEC isochrones for the YSO network (paper §2.4).

The isochrones are NOT shipped and nothing is downloaded: the user fetches them from the CMD web
interface (http://stev.oapd.inaf.it/cgi-bin/cmd) for [M/H] = 0 and ages covering 1–100 Myr
(log age 6.0–8.0, e.g. step 0.05), in the "Gaia DR2" and "2MASS + WISE" photometric systems
(one file each is fine: files on the same age/mass grid are joined column-wise). CMD output is
whitespace text with '#' comment lines; the last comment line before the data names the columns
(Zini MH logAge Mini int_IMF Mass logL logTe logg label … Gmag G_BPmag G_RPmag Jmag Hmag Ksmag
W1mag W2mag W3mag …). Every name is configurable (``IsochroneColumns``), with the usual CMD
spellings as defaults.

Synthetic stars (§2.4): mass U(0.08, 3) M☉ (initial mass), age U(1, 100) Myr (uniform in age,
as printed), A_V U(0, 20) mag, distance U(50, 1000) pc. Quantities are interpolated linearly in
initial mass along each isochrone, then linearly in log age between the two nearest isochrones;
draws outside an isochrone's mass range (dead or not tabulated) are redrawn. Extinction
A_λ = (A_λ/A_V)·A_V with the Wang & Chen 2019 + Gordon 2021 coefficients tabulated by madys
(``label_sources/madys_A_coeff_table.txt``; monochromatic at each band's effective wavelength,
so a few % off a spectrum-integrated law); any other law can be passed. The paper names none.
Magnitude limits: a band fainter than its limit is set to the limit; G must be brighter than 19.
Gaia-DR2-like radius and luminosity: reported only if r* > 0.5 R☉, log L > −1.54 and M_G < 10
(M_G from the reddened G and the distance, as Gaia would compute it), else set to 0.5 and −1.54.
No noise is added (as in the paper).

Input scaling for the network follows Kounkel's Auriga ``convunit`` (x/s − o), which has exactly
this variable set (``label_sources/auriga_convunit_and_nets.txt``): evidence of the authors'
group's convention, not a statement of the paper. NumPy + astropy only.
"""

import dataclasses
import gzip
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging
from astropy import constants as const
from astropy import units as u
from astropy.table import Table

from apogeenet_jax import file_io
from apogeenet_jax.label_sources import common

BANDS = ('G', 'BP', 'RP', 'J', 'H', 'K', 'W1', 'W2', 'W3')
# §2.4 limiting magnitudes (apparent).
MAG_LIMITS = {'G': 19.0, 'BP': 20.5, 'RP': 17.5, 'J': 17.0, 'H': 16.0, 'K': 16.0, 'W1': 16.0,
              'W2': 16.0, 'W3': 13.5}
# §2.4 Gaia DR2 FLAME-like reporting rule.
RADIUS_LIMIT = 0.5  # R☉
LOGL_LIMIT = -1.54  # log10 L/L☉
MG_LIMIT = 10.0  # mag
# §2.4 sampling distributions.
MASS_RANGE = (0.08, 3.0)  # M☉, initial mass
AGE_RANGE_MYR = (1.0, 100.0)
AV_RANGE = (0.0, 20.0)  # mag
DISTANCE_RANGE_PC = (50.0, 1000.0)
# A_λ/A_V, Wang & Chen 2019 (+ Gordon+2021 mid-IR) via madys filters.pkl (madys_A_coeff_table.txt).
EXTINCTION_WANG_CHEN_2019 = {'G': 0.7890, 'BP': 1.0020, 'RP': 0.5890, 'J': 0.2430, 'H': 0.1310,
                             'K': 0.0780, 'W1': 0.0402, 'W2': 0.0292, 'W3': 0.0405}
FEATURES = (*BANDS, 'RADIUS', 'LOGL', 'DISTANCE')  # network input order
TARGETS = ('LOG_AGE', 'MASS', 'A_V', 'LOG_TEFF', 'LOGG')  # network output order
# Auriga convunit (s, o): x_norm = x/s − o; distance enters as log10(d/pc).
INPUT_SCALE = {'G': (18, 0.5), 'BP': (21, 0.5), 'RP': (18, 0.5), 'J': (17.5, 0.5),
               'H': (16.5, 0.5), 'K': (16.5, 0.5), 'W1': (16.5, 0.5), 'W2': (16.5, 0.5),
               'W3': (14, 0.5), 'RADIUS': (5, 0.54), 'LOGL': (4, 0), 'DISTANCE': (3.7, 0.5)}
PARSEC_HELP = (
    'The YSO labels (paper §2.4) need PARSEC isochrones, which are not shipped with '
    'apogeenet-jax and are never downloaded at run time. Get them from the CMD web interface '
    '(http://stev.oapd.inaf.it/cgi-bin/cmd): [M/H] = 0, log age 6.0 to 8.0, photometric systems '
    '"Gaia DR2" and "2MASS + WISE", and pass the saved files with --isochrones=a.dat,b.dat.')


class MissingIsochronesError(common.MissingUserDataError):
  """No PARSEC isochrone files were supplied (or they do not exist)."""


@dataclasses.dataclass(frozen=True)
class IsochroneColumns:
  """Candidate column names (first found wins) of the CMD output."""
  log_age: tuple[str, ...] = ('logAge', 'log(age/yr)')
  mass_initial: tuple[str, ...] = ('Mini', 'M_ini')
  mass: tuple[str, ...] = ('Mass', 'Mact', 'M_act')
  log_l: tuple[str, ...] = ('logL', 'logL/Lo')
  log_teff: tuple[str, ...] = ('logTe',)
  logg: tuple[str, ...] = ('logg', 'logG')
  bands: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: {
      'G': ('Gmag', 'G'), 'BP': ('G_BPmag', 'G_BPbrmag', 'G_BP'), 'RP': ('G_RPmag', 'G_RP'),
      'J': ('Jmag', 'J'), 'H': ('Hmag', 'H'), 'K': ('Ksmag', 'Ks', 'Kmag'),
      'W1': ('W1mag', 'W1'), 'W2': ('W2mag', 'W2'), 'W3': ('W3mag', 'W3')})


def read_cmd_file(path: str | os.PathLike) -> Table:
  """One CMD isochrone file → Table. Column names from the last '#' line before each data block
  (CMD repeats the header per age in some versions)."""
  path = pathlib.Path(path)
  if problem := file_io.regular_file_problem(path):
    if problem.startswith('no such'):
      raise MissingIsochronesError(f'{path}: no such isochrone file. {PARSEC_HELP}')
    raise common.SourceTableError(f'{path}: {problem}')  # /dev/zero would never end.
  try:
    # CMD output may come gzipped ('.dat.gz'); astropy's own opener would not split its
    # repeated headers.
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rt') as f:
      return _parse_cmd(path, f)
  except (UnicodeDecodeError, OSError, EOFError) as e:
    raise common.SourceTableError(f'{path}: not a readable CMD isochrone text file '
                                  f'({type(e).__name__}: {e})') from e


def _parse_cmd(path: pathlib.Path, f) -> Table:
  names, rows = None, []
  header = None
  for number, line in enumerate(f, 1):
    text = line.strip()
    if not text:
      continue
    if text.startswith('#'):
      header = text.lstrip('#').split()
      continue
    values = text.split()
    if names is None:
      if header is None or len(header) != len(values):
        raise common.SourceTableError(
            f'{path}:{number}: no "#" header line with {len(values)} column names before '
            f'the data (is this CMD output?)')
      names = header
    if len(values) != len(names):
      raise common.SourceTableError(f'{path}:{number}: {len(values)} values, expected '
                                    f'{len(names)}')
    try:
      rows.append([float(v) for v in values])
    except ValueError as e:
      raise common.SourceTableError(f'{path}:{number}: not a number ({e})') from e
  if not rows:
    raise common.SourceTableError(f'{path}: no isochrone rows')
  table = Table(np.asarray(rows), names=names)
  table.meta['SOURCE_PATH'] = str(path)
  return table


def read_isochrones(paths: Sequence[str | os.PathLike] | None,
                    columns: IsochroneColumns = IsochroneColumns()) -> Table:
  """The user's isochrone files → one Table with columns LOG_AGE, MINI, MASS, LOGL, LOG_TEFF,
  LOGG and the nine BANDS (absolute magnitudes), sorted by age then initial mass.

  Several files must be on the same grid (same rows, e.g. one CMD query per photometric
  system); their columns are joined. MissingIsochronesError when ``paths`` is empty.
  """
  if not paths:
    raise MissingIsochronesError(f'no isochrone files given. {PARSEC_HELP}')
  tables = [read_cmd_file(p) for p in paths]
  where = ', '.join(str(p) for p in paths)
  wanted = {'MASS': columns.mass, 'LOGL': columns.log_l, 'LOG_TEFF': columns.log_teff,
            'LOGG': columns.logg, **{b: columns.bands[b] for b in BANDS}}
  out = Table(_common_grid(tables, columns))
  for name, candidates in wanted.items():
    out[name] = _first_column(tables, candidates, where, name)
  for name in out.colnames:
    if not np.isfinite(np.asarray(out[name])).any():
      raise common.SourceTableError(
          f'{where}: {name} (column {wanted.get(name, name)}) has no finite value; check the '
          'CMD query')
  finite = np.all([np.isfinite(np.asarray(out[c])) for c in out.colnames], axis=0)
  out = out[finite]
  if len(out) == 0:
    raise common.SourceTableError(f'{where}: no isochrone row is finite in every column')
  out.sort(['LOG_AGE', 'MINI'])
  return out


def _common_grid(tables: Sequence[Table], columns: IsochroneColumns) -> dict[str, np.ndarray]:
  """The (log age, initial mass) grid that every table shares, or a SourceTableError."""
  grid = {}
  for t in tables:
    age = common.float_column(t, columns.log_age)
    mini = common.float_column(t, columns.mass_initial)
    if not grid:
      grid = {'LOG_AGE': age, 'MINI': mini}
    elif len(age) != len(grid['LOG_AGE']) or not (
        np.allclose(age, grid['LOG_AGE']) and np.allclose(mini, grid['MINI'], rtol=1e-6)):
      raise common.SourceTableError(
          f'{common.table_name(t)}: not on the same (log age, initial mass) grid as '
          f'{common.table_name(tables[0])}; query CMD with identical age and mass settings')
  return grid


def _first_column(tables: Sequence[Table], candidates: Sequence[str], where: str,
                  name: str) -> np.ndarray:
  """The first of ``candidates`` found in any table, as float, or a SourceTableError."""
  for t in tables:
    found = common.find_column(t, candidates, required=False)
    if found is not None:
      return common.float_column(t, found)
  raise common.SourceTableError(
      f'{where}: no column {" or ".join(candidates)} for {name}; include the Gaia DR2 and '
      '2MASS + WISE systems in the CMD query')


def check_coverage(iso: Table, age_range_myr: Sequence[float] = AGE_RANGE_MYR) -> np.ndarray:
  """The grid's distinct log ages; SourceTableError if they do not span the sampled ages."""
  ages = np.unique(np.asarray(iso['LOG_AGE']))
  lo, hi = np.log10(np.asarray(age_range_myr, np.float64) * 1e6)
  if len(ages) < 2 or ages[0] > lo + 1e-9 or ages[-1] < hi - 1e-9:
    raise common.SourceTableError(
        f'{iso.meta.get("SOURCE_PATH", "isochrones")}: log ages {ages.min():.3f}..'
        f'{ages.max():.3f} do not cover {lo:.3f}..{hi:.3f} (§2.4: 1–100 Myr)')
  return ages


_QUANTITIES = ('MASS', 'LOGL', 'LOG_TEFF', 'LOGG', *BANDS)


def interpolate(iso: Table, log_age: np.ndarray, mass_initial: np.ndarray) -> dict[str, np.ndarray]:
  """Isochrone quantities at (log age, initial mass): linear in mass along the two nearest
  isochrones, then linear in log age. NaN outside the grid."""
  ages = np.unique(np.asarray(iso['LOG_AGE']))
  log_age = np.asarray(log_age, np.float64)
  mass_initial = np.asarray(mass_initial, np.float64)
  lower = np.clip(np.searchsorted(ages, log_age, side='right') - 1, 0, len(ages) - 2)
  weight = (log_age - ages[lower]) / (ages[lower + 1] - ages[lower])
  inside = (log_age >= ages[0]) & (log_age <= ages[-1])
  out = {q: np.zeros(len(log_age)) for q in _QUANTITIES}
  all_ages = np.asarray(iso['LOG_AGE'])
  for k, age in enumerate(ages):
    rows = all_ages == age
    mini = np.asarray(iso['MINI'])[rows]
    for node, w in ((lower == k, 1.0 - weight), (lower + 1 == k, weight)):
      if not node.any():
        continue
      for q in _QUANTITIES:
        values = np.interp(mass_initial[node], mini, np.asarray(iso[q])[rows],
                           left=np.nan, right=np.nan)
        out[q][node] += w[node] * values
  for q in _QUANTITIES:
    out[q][~inside] = np.nan
  return out


_SIGMA_RSUN = float((1.0 * const.L_sun / (4 * np.pi * const.sigma_sb * (1.0 * u.K)**4))
                    .to_value(u.R_sun**2))


def radius_from_l_teff(log_l, log_teff):
  """R/R☉ from log L/L☉ and log Teff/K (Stefan–Boltzmann, IAU 2015 nominal L☉, R☉)."""
  return np.sqrt(_SIGMA_RSUN * 10.0**np.asarray(log_l) / 10.0**(4 * np.asarray(log_teff)))


def gaia_radius_luminosity(radius, log_l, g_abs):
  """§2.4: r* and log L as Gaia DR2 would report them — only if r* > 0.5 R☉, log L > −1.54 and
  M_G < 10 (NaN counts as not reported), else both set to the limits (0.5, −1.54)."""
  radius, log_l, g_abs = (np.asarray(x, np.float64) for x in (radius, log_l, g_abs))
  with np.errstate(invalid='ignore'):
    reported = (radius > RADIUS_LIMIT) & (log_l > LOGL_LIMIT) & (g_abs < MG_LIMIT)
  return np.where(reported, radius, RADIUS_LIMIT), np.where(reported, log_l, LOGL_LIMIT)


def observed_features(abs_mags: Mapping[str, np.ndarray], a_v, distance_pc, radius, log_l,
                      extinction: Mapping[str, float] = EXTINCTION_WANG_CHEN_2019
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Apparent magnitudes with the §2.4 limits, Gaia-like r*/log L, distance.

  Returns (features (n, 12) in FEATURES order, physical units; detected: G < 19).
  """
  distance_pc = np.asarray(distance_pc, np.float64)
  modulus = 5.0 * np.log10(distance_pc) - 5.0
  apparent = {b: np.asarray(abs_mags[b]) + modulus + extinction[b] * np.asarray(a_v)
              for b in BANDS}
  detected = apparent['G'] < MAG_LIMITS['G']
  radius, log_l = gaia_radius_luminosity(radius, log_l, apparent['G'] - modulus)
  columns = [np.minimum(apparent[b], MAG_LIMITS[b]) for b in BANDS]
  return np.stack([*columns, radius, log_l, distance_pc], axis=1), detected


def synthesize(iso: Table, n: int, seed: int,
               extinction: Mapping[str, float] = EXTINCTION_WANG_CHEN_2019) -> Table:
  """``n`` synthetic stars with the §2.4 distributions: FEATURES and TARGETS columns.

  Draws that fall outside the grid's mass range or are fainter than G = 19 are redrawn.
  """
  check_coverage(iso)
  missing = [b for b in BANDS if b not in extinction]
  if missing:
    raise ValueError(f'extinction law lacks A_λ/A_V for {missing}')
  rng = np.random.default_rng(seed)
  parts, have, drawn = [], 0, 0
  while have < n:
    m = max(2 * (n - have), 64)
    drawn += m
    if drawn > 50 * n + 1000:
      raise common.SourceTableError(
          f'{iso.meta.get("SOURCE_PATH", "isochrones")}: only {have} of {drawn} draws were '
          f'inside the mass grid and brighter than G = 19; check the isochrone masses')
    mass = rng.uniform(*MASS_RANGE, m)
    log_age = np.log10(rng.uniform(*AGE_RANGE_MYR, m) * 1e6)
    a_v = rng.uniform(*AV_RANGE, m)
    distance = rng.uniform(*DISTANCE_RANGE_PC, m)
    q = interpolate(iso, log_age, mass)
    radius = radius_from_l_teff(q['LOGL'], q['LOG_TEFF'])
    features, detected = observed_features(q, a_v, distance, radius, q['LOGL'], extinction)
    targets = np.stack([log_age, q['MASS'], a_v, q['LOG_TEFF'], q['LOGG']], axis=1)
    good = detected & np.all(np.isfinite(features), 1) & np.all(np.isfinite(targets), 1)
    parts.append(np.concatenate([features, targets], axis=1)[good])
    have += int(good.sum())
  data = np.concatenate(parts)[:n]
  logging.info('Synthesised %d stars from %d draws (seed %d).', n, drawn, seed)
  return Table(data, names=(*FEATURES, *TARGETS))


def normalise_features(features: np.ndarray) -> np.ndarray:
  """(n, 12) physical FEATURES → network inputs (Auriga's x/s − o; distance as log10 pc)."""
  x = np.array(features, np.float64, copy=True)
  x[:, FEATURES.index('DISTANCE')] = np.log10(x[:, FEATURES.index('DISTANCE')])
  s = np.array([INPUT_SCALE[f][0] for f in FEATURES], np.float64)
  o = np.array([INPUT_SCALE[f][1] for f in FEATURES], np.float64)
  return (x / s - o).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MemberColumns:
  """Columns of the YSO member table (Kounkel et al. 2019 members with Gaia, 2MASS, WISE)."""
  apogee_id: str = 'APOGEE_ID'
  bands: Mapping[str, str] = dataclasses.field(default_factory=lambda: {b: b for b in BANDS})
  parallax: str = 'PARALLAX'  # mas
  radius: str = 'RADIUS'  # Gaia DR2 radius_val, R☉; empty = not reported
  lum: tuple[str, ...] = ('LUM',)  # Gaia DR2 lum_val, L☉ (or give a log column via log_l)
  log_l: tuple[str, ...] = ('LOGL',)


def member_features(members: Table, columns: MemberColumns = MemberColumns(),
                    report: list[common.Cut] | None = None, source: str = 'YSO'
                    ) -> tuple[Table, np.ndarray]:
  """Real members → (kept rows, (n, 12) physical FEATURES) with the same rules as the synthetic
  stars: empty or faint bands set to the limit, G required, distance 1/ϖ, r*/log L by the
  Gaia rule (empty = not reported)."""
  report = [] if report is None else report
  plx = common.float_column(members, columns.parallax)
  g = common.float_column(members, columns.bands['G'])
  members = common.apply_cut(members, np.isfinite(g) & (g < MAG_LIMITS['G']), source,
                             f'no G or G >= {MAG_LIMITS["G"]:g}', report)
  plx = plx[np.isfinite(g) & (g < MAG_LIMITS['G'])]
  members = common.apply_cut(members, np.isfinite(plx) & (plx > 0), source,
                             'no positive parallax', report)
  distance = 1000.0 / plx[np.isfinite(plx) & (plx > 0)]
  mags = {}
  for b in BANDS:
    m = common.float_column(members, columns.bands[b])
    mags[b] = np.where(np.isfinite(m), np.minimum(m, MAG_LIMITS[b]), MAG_LIMITS[b])
  radius = (common.float_column(members, columns.radius)
            if common.find_column(members, columns.radius, required=False)
            else np.full(len(members), np.nan))
  if common.find_column(members, columns.log_l, required=False):
    log_l = common.float_column(members, columns.log_l)
  elif common.find_column(members, columns.lum, required=False):
    with np.errstate(divide='ignore', invalid='ignore'):
      log_l = np.log10(common.float_column(members, columns.lum))
  else:
    log_l = np.full(len(members), np.nan)
  g_abs = mags['G'] - (5.0 * np.log10(distance) - 5.0)
  radius, log_l = gaia_radius_luminosity(radius, log_l, g_abs)
  features = np.stack([*(mags[b] for b in BANDS), radius, log_l, distance], axis=1)
  return members, features
