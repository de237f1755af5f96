"""FAKE isochrones in CMD's text layout, for tests and benchmarks only: NOT PARSEC.

Toy physics chosen so that every quantity depends smoothly on mass and age: main-sequence
R = M^0.8, Teff = 5772 K · M^0.5, pre-main-sequence radii inflated by 1 + 2·10^−(log age − 6),
L from Stefan–Boltzmann, bolometric corrections linear in log Teff with a different slope per
band. Two files, "Gaia DR2" and "2MASS + WISE", on one grid, as two CMD queries would give.
"""

import os
import pathlib

import numpy as np

_COLOUR_SLOPE = {'Gmag': 1.0, 'G_BPmag': 2.0, 'G_RPmag': 0.3, 'Jmag': -1.5, 'Hmag': -2.0,
                 'Ksmag': -2.2, 'W1mag': -2.3, 'W2mag': -2.35, 'W3mag': -2.4}
GAIA = ('Gmag', 'G_BPmag', 'G_RPmag')
TWOMASS_WISE = ('Jmag', 'Hmag', 'Ksmag', 'W1mag', 'W2mag', 'W3mag')


LOG_AGES = np.arange(6.0, 8.0001, 0.1)
MASSES = np.geomspace(0.07, 3.5, 80)  # M☉, brackets the §2.4 draws U(0.08, 3)


def grid(log_ages: np.ndarray = LOG_AGES, masses: np.ndarray = MASSES) -> dict[str, np.ndarray]:
  """Columns of the fake grid, one row per (log age, initial mass)."""
  age, mini = (a.ravel() for a in np.meshgrid(log_ages, masses, indexing='ij'))
  youth = 10.0 ** -(age - 6.0)
  radius = mini**0.8 * (1.0 + 2.0 * youth)
  teff = 5772.0 * mini**0.5 * (1.0 - 0.05 * youth)
  log_l = 2 * np.log10(radius) + 4 * np.log10(teff / 5772.0)
  cols = {'Zini': np.full(age.shape, 0.0152), 'MH': np.zeros(age.shape), 'logAge': age,
          'Mini': mini, 'int_IMF': np.zeros(age.shape), 'Mass': mini, 'logL': log_l,
          'logTe': np.log10(teff), 'logg': 4.438 + np.log10(mini) - 2 * np.log10(radius),
          'label': np.zeros(age.shape)}
  m_bol = 4.74 - 2.5 * log_l
  x = 5.0 * (np.log10(5772.0) - np.log10(teff))
  for band, slope in _COLOUR_SLOPE.items():
    cols[band] = m_bol + slope * x
  return cols


def write(directory: str | os.PathLike, **grid_kwargs) -> list[str]:
  """Writes fake_gaia.dat and fake_2mass_wise.dat below ``directory``; returns their paths."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  cols = grid(**grid_kwargs)
  common_cols = ('Zini', 'MH', 'logAge', 'Mini', 'int_IMF', 'Mass', 'logL', 'logTe', 'logg',
                 'label')
  paths = []
  for name, bands in (('fake_gaia.dat', GAIA), ('fake_2mass_wise.dat', TWOMASS_WISE)):
    names = (*common_cols, *bands)
    data = np.stack([cols[c] for c in names], axis=1)
    header = ('FAKE isochrones for apogeenet-jax tests: NOT PARSEC, NOT PHYSICAL\n'
              'CMD-like layout\n' + ' '.join(names))
    np.savetxt(directory / name, data, fmt='%.6f', header=header, comments='# ')
    paths.append(str(directory / name))
  return paths
