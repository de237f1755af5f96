"""Empirical M-dwarf relations of paper §2.3, with their sources and validity ranges.

Coefficients come from public code and data (docs/paper_facts.md, "Label sources", names each
repository). Trust, highest first:
  * Mann et al. 2015 R(M_K) (eq. 4), M(M_K) (eq. 10), R(Teff), and the colour–Teff relations of
    Table 2 (erratum): the first author's own code and EXOFASTv2, high trust. M(M_K) uses the
    unrounded coefficients from the first author's code (docs/paper_facts.md, "M-dwarf labels").
  * Teff from M_K: Mann 2015 has no Teff(M_K) formula. Solving R(M_K) = R(Teff) on the branch
    where the R(Teff) cubic rises (Teff ≳ 2733 K) is an inference that matches the paper's quoted
    ranges (4.6 < M_K < 9.8, 2700 < Teff < 4100 K), not the paper's words.
  * Veyette et al. 2017 log g(Teff, [M/H]): a reconstruction — a least-squares fit (rms 0.003 dex,
    pure rounding) to the model grid the authors published with their code, not the printed
    equation.
  * Hejazi et al. 2015 [Fe/H](g−K, J−K): NOT available offline. The user supplies it
    (``PolynomialFehRelation`` from a JSON file, or any callable); nothing here guesses it.
The [Fe/H]-dependent variants of Mann's R relations are left out: their functional form
(additive in EXOFASTv2, multiplicative in the paper's table) and the R(Teff, [Fe/H])
coefficients could not be verified against a stored source.
NumPy + astropy only.
"""

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
from astropy import constants as const
from astropy import units as u

from apogeenet_jax.label_sources.common import MissingUserDataError

# Mann et al. 2015 (paper §2.3; docs/paper_facts.md). Polynomials in ascending powers.
MANN_R_FROM_MK = (1.9515, -0.3520, 0.01680)  # eq. 4, R in R☉, scatter 2.89%
MANN_M_FROM_MK = (0.585825902, 0.387151019, -0.121729937, 0.0105529583, -2.72615872e-4)  # eq. 10
MANN_R_FROM_TEFF = (10.5440, -33.7546, 35.1909, -11.5928)  # X = Teff / 3500
MANN_TEFF_SCALE = 3500.0  # K
MANN_MK_RANGE = (4.6, 9.8)  # mag, validity of eqs. 4, 10 (§2.3)
MANN_TEFF_RANGE = (2700.0, 4100.0)  # K (§2.3)
# Table 2 (erratum): Teff/3500 = a + bX + cX² + dX³ + eX⁴ (+ f[Fe/H]) or (+ f(J−H) + g(J−H)²).
# Columns a, b, c, d, e, f, g; σ in K. 'BP-RP' is Gaia DR2.
MANN_COLOUR_TEFF = {
    'V-J': ((2.840, -1.3453, 0.3906, -0.0546, 0.002913, 0, 0), 55),
    'V-Ic': ((2.455, -1.5701, 0.6891, -0.1500, 0.01254, 0, 0), 53),
    'r-z': ((1.547, -0.7053, 0.3656, -0.1008, 0.01046, 0, 0), 58),
    'r-J': ((2.445, -1.2578, 0.4340, -0.0720, 0.004502, 0, 0), 58),
    'BP-RP': ((3.245, -2.4309, 1.043, -0.2127, 0.01649, 0, 0), 52),
    'V-J,[Fe/H]': ((2.515, -1.054, 0.2965, -0.04150, 0.002245, 0.05262, 0), 42),
    'V-Ic,[Fe/H]': ((1.901, -0.6564, 0.1471, -0.01274, 0, 0.04697, 0), 48),
    'r-z,[Fe/H]': ((1.572, -0.7220, 0.3560, -0.09221, 0.009071, 0.05220, 0), 50),
    'r-J,[Fe/H]': ((2.532, -1.319, 0.4449, -0.07151, 0.004333, 0.05629, 0), 47),
    'BP-RP,[Fe/H]': ((2.835, -1.893, 0.7860, -0.1594, 0.01243, 0.04417, 0), 45),
    'V-J,J-H': ((2.769, -1.421, 0.4284, -0.06133, 0.003310, 0.1333, 0.05416), 48),
    'V-Ic,J-H': ((1.568, -0.4381, 0.07749, -0.005610, 0, 0.2441, -0.09257), 52),
    'r-z,J-H': ((1.384, -0.6132, 0.3110, -0.08574, 0.008895, 0.1865, -0.02039), 55),
    'r-J,J-H': ((2.151, -1.092, 0.3767, -0.06292, 0.003950, 0.1697, 0.03106), 52),
}
# Veyette et al. 2017, reconstructed (veyette2017_logg_relation_fit.txt): x = Teff/1000 K.
VEYETTE_LOGG = (7.921111, -1.33874, 0.131939)  # ascending powers of x
VEYETTE_LOGG_FEH = -0.188791  # per dex of [M/H]
VEYETTE_TEFF_RANGE = (3200.0, 4100.0)  # K (§2.3)
VEYETTE_FEH_RANGE = (-0.7, 0.3)  # dex (§2.3)
# Hejazi et al. 2015 validity as the paper quotes it (§2.3); the relation itself is the user's.
HEJAZI_FEH_RANGE = (-0.73, 0.3)


