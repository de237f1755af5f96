"""The output catalogue (catalog.py): flags on hand-picked points, round trips, atomic writes."""

import os
import stat

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits

from apogeenet_jax import catalog

_SIGMAS = ('_ERR', '_ERR_NOISE', '_ERR_MODEL')
INTERFACE_COLUMNS = ['APOGEE_ID', 'RA', 'DEC',
                     *[n + s for n in ('LOGG', 'TEFF', 'FE_H') for s in ('', '_PRED', *_SIGMAS)],
                     'SNR', 'DATA_SET', 'DATA_TYPE', 'FILE']


def test_yso_triangle_on_hand_picked_points():
  inside = [(2200, 4.4), (4500, 3.9), (3200, 1.7),  # vertices
            (3300, 3.33),  # centroid
            (3200, 1.8), (3200, 4.1), (2500, 4.3), (4400, 3.9)]
  outside = [(3200, 1.6), (3200, 4.3), (2100, 4.4), (4600, 3.9), (5000, 4.0), (3000, 5.0),
             (2500, 2.0), (4500, 2.5), (np.nan, 3.0)]
  t_in, g_in = np.array(inside).T
  t_out, g_out = np.array(outside).T
  assert catalog.in_yso_triangle(t_in, g_in).all()
  assert not catalog.in_yso_triangle(t_out, g_out).any()


def test_age_bins_on_hand_picked_points():
  logg = [3.0, 3.59, 3.6, 3.7, 3.8, 3.95, 4.0, 4.1, 4.2, 4.5, np.nan]
  expected = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, catalog.NOT_AGE_BINNED]
  np.testing.assert_array_equal(catalog.age_bin(logg), expected)


