"""Regenerates dummy_data/: 5 tiny SYNTHETIC apStar files (.fits.gz) + labels.ecsv.

  python -m tfds_apogee.apogee.make_dummy_data

Besides the 5 good stars (3 train, 1 dev, 1 test by the SPLIT column) the catalogue has one row
whose file is not FITS and one row without any file: both must land in skipped.csv, not in a split.
"""

import pathlib
import shutil
import tempfile

from astropy.table import Table

from apogeenet_jax import synthetic

DUMMY_DIR = pathlib.Path(__file__).resolve().parent / 'dummy_data'
SPLITS = ('train', 'train', 'train', 'dev', 'test')
BAD_FILE_ID = '2M99999999+0000000'
MISSING_FILE_ID = '2M99999998+0000000'


def main():
  if DUMMY_DIR.exists():
    shutil.rmtree(DUMMY_DIR)
  with tempfile.TemporaryDirectory() as tmp:
    catalog = synthetic.write_survey(tmp, num_stars=len(SPLITS), seed=7, compress=True,
                                     show_progress=False)
    table = Table.read(catalog)
    shutil.copytree(pathlib.Path(tmp) / 'synthetic', DUMMY_DIR / 'synthetic')
  table = table['APOGEE_ID', 'LOGG', 'TEFF', 'FE_H', 'DATA_TYPE', 'FILE']
  table['SPLIT'] = list(SPLITS)
  bad = 'synthetic/BAD/apStar-synth-' + BAD_FILE_ID + '.fits'
  (DUMMY_DIR / bad).parent.mkdir(parents=True)
  (DUMMY_DIR / bad).write_text('not a FITS file: the builder must skip it and report it\n')
  table.add_row((BAD_FILE_ID, 2.5, 4700.0, 0.0, 'Payne', bad, 'train'))
  table.add_row((MISSING_FILE_ID, 4.5, 3500.0, 0.0, 'MStar', '', 'train'))
  table.meta = {'comment': 'SYNTHETIC dummy data for the apogee TFDS builder tests'}
  table.write(DUMMY_DIR / 'labels.ecsv', overwrite=True)


if __name__ == '__main__':
  main()