class MissingFehRelationError(MissingUserDataError):
  """No [Fe/H] relation was supplied for the MStar labels."""


def _poly(coefficients: Sequence[float], x):
  """Σ c_i x^i (ascending powers)."""
  return np.polynomial.polynomial.polyval(np.asarray(x, np.float64), coefficients)


def mann_radius_from_mk(mk):
  """R/R☉ from absolute 2MASS K_s, Mann 2015 eq. 4 (no validity check)."""
  return _poly(MANN_R_FROM_MK, mk)


def mann_mass_from_mk(mk):
  """M/M☉ from absolute 2MASS K_s, Mann 2015 eq. 10 (no validity check)."""
  return _poly(MANN_M_FROM_MK, mk)


def mann_radius_from_teff(teff):
  """R/R☉ from Teff (K), Mann 2015's R(Teff) cubic in X = Teff/3500 (no validity check)."""
  return _poly(MANN_R_FROM_TEFF, np.asarray(teff, np.float64) / MANN_TEFF_SCALE)


def mann_teff_branch() -> tuple[float, float]:
  """(lowest, highest) Teff in K of the physical branch: from the R(Teff) cubic's local minimum
  (≈2733 K; below it R grows again as Teff falls) to the top of the validity range (4100 K)."""
  stationary = np.polynomial.polynomial.polyroots(
      np.polynomial.polynomial.polyder(MANN_R_FROM_TEFF)).real * MANN_TEFF_SCALE
  low = float(stationary.min())
  return max(low, MANN_TEFF_RANGE[0]), MANN_TEFF_RANGE[1]


def mann_teff_from_radius(radius, iterations: int = 60):
  """Teff (K) with R(Teff) = radius on the physical branch; NaN where no solution lies there.

  R(Teff) rises monotonically on the branch, so bisection converges to one root
  (60 halvings of a 1367 K interval: far below 1e-6 K).
  """
  radius = np.asarray(radius, np.float64)
  low, high = mann_teff_branch()
  r_low, r_high = mann_radius_from_teff(low), mann_radius_from_teff(high)
  lo = np.full(radius.shape, low)
  hi = np.full(radius.shape, high)
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    above = mann_radius_from_teff(mid) > radius
    hi = np.where(above, mid, hi)
    lo = np.where(above, lo, mid)
  teff = 0.5 * (lo + hi)
  inside = np.isfinite(radius) & (radius >= r_low) & (radius <= r_high)
  return np.where(inside, teff, np.nan)


def mann_teff_from_mk(mk):
  """Teff (K) from absolute K_s: solve R(M_K) = R(Teff) (an inference, see the module docstring).

  NaN outside 4.6 < M_K < 9.8 or where the radius has no Teff on the physical branch.
  """
  mk = np.asarray(mk, np.float64)
  valid = (mk > MANN_MK_RANGE[0]) & (mk < MANN_MK_RANGE[1])
  teff = mann_teff_from_radius(mann_radius_from_mk(mk))
  return np.where(valid, teff, np.nan)


def mann_teff_from_colour(colour, relation: str = 'V-J', *, fe_h=None, j_h=None):
  """Teff (K) from one of Mann 2015's Table 2 relations, named as in ``MANN_COLOUR_TEFF``.

  ``fe_h`` is required by the '…,[Fe/H]' relations, ``j_h`` by the '…,J-H' ones.
  """
  if relation not in MANN_COLOUR_TEFF:
    raise ValueError(f'unknown Mann 2015 colour relation {relation!r}; one of '
                     f'{sorted(MANN_COLOUR_TEFF)}')
  (a, b, c, d, e, f, g), _ = MANN_COLOUR_TEFF[relation]
  y = _poly((a, b, c, d, e), colour)
  if relation.endswith('[Fe/H]'):
    if fe_h is None:
      raise ValueError(f'Mann relation {relation!r} needs fe_h')
    y = y + f * np.asarray(fe_h, np.float64)
  elif relation.endswith('J-H'):
    if j_h is None:
      raise ValueError(f'Mann relation {relation!r} needs j_h')
    j_h = np.asarray(j_h, np.float64)
    y = y + f * j_h + g * j_h**2
  return MANN_TEFF_SCALE * y


