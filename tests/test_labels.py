"""apogeenet_jax.labels: catalogue validation, file matching, deterministic splits."""

import collections

import numpy as np
import pytest
from astropy.table import Table

from apogeenet_jax import constants, labels


def _table(ids=('2M01+1', '2M02+2', '2M03-3'), **extra):
  n = len(ids)
  columns = {'APOGEE_ID': list(ids), 'LOGG': np.linspace(1, 5, n), 'TEFF': np.linspace(3000, 6000, n),
             'FE_H': np.zeros(n), 'DATA_TYPE': ['Payne', 'mstar', 'YSO'][:n]}
  columns.update(extra)
  return Table(columns)


@pytest.mark.parametrize('name', ['labels.fits', 'labels.csv', 'labels.ecsv'])
def test_reads_every_format(tmp_path, name):
  _table(SPLIT=['', 'dev', 'test']).write(tmp_path / name)
  stars = labels.read_label_catalog(labels.find_catalog(tmp_path))
  assert [s.apogee_id for s in stars] == ['2M01+1', '2M02+2', '2M03-3']
  assert [s.data_type for s in stars] == ['Payne', 'MStar', 'YSO']  # Case normalised.
  assert [s.split for s in stars] == [None, 'dev', 'test']
  np.testing.assert_allclose(stars[1].labels, [3.0, 4500.0, 0.0])  # LABEL_NAMES order.
  assert stars[0].labels.dtype == np.float32


def test_lower_case_columns(tmp_path):
  t = _table()
  t.rename_columns(t.colnames, [c.lower() for c in t.colnames])
  t.write(tmp_path / 'labels.csv')
  assert len(labels.read_label_catalog(tmp_path / 'labels.csv')) == 3


def test_duplicate_id_raises(tmp_path):
  _table(ids=('2M01+1', '2M02+2', '2M01+1')).write(tmp_path / 'labels.fits')
  with pytest.raises(labels.LabelCatalogError, match=r'duplicate APOGEE_ID.*2M01\+1') as e:
    labels.read_label_catalog(tmp_path / 'labels.fits')
  assert str(e.value).startswith(str(tmp_path / 'labels.fits'))


def test_missing_column_raises(tmp_path):
  t = _table()
  del t['FE_H']
  t.write(tmp_path / 'labels.csv')
  with pytest.raises(labels.LabelCatalogError, match=r"missing column\(s\) \['FE_H'\]"):
    labels.read_label_catalog(tmp_path / 'labels.csv')


@pytest.mark.parametrize('bad', [np.nan, np.inf, -9999.0])
def test_non_finite_or_sentinel_label_raises(tmp_path, bad):
  t = _table()
  t['TEFF'][1] = bad
  t.write(tmp_path / 'labels.fits')
  with pytest.raises(labels.LabelCatalogError, match=r'TEFF.*2M02\+2'):
    labels.read_label_catalog(tmp_path / 'labels.fits')


def test_empty_csv_cell_raises(tmp_path):
  (tmp_path / 'labels.csv').write_text(
      'APOGEE_ID,LOGG,TEFF,FE_H,DATA_TYPE\n2M01+1,2.5,4700,,Payne\n')
  with pytest.raises(labels.LabelCatalogError, match='FE_H'):
    labels.read_label_catalog(tmp_path / 'labels.csv')


def test_unknown_data_type_and_split_raise(tmp_path):
  _table(DATA_TYPE=['Payne', 'Giant', 'YSO']).write(tmp_path / 'a.csv')
  with pytest.raises(labels.LabelCatalogError, match="DATA_TYPE 'Giant'"):
    labels.read_label_catalog(tmp_path / 'a.csv')
  _table(SPLIT=['train', 'val', 'test']).write(tmp_path / 'b.csv')
  with pytest.raises(labels.LabelCatalogError, match="SPLIT 'val'"):
    labels.read_label_catalog(tmp_path / 'b.csv')


def test_unreadable_or_absent_catalogue_raises(tmp_path):
  with pytest.raises(labels.LabelCatalogError, match='no label catalogue'):
    labels.find_catalog(tmp_path)
  (tmp_path / 'labels.fits').write_text('not fits')
  with pytest.raises(labels.LabelCatalogError, match='cannot read'):
    labels.read_label_catalog(tmp_path / 'labels.fits')
  (tmp_path / 'labels.csv').write_text('x')
  with pytest.raises(labels.LabelCatalogError, match='several'):
    labels.find_catalog(tmp_path)


