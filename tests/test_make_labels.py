"""make_labels: merge precedence, the whole chain on fake inputs, and the builder accepting it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from astropy.table import Table

from apogeenet_jax import labels, make_labels, synthetic
from apogeenet_jax.label_sources import common, fake_isochrones, isochrones, merge, relations
from tfds_apogee import build as build_lib


def _source(ids, data_type, teff):
  return common.label_table(ids, [4.0] * len(ids), [teff] * len(ids), [0.0] * len(ids),
                            data_type, f'{data_type} test')


def test_merge_precedence_yso_over_mstar_over_payne():
  report = []
  out = merge.merge([_source(['a', 'b', 'c'], 'Payne', 5000.0),
                     _source(['b', 'c'], 'MStar', 3500.0),
                     _source(['c', 'd'], 'YSO', 3000.0)], report)
  by_id = {r['APOGEE_ID']: r for r in out}
  assert sorted(by_id) == ['a', 'b', 'c', 'd']
  assert by_id['a']['DATA_TYPE'] == 'Payne' and by_id['a']['ALSO_IN'] == ''
  assert by_id['b']['DATA_TYPE'] == 'MStar' and by_id['b']['TEFF'] == 3500.0
  assert by_id['b']['ALSO_IN'] == 'Payne'
  assert by_id['c']['DATA_TYPE'] == 'YSO' and by_id['c']['ALSO_IN'] == 'MStar,Payne'
  removed = {c.cut: c.removed for c in report}
  assert removed['Payne rows superseded by a higher-precedence source'] == 2
  assert removed['MStar rows superseded by a higher-precedence source'] == 1


def _mstar_row(apogee_id, mk=7.0):
  plx = 50.0
  k = mk + 5 * np.log10(100.0 / plx)
  return (apogee_id, k + 0.85, k, k + 5.0, plx, 1.0, 'K2_C5', 200.0, 40.0)


@pytest.mark.slow  # ~10 s: a tiny YSO network and a tiny TFDS build
def test_make_labels_end_to_end_and_the_builder_accepts_it(tmp_path):
  manual = tmp_path / 'manual'
  synthetic.write_survey(manual, num_stars=6, seed=3, show_progress=False)
  truth = Table.read(manual / 'labels.fits')
  os.remove(manual / 'labels.fits')  # make_labels writes the catalogue now
  ids = [str(i) for i in truth['APOGEE_ID']]

  payne_arr = np.zeros((5, 22))
  payne_arr[:, 0] = [5000, 4500, 3900, 4800, 4700]
  payne_arr[:, 1] = [2.5, 2.0, 4.7, 3.0, 2.8]
  payne_arr[:, 19] = [0.0, -0.2, 0.1, -9999, 0.05]
  Table({'APOGEE_ID': [*ids[:4], '2M_not_observed'], 'payne': payne_arr,
         'good_flag': [1, 1, 1, 1, 1]}).write(tmp_path / 'payne.fits')
  # ids[2] is a cool dwarf (Payne cut drops it); ids[1] is in Payne AND selected as MStar.
  Table(rows=[_mstar_row(ids[1]), _mstar_row(ids[2], 6.5)],
        names=('APOGEE_ID', 'J', 'K', 'G', 'PARALLAX', 'PARALLAX_ERROR', 'FIELD', 'RA', 'DEC')
        ).write(tmp_path / 'phot.csv')
  (tmp_path / 'feh.json').write_text(json.dumps({'source': 'TEST constant', 'terms': [[-0.1, 0, 0]]}))

  iso_paths = fake_isochrones.write(tmp_path / 'iso')
  stars = isochrones.synthesize(isochrones.read_isochrones(iso_paths), 2, seed=9)
  members = Table({b: np.asarray(stars[b]) for b in isochrones.BANDS})
  members['APOGEE_ID'] = [ids[4], ids[2]]  # ids[2] also MStar → YSO wins
  members['PARALLAX'] = 1000.0 / np.asarray(stars['DISTANCE'])
  members.write(tmp_path / 'members.fits')
  config = make_labels_config()

  request = make_labels.LabelRequest(
      output=str(manual / 'labels.fits'), payne=str(tmp_path / 'payne.fits'),
      photometry=str(tmp_path / 'phot.csv'), feh_relation=str(tmp_path / 'feh.json'),
      yso_members=str(tmp_path / 'members.fits'), isochrones=iso_paths,
      yso_workdir=str(tmp_path / 'yso'), yso_config=config)
  _, _, summary = make_labels.make_labels(request)
  got = {s.apogee_id: s for s in labels.read_label_catalog(manual / 'labels.fits')}
  # ids[3] has [Fe/H] = −9999; the unobserved Payne star is labelled (the builder skips it).
  assert sorted(got) == sorted([ids[0], ids[1], ids[2], ids[4], '2M_not_observed'])
  assert got[ids[0]].data_type == 'Payne'
  assert got[ids[1]].data_type == 'MStar'
  assert got[ids[1]].labels[1] == pytest.approx(relations.mann_teff_from_mk(7.0), abs=0.01)
  assert got[ids[2]].data_type == 'YSO' and got[ids[4]].data_type == 'YSO'
  assert summary['counts'] == {'YSO': 2, 'MStar': 1, 'Payne': 2}
  assert summary['mstar_logg_crosscheck_veyette_minus_mann_mass_radius']['n'] == 2
  cuts = common.read_cut_report(manual / make_labels.REPORT_NAME)
  assert ('Payne', 'FE_H missing (-9999 or empty)', 1) in [(c.source, c.cut, c.removed)
                                                            for c in cuts]

  builder = build_lib.build(str(manual), str(tmp_path / 'tfds'), num_workers=1)
  counts = {name: s.num_examples for name, s in builder.info.splits.items()}
  assert sum(counts.values()) == 4  # the labelled stars with an apStar file


def make_labels_config():
  from apogeenet_jax import yso_photometric
  config = yso_photometric.default_config()
  config.num_train, config.num_dev, config.num_test = 256, 64, 64
  config.channels, config.hidden, config.max_epochs = (4, 4, 4), 16, 2
  return config


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'apogeenet_jax.make_labels', *args],
                        capture_output=True, text=True, cwd=os.getcwd(), timeout=120,
                        env={**os.environ, 'PYTHONPATH': os.getcwd()})


def test_cli_stops_without_feh_relation_or_isochrones(tmp_path):
  Table({'APOGEE_ID': ['a']}).write(tmp_path / 'phot.csv')
  run = _cli(f'--output={tmp_path}/labels.fits', f'--photometry={tmp_path}/phot.csv')
  assert run.returncode != 0
  assert 'Hejazi et al. 2015' in run.stderr and 'not shipped' in run.stderr
  run = _cli(f'--output={tmp_path}/labels.fits', f'--yso_members={tmp_path}/phot.csv',
             f'--yso_workdir={tmp_path}/none')
  assert run.returncode != 0 and 'PARSEC' in run.stderr and 'never downloaded' in run.stderr
  assert not (tmp_path / 'labels.fits').exists()


def test_star_forming_region_flags(tmp_path):
  paper = make_labels.regions_from_flags('paper', 'paper')
  assert 'PLEIADES' in paper.field_patterns and len(paper.circles) == 7
  none = make_labels.regions_from_flags('none', 'none')
  assert none.field_patterns == () and none.circles == ()
  (tmp_path / 'circles.csv').write_text('name,ra,dec,radius\nTaurus,68.0,26.0,5\n')
  mine = make_labels.regions_from_flags('TAURUS, L1495', str(tmp_path / 'circles.csv'))
  assert mine.field_patterns == ('TAURUS', 'L1495')
  assert mine.circles == (make_labels.mstar.SkyCircle('Taurus', 68.0, 26.0, 5.0),)
  (tmp_path / 'bad.csv').write_text('name,ra\nx,1\n')
  with pytest.raises(common.SourceTableError, match=r'bad\.csv'):
    make_labels.regions_from_flags('none', str(tmp_path / 'bad.csv'))


def _payne_table(path, teff, flag):
  arr = np.zeros((len(teff), 22))
  arr[:, 0], arr[:, 1] = teff, 2.5
  Table({'APOGEE_ID': [f'2M{i:08d}+0000000' for i in range(len(teff))], 'payne': arr,
         'good_flag': flag}).write(path, overwrite=True)


def test_a_failed_run_leaves_the_good_catalogue_and_its_reports(tmp_path):
  # Every row cut used to leave a 0-row labels.fits beside the old reports.
  _payne_table(tmp_path / 'payne.fits', [5000.0, 4800.0], [1, 1])
  out = tmp_path / 'm' / 'labels.fits'
  run = _cli(f'--output={out}', f'--payne={tmp_path}/payne.fits')
  assert run.returncode == 0, run.stderr[-2000:]
  names = ('labels.fits', make_labels.REPORT_NAME, make_labels.SUMMARY_NAME)
  before = {n: (out.parent / n).read_bytes() for n in names}
  _payne_table(tmp_path / 'payne.fits', [5000.0, 4800.0], [0, 0])  # every row cut
  run = _cli(f'--output={out}', f'--payne={tmp_path}/payne.fits')
  assert run.returncode != 0 and 'Traceback' not in run.stderr
  assert 'no rows' in run.stderr
  # One line naming the problem, not the flags' help before it.
  assert run.stderr.strip().splitlines()[-1].startswith('FATAL ')
  assert '--payne_array' not in run.stderr
  assert {n: (out.parent / n).read_bytes() for n in names} == before
  assert sorted(os.listdir(out.parent)) == sorted(names)  # no staging folder left


def test_output_over_an_input_is_refused(tmp_path):
  _payne_table(tmp_path / 'payne.fits', [5000.0], [1])
  before = (tmp_path / 'payne.fits').read_bytes()
  run = _cli(f'--output={tmp_path}/payne.fits', f'--payne={tmp_path}/payne.fits')
  assert run.returncode != 0 and 'Traceback' not in run.stderr
  assert 'is also an input' in run.stderr
  assert (tmp_path / 'payne.fits').read_bytes() == before
