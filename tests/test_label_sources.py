"""Payne cut, Mann/Veyette relations and the MStar selection on tiny synthetic tables."""

import json

import numpy as np
import pytest
from astropy.table import Table

from apogeenet_jax.label_sources import common, mstar, payne, relations

# ------------------------------------------------------------------------------------------------
# Payne (§2.2).


def _payne_table(rows):
  """rows: (id, teff, logg, fe_h, flag) → the repackaged layout with a 22-element 'payne' array."""
  arr = np.zeros((len(rows), 22))
  for i, (_, teff, logg, fe_h, _) in enumerate(rows):
    arr[i, 0], arr[i, 1], arr[i, 19] = teff, logg, fe_h
  return Table({'APOGEE_ID': [r[0] for r in rows], 'payne': arr,
                'good_flag': [r[4] for r in rows]})


PAYNE_ROWS = [
    ('2M_hot_dwarf', 4000.5, 4.6, -0.1, 1),   # Teff just above 4000: kept
    ('2M_at_4000', 4000.0, 4.6, -0.1, 1),     # Teff == 4000, log g >= 3.5: dropped (strict)
    ('2M_cool_giant', 3800.0, 3.49, -0.3, 1), # log g just below 3.5: kept
    ('2M_cool_3p5', 3800.0, 3.5, -0.3, 1),    # log g == 3.5, cool: dropped
    ('2M_bad_flag', 5000.0, 2.5, 0.0, 0),     # quality flag: dropped
    ('2M_no_teff', -9999.0, 2.5, 0.0, 1),     # -9999 Teff
    ('2M_no_feh', 5000.0, 2.5, -9999.0, 1),   # -9999 [Fe/H]
    ('2M_no_feh2', 5100.0, 2.6, -9999.0, 1),
    ('2M_dup', 4800.0, 2.0, 0.1, 1),
    ('2M_dup', 4900.0, 2.1, 0.2, 1),          # repeated ID: first row kept
]


def test_payne_cut_boundaries_flags_and_missing(tmp_path):
  path = tmp_path / 'payne.fits'
  _payne_table(PAYNE_ROWS).write(path)
  report = []
  out = payne.payne_labels(path, report=report)
  assert list(out['APOGEE_ID']) == ['2M_hot_dwarf', '2M_cool_giant', '2M_dup']
  assert out['TEFF'][2] == 4800.0 and out['FE_H'][2] == pytest.approx(0.1)
  assert set(out['DATA_TYPE']) == {'Payne'}
  removed = {c.cut: c.removed for c in report}
  assert removed['good_flag != 1'] == 1
  assert removed['TEFF missing (-9999 or empty)'] == 1
  assert removed['FE_H missing (-9999 or empty)'] == 2
  assert removed['not (TEFF > 4000 or LOGG < 3.5)'] == 2
  assert removed['repeated APOGEE_ID (first row kept)'] == 1
  assert report[-1].remaining == 3


def test_payne_scalar_columns_from_csv(tmp_path):
  path = tmp_path / 'payne.csv'
  Table({'apogee_id': ['a', 'b'], 'teff': [4500.0, 3500.0], 'logg': [2.0, 4.8],
         'fe_h': [0.0, -0.2]}).write(path)
  out = payne.payne_labels(path, payne.PayneColumns(array=None, flag=None))
  assert list(out['APOGEE_ID']) == ['a']


def test_payne_bad_input_names_the_file(tmp_path):
  path = tmp_path / 'payne.fits'
  Table({'APOGEE_ID': ['a'], 'payne': np.zeros((1, 5)), 'good_flag': [1]}).write(path)
  with pytest.raises(common.SourceTableError, match=r'payne\.fits.*shape'):
    payne.payne_labels(path)
  with pytest.raises(common.SourceTableError, match='no such file'):
    payne.payne_labels(tmp_path / 'absent.fits')
  with pytest.raises(common.SourceTableError, match='no column good_flag_x'):
    payne.payne_labels(_payne_table(PAYNE_ROWS), payne.PayneColumns(flag='good_flag_x'))


# ------------------------------------------------------------------------------------------------
# Mann 2015 and Veyette 2017, against values computed here from the published coefficients.