def test_assign_split_is_deterministic_and_has_paper_fractions():
  n = 20_000
  for data_type, fractions in constants.SPLIT_FRACTIONS.items():
    splits = [labels.assign_split(f'2M{i:08d}+0000000', data_type, seed=0) for i in range(n)]
    counts = collections.Counter(splits)
    for split, fraction in zip(constants.SPLITS, fractions, strict=True):
      # Binomial σ ≤ sqrt(0.25/n) = 0.0035: 0.015 is > 4σ.
      assert abs(counts[split] / n - fraction) < 0.015, (data_type, counts)
  assert labels.assign_split('2M1+1', 'YSO', 3) == labels.assign_split('2M1+1', 'YSO', 3)
  seeds = [labels.assign_split(f'2M{i}', 'Payne', 0) == labels.assign_split(f'2M{i}', 'Payne', 1)
           for i in range(2000)]
  assert 0.5 < np.mean(seeds) < 0.8  # Another seed reshuffles (P(same) = .8²+.1²+.1² = 0.66).
  with pytest.raises(ValueError, match='unknown data type'):
    labels.assign_split('2M1', 'Giant', 0)


def test_match_files_by_id_and_by_file_column(tmp_path):
  (tmp_path / 'apo25m' / 'F1').mkdir(parents=True)
  (tmp_path / 'lco25m' / 'F2').mkdir(parents=True)
  for rel in ('apo25m/F1/apStar-r8-2M01+1.fits', 'lco25m/F2/asStar-r8-2M01+1.fits',
              'apo25m/F1/apStar-r8-2M03-3.fits.gz', 'apo25m/F1/renamed.fits',
              'apo25m/F1/apStar-r8-2M09+9.fits'):
    (tmp_path / rel).write_bytes(b'')
  _table(FILE=['', 'apo25m/F1/renamed.fits', '']).write(tmp_path / 'labels.ecsv')
  stars = labels.read_label_catalog(tmp_path / 'labels.ecsv')
  matched, problems = labels.match_files(stars, tmp_path)
  got = {s.apogee_id: labels.relative_path(p, tmp_path) for s, p in matched}
  assert got == {'2M01+1': 'apo25m/F1/apStar-r8-2M01+1.fits',
                 '2M02+2': 'apo25m/F1/renamed.fits',
                 '2M03-3': 'apo25m/F1/apStar-r8-2M03-3.fits.gz'}
  reasons = {(p.file, p.reason.split(':')[0]) for p in problems}
  assert reasons == {('lco25m/F2/asStar-r8-2M01+1.fits',
                      'another file for this APOGEE_ID was used'),
                     ('apo25m/F1/apStar-r8-2M09+9.fits', 'no catalogue row for this file')}


def test_row_without_file_is_a_problem(tmp_path):
  _table(FILE=['', 'nowhere.fits', '']).write(tmp_path / 'labels.ecsv')
  matched, problems = labels.match_files(labels.read_label_catalog(tmp_path / 'labels.ecsv'), tmp_path)
  assert matched == []
  assert sorted(p.apogee_id for p in problems) == ['2M01+1', '2M02+2', '2M03-3']
  assert any('does not exist' in p.reason for p in problems)


def test_skip_report_round_trip(tmp_path):
  problems = [labels.Problem('a/b.fits', '2M1', 'x, with "quotes"'), labels.Problem('', '2M2', 'y')]
  labels.write_problems(problems, tmp_path / 'skipped.csv')
  assert labels.read_problems(tmp_path / 'skipped.csv') == problems
  labels.write_problems([], tmp_path / 'empty.csv')
  assert (tmp_path / 'empty.csv').read_text().strip() == 'file,apogee_id,reason'


def test_file_outside_manual_dir_is_refused(tmp_path):
  # The catalogue is data; its FILE must not reach files outside manual_dir.
  manual = tmp_path / 'manual'
  (manual / 'sub').mkdir(parents=True)
  (manual / 'sub' / 'inside.fits').write_bytes(b'')
  (tmp_path / 'outside.fits').write_bytes(b'')
  # A symlinked folder inside manual_dir is the owner's choice (data on another disk): allowed.
  (tmp_path / 'elsewhere').mkdir()
  (tmp_path / 'elsewhere' / 'linked.fits').write_bytes(b'')
  (manual / 'disk2').symlink_to(tmp_path / 'elsewhere')
  files = ['../outside.fits', str(tmp_path / 'outside.fits'), 'sub/../sub/inside.fits']
  _table(FILE=files).write(manual / 'labels.ecsv')
  stars = labels.read_label_catalog(manual / 'labels.ecsv')
  matched, problems = labels.match_files(stars, manual)
  assert [s.apogee_id for s, _ in matched] == ['2M03-3']
  refused = {p.apogee_id: p for p in problems}
  assert set(refused) == {'2M01+1', '2M02+2'}
  for star_id, file in (('2M01+1', '../outside.fits'), ('2M02+2', str(tmp_path / 'outside.fits'))):
    assert refused[star_id].file == file
    assert 'outside the manual_dir' in refused[star_id].reason
  absolute_inside = _table(ids=('2M04+4',), FILE=[str(manual / 'disk2' / 'linked.fits')])
  absolute_inside['DATA_TYPE'] = ['Payne']
  absolute_inside.write(manual / 'labels.ecsv', overwrite=True)
  matched, problems = labels.match_files(labels.read_label_catalog(manual / 'labels.ecsv'), manual)
  assert [s.apogee_id for s, _ in matched] == ['2M04+4'] and not [
      p for p in problems if p.apogee_id == '2M04+4']