def test_flags():
  # (log g, Teff, [Fe/H]) per row.
  pred = np.array([[4.5, 6701.0, 0.0],   # hot
                   [4.5, 6700.0, 0.0],   # not hot
                   [9.0, 5000.0, 0.0],   # unphysical log g, low S/N
                   [4.0, 5000.0, 0.0],   # physical, low S/N
                   [9.0, 5000.0, 0.0],   # unphysical, good S/N
                   [3.7, 3300.0, 0.0],   # YSO candidate, bin 1
                   [4.3, 3300.0, 0.0]])  # in the triangle? top edge at 3300 K is ~4.18: no
  snr = np.array([50, 50, 0.2, 0.2, 50, 50, 50.0])
  f = catalog.compute_flags(pred, snr)
  np.testing.assert_array_equal(f['FLAG_TEFF_GT_6700'], [1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(f['FLAG_LOW_SNR_UNPHYSICAL'], [0, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(f['YSO_CANDIDATE'], [0, 0, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(f['AGE_BIN'], [-1, -1, -1, -1, -1, 1, -1])


def _table():
  rng = np.random.default_rng(0)
  n = 5
  labels = rng.normal([3.0, 4500.0, -0.2], [1.0, 500.0, 0.3], (n, 3))
  labels[3:] = np.nan  # two unlabelled stars
  pred = labels + rng.normal(0, 0.1, (n, 3))
  pred[3:] = [[3.7, 3300.0, 0.1], [2.0, 4800.0, -0.5]]
  err = np.abs(rng.normal(0, 0.05, (n, 3)))
  err[4] = np.nan  # no MC for this one
  model = np.full((n, 3), np.nan)
  model[[1, 3]] = 0.02  # only some rows carry a member spread
  return catalog.build_catalog(
      apogee_id=[f'2M0000000{i}+0000000' for i in range(n)], ra=rng.uniform(0, 360, n),
      dec=rng.uniform(-90, 90, n), pred=pred, pred_err=2 * err, pred_err_noise=err,
      pred_err_model=model, calibrated=True, snr=[100, 50, 10, 0.5, 200],
      labels=labels, data_set=['train', 'dev', 'test', '', ''],
      data_type=['Payne', 'MStar', 'YSO', '', ''])


@pytest.mark.parametrize('name', ['catalog.fits', 'catalog.csv'])
def test_catalog_round_trips_through_astropy(tmp_path, name):
  table = _table()
  path = str(tmp_path / name)
  (catalog.write_fits if name.endswith('.fits') else catalog.write_csv)(table, path)
  back = catalog.read_catalog(path)
  assert back.colnames == INTERFACE_COLUMNS + list(catalog.FLAG_COLUMNS)
  assert list(back['APOGEE_ID']) == list(table['APOGEE_ID'])
  for col in INTERFACE_COLUMNS[1:INTERFACE_COLUMNS.index('SNR') + 1]:
    a = np.ma.filled(np.ma.asarray(table[col], float), np.nan)
    b = np.ma.filled(np.ma.asarray(back[col], float), np.nan)
    np.testing.assert_allclose(b, a, rtol=1e-12, equal_nan=True, err_msg=col)
  assert back['LOGG'].mask[3:].all() and not back['LOGG'].mask[:3].any()
  assert back['TEFF_ERR'].mask[4] and not back['TEFF_ERR'].mask[:4].any()
  assert back['TEFF_ERR_MODEL'].mask[[0, 2, 4]].all() and not back['TEFF_ERR_MODEL'].mask[1]
  for name in ('LOGG', 'TEFF', 'FE_H'):
    for suffix in _SIGMAS:
      assert back[name + suffix].unit == back[name].unit, name + suffix
      assert table[name + suffix].description, name + suffix  # FITS keeps it in TCOMM only
  assert 'calibrated on the dev split' in table['TEFF_ERR'].description
  assert back['TEFF'].unit == u.K and back['LOGG'].unit == u.dex and back['RA'].unit == u.deg
  ds = [str(x) if x is not np.ma.masked else '' for x in back['DATA_SET']]
  assert ds == ['Train', 'Dev', 'Test', '', '']
  for col in catalog.FLAG_COLUMNS:
    np.testing.assert_array_equal(np.asarray(back[col]), np.asarray(table[col]), err_msg=col)
  assert back['YSO_CANDIDATE'][3] and back['AGE_BIN'][3] == 1


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
  table = _table()
  path = str(tmp_path / 'catalog.fits')
  catalog.write_fits(table, path)
  before = open(path, 'rb').read()

  def crash(self, fileobj, *args, **kwargs):
    with open(fileobj, 'wb') as f:
      f.write(b'SIMPLE  =   half a file')
    raise OSError('disk full')

  monkeypatch.setattr(fits.HDUList, 'writeto', crash)
  with pytest.raises(catalog.CatalogError, match=r'catalog\.fits'):
    catalog.write_fits(table[:2], path)
  assert open(path, 'rb').read() == before
  assert os.listdir(tmp_path) == ['catalog.fits']


def test_unknown_sigma_source_is_a_clear_error():
  with pytest.raises(catalog.CatalogError, match=r"sigma must be one of.*'delta'"):
    catalog.build_catalog(apogee_id=['2M00000000+0000000'], ra=[0.0], dec=[0.0],
                          pred=[[4.0, 5000.0, 0.0]], pred_err=[[0.1, 50.0, 0.05]], snr=[100.0],
                          sigma='delta')


def test_outputs_get_the_umask_mode_not_0600(tmp_path):
  # Mkstemp's private mode leaked into catalog.*, metrics.json and figures.
  old = os.umask(0o027)
  try:
    catalog.write_csv(_table(), str(tmp_path / 'catalog.csv'))
    assert stat.S_IMODE(os.stat(tmp_path / 'catalog.csv').st_mode) == 0o640
    os.chmod(tmp_path / 'catalog.csv', 0o604)  # A mode the user chose survives a rewrite.
    catalog.write_fits(_table(), str(tmp_path / 'catalog.fits'))
    catalog.write_csv(_table(), str(tmp_path / 'catalog.csv'))
    assert stat.S_IMODE(os.stat(tmp_path / 'catalog.csv').st_mode) == 0o604
    assert stat.S_IMODE(os.stat(tmp_path / 'catalog.fits').st_mode) == 0o640
  finally:
    os.umask(old)


def test_fits_catalogue_reads_back_without_warnings_and_keeps_descriptions(tmp_path):
  # Astropy warned twice that 'dex' did not parse as a FITS unit, and the column
  # descriptions did not come back.
  import warnings

  from astropy.table import Table
  table = _table()
  path = str(tmp_path / 'catalog.fits')
  catalog.write_fits(table, path)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    plain = Table.read(path)
  assert plain['TEFF'].unit == u.K and plain['RA'].unit == u.deg
  back = catalog.read_catalog(path)
  for name in table.colnames:
    assert back[name].description == table[name].description, name
  assert back['LOGG'].unit == u.dex and back['FE_H_ERR'].unit == u.dex


def test_a_hash_in_a_file_path_or_id_survives_the_documented_csv_reader(tmp_path):
  """docs/evaluation.md's pandas reader keeps a row whole when a FILE path or an ID holds '#'
  (pandas.read_csv(comment='#') cut it there)."""
  from astropy.table import Table
  n = 2
  table = catalog.build_catalog(
      apogee_id=['2M01#A', 'plain'], ra=np.zeros(n), dec=np.zeros(n),
      pred=np.full((n, 3), [4.0, 5000.0, 0.0]), pred_err=np.full((n, 3), 0.1),
      snr=np.full(n, 50.0), file=['surveys/run#2/apStar-r8-2M01#A.fits', 'b.fits'])
  path = tmp_path / 'catalog.csv'
  catalog.write_csv(table, path)
  frame = Table.read(path, format='ascii.ecsv').to_pandas()
  assert list(frame['APOGEE_ID']) == ['2M01#A', 'plain']
  assert list(frame['FILE']) == ['surveys/run#2/apStar-r8-2M01#A.fits', 'b.fits']
  assert list(frame['TEFF_PRED']) == [5000.0, 5000.0]
  docs = open(os.path.join(os.path.dirname(__file__), '..', 'docs', 'evaluation.md')).read()
  assert "Table.read(p, format='ascii.ecsv').to_pandas()" in docs