def test_mann_relations_at_known_points():
  # eq. 4 at M_K = 7: 1.9515 − 0.3520·7 + 0.01680·49.
  assert relations.mann_radius_from_mk(7.0) == pytest.approx(1.9515 - 2.464 + 0.8232)
  # eq. 10 at M_K = 6 with the first author's coefficients.
  mk = 6.0
  expected = (0.585825902 + 0.387151019 * mk - 0.121729937 * mk**2 + 0.0105529583 * mk**3
              - 2.72615872e-4 * mk**4)
  assert relations.mann_mass_from_mk(mk) == pytest.approx(expected, rel=1e-12)
  # R(Teff) at Teff = 3500 K (X = 1): the sum of the coefficients.
  assert relations.mann_radius_from_teff(3500.0) == pytest.approx(
      10.5440 - 33.7546 + 35.1909 - 11.5928)
  # Table 2, V−J = 4: 3500·(2.840 − 1.3453·4 + 0.3906·16 − 0.0546·64 + 0.002913·256).
  assert relations.mann_teff_from_colour(4.0, 'V-J') == pytest.approx(
      3500 * (2.840 - 5.3812 + 6.2496 - 3.4944 + 0.745728))
  assert relations.mann_teff_from_colour(4.0, 'V-J,[Fe/H]', fe_h=0.2) == pytest.approx(
      3500 * (2.515 - 1.054 * 4 + 0.2965 * 16 - 0.04150 * 64 + 0.002245 * 256 + 0.05262 * 0.2))
  with pytest.raises(ValueError, match='needs fe_h'):
    relations.mann_teff_from_colour(4.0, 'BP-RP,[Fe/H]')


def test_mann_teff_from_mk_solves_radius_on_the_physical_branch():
  mk = np.array([5.0, 6.0, 7.0, 8.0, 9.0])
  teff = relations.mann_teff_from_mk(mk)
  assert np.all(np.isfinite(teff)) and np.all(np.diff(teff) < 0)  # fainter is cooler
  np.testing.assert_allclose(relations.mann_radius_from_teff(teff),
                             relations.mann_radius_from_mk(mk), rtol=1e-9)
  low, high = relations.mann_teff_branch()
  # The cubic's local minimum, from its derivative: −33.7546 + 70.3818 X − 34.7784 X² = 0.
  x = (70.3818 - np.sqrt(70.3818**2 - 4 * 34.7784 * 33.7546)) / (2 * 34.7784)
  assert low == pytest.approx(3500 * x, abs=1e-6) and low == pytest.approx(2733.47, abs=0.01)
  assert high == 4100.0
  assert np.all((teff > low) & (teff < high))
  # Validity: outside 4.6 < M_K < 9.8 → NaN; M_K = 4.7 has R above R(4100 K) → NaN;
  # M_K = 9.6 has R below R(2733 K), where a second, unphysical root exists → NaN, not that root.
  out = relations.mann_teff_from_mk(np.array([4.6, 4.7, 9.6, 9.8]))
  assert np.all(np.isnan(out))
  assert relations.mann_radius_from_mk(9.6) < relations.mann_radius_from_teff(2700.0)


def test_veyette_reconstruction_matches_grid_nodes_and_mass_radius_logg():
  # Grid nodes from veyette2017_logg_relation_fit.txt (the model grid, rounded to 0.01).
  for teff, fe_h, grid in [(3000, -1.0, 5.28), (3500, 0.0, 4.85), (4200, 0.5, 4.53)]:
    assert relations.veyette_logg(teff, fe_h) == pytest.approx(grid, abs=0.006)
  # The Sun: log10(GM☉/R☉²) = 4.438.
  assert relations.logg_from_mass_radius(1.0, 1.0) == pytest.approx(4.438, abs=1e-3)
  assert relations.logg_from_mass_radius(0.5, 0.5) == pytest.approx(4.438 + np.log10(2), abs=1e-3)


# ------------------------------------------------------------------------------------------------
# [Fe/H] relation: user-supplied only.


def _feh_file(tmp_path, terms=((0.1, 0, 0), (-0.05, 1, 0), (0.2, 0, 1))):
  path = tmp_path / 'feh.json'
  path.write_text(json.dumps({'source': 'TEST relation, not Hejazi', 'terms': terms}))
  return path


def test_feh_relation_missing_is_a_clear_error(tmp_path):
  with pytest.raises(relations.MissingFehRelationError, match=r'Hejazi et al\. 2015'):
    relations.load_feh_relation(None)
  with pytest.raises(relations.MissingFehRelationError, match=r'absent\.json: no such'):
    relations.load_feh_relation(tmp_path / 'absent.json')
  bad = tmp_path / 'bad.json'
  bad.write_text('{"terms": []}')
  with pytest.raises(relations.MissingFehRelationError, match=r'bad\.json'):
    relations.load_feh_relation(bad)
  with pytest.raises(relations.MissingFehRelationError, match='not shipped'):
    mstar.mstar_labels(Table({'APOGEE_ID': ['a']}), None)