def test_bom_in_csv_catalogue_is_accepted(tmp_path):
  # Excel writes "UTF-8 with BOM"; the BOM glued to the first column name.
  _table().write(tmp_path / 'plain.csv')
  (tmp_path / 'labels.csv').write_bytes(b'\xef\xbb\xbf' + (tmp_path / 'plain.csv').read_bytes())
  stars = labels.read_label_catalog(tmp_path / 'labels.csv')
  assert [s.apogee_id for s in stars] == ['2M01+1', '2M02+2', '2M03-3']


def test_near_miss_names_are_reported_unless_given_in_file(tmp_path):
  # A misnamed apStar file is listed, not silently ignored.
  for name in ('apStar-2M01+1.fits', 'apstar-r8-2M02+2.fits', 'apStar-r8-2M03-3.fits'):
    (tmp_path / name).write_bytes(b'')
  _table(FILE=['', 'apstar-r8-2M02+2.fits', '']).write(tmp_path / 'labels.ecsv')
  matched, problems = labels.match_files(labels.read_label_catalog(tmp_path / 'labels.ecsv'), tmp_path)
  assert sorted(s.apogee_id for s, _ in matched) == ['2M02+2', '2M03-3']
  near = [p for p in problems if 'named like an apStar file' in p.reason]
  assert [p.file for p in near] == ['apStar-2M01+1.fits']


@pytest.mark.parametrize('column, bad', [('TEFF', 1e39), ('TEFF', 1e30), ('LOGG', 12.0),
                                         ('FE_H', -20.0)])
def test_label_outside_its_physical_range_raises_naming_the_row(tmp_path, column, bad):
  # TEFF = 1e39 became inf in float32; 1e30 trained with a Teff mean of 2.4e28.
  t = _table()
  t[column][2] = bad
  t.write(tmp_path / 'labels.fits')
  lo, hi = labels.LABEL_RANGES[column]
  with pytest.raises(labels.LabelCatalogError,
                     match=rf'{column} outside .*{lo:g}.*{hi:g}.*row 2 \(2M03-3'):
    labels.read_label_catalog(tmp_path / 'labels.fits')


def test_input_tables_that_are_special_files_are_refused_by_name(tmp_path):
  """make_labels' and the build's table readers never open /dev/zero or a FIFO (they would
  never end): one clear error naming the file."""
  import os

  from apogeenet_jax.label_sources import common, isochrones
  zero = tmp_path / 'labels.fits'
  os.symlink('/dev/zero', zero)
  assert labels.find_catalog(tmp_path) == zero
  with pytest.raises(labels.LabelCatalogError, match=r'labels\.fits: a character device, not a '
                     r'regular file'):
    labels.read_label_catalog(zero)
  fifo = tmp_path / 'payne.csv'
  os.mkfifo(fifo)
  with pytest.raises(common.SourceTableError, match=r'FIFO.*not a regular file'):
    common.read_table(fifo)
  with pytest.raises(common.SourceTableError, match=r'not a regular file'):
    isochrones.read_cmd_file(zero)


def test_photometry_columns_are_optional_nan_where_empty_and_kept_as_given(tmp_path):
  """PLX … K and their errors in METADATA_COLUMNS order whatever the column order; an empty CSV
  cell or an absent column is NaN; 99.999 (catalogues' "missing") stays 99.999."""
  (tmp_path / 'labels.csv').write_text(
      'APOGEE_ID,LOGG,TEFF,FE_H,DATA_TYPE,K,h,J,PLX,G,BP,RP,PLX_ERR\n'
      '2M01+1,2.5,4700,0,Payne,9.1,9.2,99.999,1.5,12.0,12.4,11.5,0.03\n'
      '2M02+2,4.5,3500,0,MStar,8.1,,8.5,,13.0,14.0,12.0,\n')
  stars = labels.read_label_catalog(tmp_path / 'labels.csv')
  np.testing.assert_array_equal(stars[0].metadata,
                                np.float32([1.5, 12.0, 12.4, 11.5, 99.999, 9.2, 9.1]))
  np.testing.assert_array_equal(stars[1].metadata,
                                np.float32([np.nan, 13.0, 14.0, 12.0, 8.5, np.nan, 8.1]))
  np.testing.assert_array_equal(stars[0].metadata_err, np.float32([0.03] + [np.nan] * 6))
  assert np.isnan(labels.read_label_catalog(_write(tmp_path))[0].metadata).all()
  (tmp_path / 'labels.csv').write_text(
      'APOGEE_ID,LOGG,TEFF,FE_H,DATA_TYPE,G\n2M01+1,2.5,4700,0,Payne,bright\n')
  with pytest.raises(labels.LabelCatalogError, match='G is not numeric'):
    labels.read_label_catalog(tmp_path / 'labels.csv')


def _write(tmp_path):
  _table().write(tmp_path / 'plain.fits')
  return tmp_path / 'plain.fits'