def veyette_logg(teff, fe_h):
  """log g (cgs dex) from Teff (K) and [M/H] (dex), the reconstructed Veyette 2017 relation."""
  x = np.asarray(teff, np.float64) / 1000.0
  return _poly(VEYETTE_LOGG, x) + VEYETTE_LOGG_FEH * np.asarray(fe_h, np.float64)


_LOG_G_SUN = float(np.log10((const.GM_sun / const.R_sun**2).to_value(u.cm / u.s**2)))


def logg_from_mass_radius(mass, radius):
  """log10(G·M/R²) in cgs dex from M/M☉ and R/R☉ (IAU 2015 nominal solar values, 4.438)."""
  return (_LOG_G_SUN + np.log10(np.asarray(mass, np.float64))
          - 2.0 * np.log10(np.asarray(radius, np.float64)))


FehRelation = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Any callable (g−K, J−K) → [Fe/H] (dex), all arrays of the same shape."""


@dataclasses.dataclass(frozen=True)
class PolynomialFehRelation:
  """[Fe/H] = Σ c · (g−K)^i · (J−K)^j, the form photometric metallicity relations take.

  JSON file: {"source": "Hejazi et al. 2015, ApJ ..., eq. N",
              "terms": [[c, i, j], ...], "fe_h_range": [-0.73, 0.3]}
  ``fe_h_range`` defaults to the validity the paper quotes for Hejazi 2015.
  """
  terms: tuple[tuple[float, int, int], ...]
  source: str
  fe_h_range: tuple[float, float] = HEJAZI_FEH_RANGE

  def __call__(self, g_k, j_k):
    g_k, j_k = np.asarray(g_k, np.float64), np.asarray(j_k, np.float64)
    out = np.zeros(np.broadcast_shapes(g_k.shape, j_k.shape))
    for c, i, j in self.terms:
      out = out + c * g_k**i * j_k**j
    return out

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> 'PolynomialFehRelation':
    path = pathlib.Path(path)
    if not path.is_file():
      raise MissingFehRelationError(f'{path}: no such [Fe/H] relation file. {FEH_HELP}')
    try:
      d = json.loads(path.read_text())
      for term in d['terms']:
        _, *powers = term
        if any(float(p) != int(p) or p < 0 for p in powers):
          raise MissingFehRelationError(
              f'{path}: term {term}: the powers of (g−K) and (J−K) must be whole numbers ≥ 0, '
              f'got {powers}. {FEH_HELP}')
      terms = tuple((float(c), int(i), int(j)) for c, i, j in d['terms'])
      source = str(d['source'])
      fe_h_range = tuple(float(v) for v in d.get('fe_h_range', HEJAZI_FEH_RANGE))
    except (ValueError, KeyError, TypeError) as e:
      raise MissingFehRelationError(
          f'{path}: not a valid [Fe/H] relation ({type(e).__name__}: {e}). {FEH_HELP}') from e
    if not terms:
      raise MissingFehRelationError(f'{path}: the [Fe/H] relation has no terms. {FEH_HELP}')
    if len(fe_h_range) != 2 or fe_h_range[0] >= fe_h_range[1]:
      raise MissingFehRelationError(f'{path}: fe_h_range must be [low, high], got {fe_h_range}')
    return cls(terms=terms, source=source, fe_h_range=fe_h_range)


FEH_HELP = (
    'The MStar [Fe/H] labels (paper §2.3) come from Hejazi et al. 2015, a relation in g−K and '
    'J−K whose coefficients are not shipped with apogeenet-jax and are not guessed. Copy them '
    'from the paper into a JSON file {"source": "...", "terms": [[c, i, j], ...], '
    '"fe_h_range": [-0.73, 0.3]} meaning [Fe/H] = Σ c·(g−K)^i·(J−K)^j, and pass it with '
    '--feh_relation (or pass any callable (g_k, j_k) -> fe_h from Python).')


def load_feh_relation(path: str | os.PathLike | None) -> PolynomialFehRelation:
  """The user's [Fe/H] relation; MissingFehRelationError (never a default) when none is given."""
  if path is None or str(path) == '':
    raise MissingFehRelationError(f'no [Fe/H] relation given. {FEH_HELP}')
  return PolynomialFehRelation.from_file(path)