def test_polynomial_feh_relation_evaluates_terms(tmp_path):
  rel = relations.load_feh_relation(_feh_file(tmp_path))
  assert rel(5.0, 0.9) == pytest.approx(0.1 - 0.25 + 0.18)
  assert rel.fe_h_range == relations.HEJAZI_FEH_RANGE


# ------------------------------------------------------------------------------------------------
# MStar selection (§2.3).


def _photometry(rows):
  names = ('APOGEE_ID', 'J', 'K', 'G', 'PARALLAX', 'PARALLAX_ERROR', 'FIELD', 'RA', 'DEC')
  return Table(rows=rows, names=names)


def _star(name, j_k=0.85, g_k=5.0, mk=7.0, snr=10.0, field='K2_C5', ra=200.0, dec=40.0):
  plx = 50.0  # mas: K = M_K + 5 log10(100/ϖ)
  k = mk + 5 * np.log10(100.0 / plx)
  return (name, k + j_k, k, k + g_k, plx, plx / snr, field, ra, dec)


def test_mstar_cut_boundaries_and_labels(tmp_path):
  feh = relations.PolynomialFehRelation(terms=((-0.1, 0, 0),), source='constant -0.1 (TEST)')
  rows = [
      _star('ok'),
      _star('ok_cool', mk=7.6),  # Teff ≈ 3217 K, just inside Veyette's range
      _star('snr_at_3', snr=3.0), _star('snr_above_3', snr=3.001),
      _star('jk_low', j_k=0.699), _star('jk_high', j_k=1.051), _star('jk_in', j_k=1.049),
      _star('gk_low', g_k=3.369), _star('gk_high', g_k=8.461), _star('gk_in', g_k=3.371),
      _star('mk_low', mk=4.999), _star('mk_high', mk=10.001), _star('mk_9.9', mk=9.9),
      _star('orion_field', field='ORIONA'), _star('pleiades_sky', field='', ra=56.7, dec=24.2),
      _star('no_parallax'),
  ]
  table = _photometry(rows)
  table['PARALLAX'][-1] = np.nan
  path = tmp_path / 'phot.fits'
  table.write(path)
  report, check = [], {}
  out = mstar.mstar_labels(path, feh, report=report, crosscheck=check)
  kept = list(out['APOGEE_ID'])
  assert kept == ['ok', 'ok_cool', 'snr_above_3', 'jk_in', 'gk_in']
  removed = {c.cut: c.removed for c in report}
  assert removed['missing J, K, G, PLX, PLX_ERR or parallax error <= 0'] == 1
  assert removed['parallax/error <= 3'] == 1
  assert removed['J-K outside (0.7, 1.05)'] == 2
  assert removed['g-K outside (3.37, 8.46)'] == 2
  assert removed['M_K outside (5, 10)'] == 2
  assert removed['in a star-forming-region field (left to the YSO procedure)'] == 2
  # M_K = 9.9 passes 5 < M_K < 10 but not Mann's 4.6 < M_K < 9.8.
  assert removed['Mann 2015: M_K outside (4.6, 9.8) or no Teff on the physical branch'] == 1
  # Labels: Teff from the M_K solve, log g from Veyette at that Teff and [Fe/H] = −0.1.
  ok = out[0]
  teff = relations.mann_teff_from_mk(7.0)
  assert ok['TEFF'] == pytest.approx(teff, rel=1e-9) and ok['FE_H'] == pytest.approx(-0.1)
  assert ok['LOGG'] == pytest.approx(7.921111 - 1.33874 * teff / 1e3 + 0.131939 * (teff / 1e3)**2
                                     + 0.188791 * 0.1, abs=1e-9)
  assert check['n'] == 5 and abs(check['median']) < 0.1  # the two log g agree to ~0.05 dex
  assert out['DATA_TYPE'][0] == 'MStar' and 'constant -0.1 (TEST)' in out['PROVENANCE'][0]


@pytest.mark.parametrize('bounds', [mstar.J_K_RANGE, mstar.G_K_RANGE, mstar.MK_RANGE,
                                    relations.VEYETTE_TEFF_RANGE, relations.HEJAZI_FEH_RANGE])
def test_cuts_are_strict_at_their_boundaries(bounds):
  lo, hi = bounds
  x = np.array([lo, np.nextafter(lo, np.inf), np.nextafter(hi, -np.inf), hi])
  np.testing.assert_array_equal(mstar.between(x, bounds), [False, True, True, False])


def test_mstar_validity_of_feh_and_veyette():
  feh = relations.PolynomialFehRelation(terms=((-0.4, 0, 0), (0.1, 1, 0)), source='TEST')
  # [Fe/H] = 0.1·(g−K) − 0.4: 0.4 at g−K = 8 → outside (−0.73, 0.3); 0.1 at g−K = 5 → kept.
  table = _photometry([_star('too_rich', g_k=8.0), _star('ok', g_k=5.0)])
  report = []
  out = mstar.mstar_labels(table, feh, report=report)
  assert list(out['APOGEE_ID']) == ['ok']
  assert report[-4].removed == 1 and '[Fe/H] outside' in report[-4].cut
  # Veyette 3200 < Teff: M_K = 9.0 gives Teff ≈ 2916 K → dropped there, not by Mann.
  table = _photometry([_star('cool', g_k=5.0, mk=9.0)])
  report = []
  assert len(mstar.mstar_labels(table, feh, report=report)) == 0
  assert report[-2].removed == 1 and 'Veyette' in report[-2].cut


def test_mstar_teff_from_a_mann_colour_relation():
  feh = relations.PolynomialFehRelation(terms=((0.1, 0, 0),), source='TEST')
  table = _photometry([_star('a'), _star('b'), _star('c')])
  table['BP'] = [12.0, 12.0, 12.0]
  table['RP'] = [10.0, 9.5, np.nan]  # BP−RP = 2.0, 2.5, missing
  report = []
  out = mstar.mstar_labels(table, feh, teff_relation='BP-RP,[Fe/H]', report=report)
  assert list(out['APOGEE_ID']) == ['a', 'b']
  x = np.array([2.0, 2.5])
  expected = 3500 * (2.835 - 1.893 * x + 0.7860 * x**2 - 0.1594 * x**3 + 0.01243 * x**4
                     + 0.04417 * 0.1)
  np.testing.assert_allclose(out['TEFF'], expected, rtol=1e-12)
  assert 'BP-RP,[Fe/H]' in out['PROVENANCE'][0]
  assert report[1].removed == 1 and 'COLOUR' in report[1].cut
  with pytest.raises(ValueError, match='teff_relation'):
    mstar.mstar_labels(table, feh, teff_relation='g-K')


def test_mstar_requires_a_way_to_exclude_star_forming_regions():
  feh = relations.PolynomialFehRelation(terms=((0.0, 0, 0),), source='TEST')
  table = _photometry([_star('a')])
  table.remove_columns(['FIELD', 'RA'])
  with pytest.raises(common.SourceTableError, match='star-forming regions'):
    mstar.mstar_labels(table, feh)
  assert len(mstar.mstar_labels(table, feh, regions=mstar.NO_REGIONS)) == 1


def test_feh_relation_with_a_fractional_exponent_is_refused(tmp_path):
  # An exponent of 1.5 was truncated to 1 without a word.
  path = _feh_file(tmp_path, terms=((0.1, 0, 0), (-0.05, 1.5, 0)))
  with pytest.raises(relations.MissingFehRelationError, match=r'feh\.json.*1\.5.*whole'):
    relations.load_feh_relation(path)


def test_isochrones_gzipped_or_without_any_logte_name_the_file(tmp_path):
  # A .dat.gz gave UnicodeDecodeError, an all-NaN logTe a zero-size ValueError.
  import gzip

  from apogeenet_jax.label_sources import fake_isochrones, isochrones
  paths = fake_isochrones.write(tmp_path / 'iso')
  plain = isochrones.read_isochrones(paths)
  zipped = tmp_path / 'iso.dat.gz'
  zipped.write_bytes(gzip.compress(open(paths[0], 'rb').read()))
  assert len(isochrones.read_isochrones([str(zipped), *paths[1:]])) == len(plain)
  garbage = tmp_path / 'garbage.dat'
  garbage.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(common.SourceTableError, match=r'garbage\.dat'):
    isochrones.read_isochrones([str(garbage)])
  lines = open(paths[0]).read().splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith('#') and 'logTe' in line)
  column = lines[header].lstrip('#').split().index('logTe')
  for i in range(header + 1, len(lines)):
    values = lines[i].split()
    if values and not lines[i].startswith('#'):
      values[column] = 'nan'
      lines[i] = ' '.join(values)
  no_teff = tmp_path / 'no_teff.dat'
  no_teff.write_text('\n'.join(lines) + '\n')
  with pytest.raises(common.SourceTableError, match=r'no_teff\.dat.*logTe'):
    isochrones.read_isochrones([str(no_teff), *paths[1:]])
