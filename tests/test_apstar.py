"""apogeenet_jax.apstar on the real SDSS files and on broken copies of them."""

import os
import shutil

import numpy as np
import pytest
from astropy.io import fits

from apogeenet_jax import apstar, constants

SINGLE_VISIT_ID = '2M03290406+3117075'


def test_reads_every_real_file(real_apstar_files):
  for path in real_apstar_files:
    s = apstar.read_apstar(path)
    with fits.open(path) as hdul:
      flux = hdul[1].data
      err = hdul[2].data
      header = hdul[0].header
      row = 0 if flux.ndim == 2 else ...
      # Row 0 (pixel-weighted combined) when 2-D, the array itself when NVISITS = 1.
      np.testing.assert_array_equal(s.flux, flux[row])
      np.testing.assert_array_equal(s.flux_err, err[row])
      np.testing.assert_array_equal(s.mask, hdul[3].data[row])
      assert s.apogee_id == header['OBJID'] == apstar.apogee_id_from_filename(path)
      assert s.nvisits == header['NVISITS']
      assert s.snr == pytest.approx(header['SNR'])
      assert s.ra == pytest.approx(header['RA']) and s.dec == pytest.approx(header['DEC'])
      assert s.telescope == 'apo25m' and s.field == header['FIELD'].strip()
    assert s.flux.shape == s.flux_err.shape == s.mask.shape == (constants.N_PIXELS,)
    assert s.flux.dtype == np.float32 and s.flux.dtype.isnative and s.flux_err.dtype.isnative
    # The real files mark 800-900 pixels per star as flux 0 / error 1e10 (data/README.md).
    assert 780 <= s.n_bad_pixels <= 950, (path, s.n_bad_pixels)
    assert np.all(s.flux[s.bad_pixels] == 0) and np.all(s.flux_err[s.bad_pixels] == 1e10)
    assert s.bad_pixels[0] and s.bad_pixels[-1]


def test_single_visit_file_is_1d_and_read(real_apstar_files):
  path = next(p for p in real_apstar_files if SINGLE_VISIT_ID in p.name)
  with fits.open(path) as hdul:
    assert hdul[1].data.ndim == 1
  s = apstar.read_apstar(path)
  assert s.nvisits == 1 and s.field == 'N1333'
  np.testing.assert_array_equal(s.flux, fits.getdata(path, 1))


def test_multi_visit_reads_row_0_not_row_1(real_apstar_files):
  path = next(p for p in real_apstar_files if fits.getheader(p)['NVISITS'] > 2)
  rows = fits.getdata(path, 1)
  s = apstar.read_apstar(path)
  assert not np.array_equal(rows[0], rows[1])
  np.testing.assert_array_equal(s.flux, rows[0])


def test_wavelength_grid():
  wave = apstar.wavelength_grid()
  assert wave.dtype == np.float64 and wave.shape == (constants.N_PIXELS,)
  assert wave[0] == pytest.approx(15100.80, abs=0.01)  # 10**4.179 Å
  assert wave[-1] == pytest.approx(16999.81, abs=0.01)


def test_find_apstar_files(tmp_path, real_apstar_files):
  (tmp_path / 'apo25m' / 'F1').mkdir(parents=True)
  shutil.copy(real_apstar_files[0], tmp_path / 'apo25m' / 'F1' / real_apstar_files[0].name)
  (tmp_path / 'asStar-r8-2M00000000+0000000.fits.gz').write_bytes(b'')
  (tmp_path / 'apVisit-r8-1-2-3.fits').write_bytes(b'')
  (tmp_path / 'notes.txt').write_text('x')
  found = [p.replace(str(tmp_path) + '/', '') for p in apstar.find_apstar_files(tmp_path)]
  assert found == [f'apo25m/F1/{real_apstar_files[0].name}',
                   'asStar-r8-2M00000000+0000000.fits.gz']


def test_symlink_loops_visit_each_real_file_once(tmp_path):
  # One loop gave 41 copies of one star, two loops never ended.
  (tmp_path / 'apo25m' / 'F1').mkdir(parents=True)
  (tmp_path / 'apo25m' / 'F1' / 'apStar-r8-2M01+1.fits').write_bytes(b'')
  (tmp_path / 'apo25m' / 'F1' / 'loop').symlink_to(tmp_path)
  (tmp_path / 'apo25m' / 'back').symlink_to(tmp_path / 'apo25m')
  (tmp_path / 'alias').symlink_to(tmp_path / 'apo25m' / 'F1')
  (tmp_path / 'apStar-r8-2M02+2.fits').write_bytes(b'')
  (tmp_path / 'apStar-r8-2M02+2-link.fits').symlink_to(tmp_path / 'apStar-r8-2M02+2.fits')
  found, near = apstar.scan_apstar_files(tmp_path)
  assert sorted(os.path.realpath(p) for p in found) == sorted(
      str((tmp_path / p).resolve()) for p in ('apo25m/F1/apStar-r8-2M01+1.fits',
                                              'apStar-r8-2M02+2.fits'))
  assert near == []
  assert apstar.find_apstar_files(tmp_path) == found


def test_names_like_apstar_that_do_not_match_are_near_misses(tmp_path):
  for name in ('apStar-2M01+1.fits', 'APSTAR-r8-2M01+1.fits', 'asStar-r8-2M02+2.fits.bz2',
               'apStar-r8-2M03+3.fits', 'apVisit-r8-1-2-3.fits'):
    (tmp_path / name).write_bytes(b'')
  found, near = apstar.scan_apstar_files(tmp_path)
  assert [os.path.basename(p) for p in found] == ['apStar-r8-2M03+3.fits']
  assert [os.path.basename(p) for p in near] == ['APSTAR-r8-2M01+1.fits', 'apStar-2M01+1.fits',
                                                 'asStar-r8-2M02+2.fits.bz2']


def test_id_from_filename_keeps_minus_sign():
  assert apstar.apogee_id_from_filename('a/apStar-r8-2M17334253-1654573.fits') == \
      '2M17334253-1654573'
  assert apstar.apogee_id_from_filename('asStar-dr17-2M00+01.fits.gz') == '2M00+01'
  assert apstar.apogee_id_from_filename('aspcapStar-r8-2M00.fits') is None


@pytest.fixture
def real_file(real_apstar_files):
  return next(p for p in real_apstar_files if SINGLE_VISIT_ID not in p.name)


def test_truncated_copy_raises(tmp_path, real_file):
  broken = tmp_path / real_file.name
  broken.write_bytes(real_file.read_bytes()[:400_000])  # Cut inside the flux HDU.
  with pytest.raises(apstar.ApStarError, match='truncated') as e:
    apstar.read_apstar(broken)
  assert str(e.value).startswith(str(broken))


def test_text_file_named_fits_raises(tmp_path):
  path = tmp_path / 'apStar-r8-2M00000000+0000000.fits'
  path.write_text('SIMPLE? no, this is a text file\n')
  with pytest.raises(apstar.ApStarError, match='not a readable FITS') as e:
    apstar.read_apstar(path)
  assert str(e.value).startswith(str(path))


def test_missing_file_raises(tmp_path):
  with pytest.raises(apstar.ApStarError, match='no such file'):
    apstar.read_apstar(tmp_path / 'apStar-r8-2M0.fits')


def _rewrite(src, dst, edit):
  with fits.open(src) as hdul:
    hdul = fits.HDUList([h.copy() for h in hdul])
  edit(hdul)
  hdul.writeto(dst)
  return dst


def _set_nwave(hdul):
  hdul[0].header['NWAVE'] = 8000


def _shift_grid(hdul):
  hdul[0].header['CRVAL1'] = 4.18


def _cut_pixels(hdul):
  hdul[1].data = hdul[1].data[:, :8000]


@pytest.mark.parametrize('edit, message', [
    (_set_nwave, 'NWAVE = 8000'),
    (_shift_grid, 'wavelength grid'),
    (_cut_pixels, '8000 pixels'),
])
def test_wrong_grid_raises(tmp_path, real_file, edit, message):
  path = _rewrite(real_file, tmp_path / real_file.name, edit)
  with pytest.raises(apstar.ApStarError, match=message):
    apstar.read_apstar(path)


def test_missing_hdus_raise(tmp_path, real_file):
  def edit(hdul):
    del hdul[2:]
  path = _rewrite(real_file, tmp_path / real_file.name, edit)
  with pytest.raises(apstar.ApStarError, match='missing HDU2'):
    apstar.read_apstar(path)


def test_all_bad_pixels_raise(tmp_path, real_file):
  def edit(hdul):
    hdul[1].data[:] = 0
    hdul[2].data[:] = 1e10
  path = _rewrite(real_file, tmp_path / real_file.name, edit)
  with pytest.raises(apstar.ApStarError, match='all 8575 pixels are bad'):
    apstar.read_apstar(path)


def test_nan_pixels_are_reported_not_hidden(tmp_path, real_file):
  def edit(hdul):
    hdul[1].data[0, 4000:4010] = np.nan
  path = _rewrite(real_file, tmp_path / real_file.name, edit)
  s = apstar.read_apstar(path)
  assert np.isnan(s.flux[4000:4010]).all()  # Raw: not replaced here.
  assert s.bad_pixels[4000:4010].all()
  assert s.n_bad_pixels == apstar.read_apstar(real_file).n_bad_pixels + 10


# ------------------------------------------------------------------------------------------------
# Only regular files are opened, and one file's cost is bounded: a link to /dev/zero or a FIFO
# named like an apStar file never hangs or grows a reader.


def _special_files(directory):
  """A link to /dev/zero and a FIFO, both named like apStar files; returns their paths."""
  zero = directory / 'apStar-x-2M99000001+0000000.fits'
  os.symlink('/dev/zero', zero)
  fifo = directory / 'apStar-x-2M99000002+0000000.fits'
  os.mkfifo(fifo)
  return [zero, fifo]


def test_special_files_are_refused_before_they_are_opened(tmp_path):
  for path in _special_files(tmp_path):
    with pytest.raises(apstar.ApStarError, match=r'not a regular file'):
      apstar.read_apstar(path)
  with pytest.raises(apstar.ApStarError, match=r'not a regular file'):
    apstar.read_apstar(tmp_path)  # a directory


def test_a_file_above_the_size_limit_is_refused(tmp_path, monkeypatch):
  import gzip
  monkeypatch.setattr(apstar, 'MAX_FILE_BYTES', 100_000)
  big = tmp_path / 'apStar-r8-2M00000001+0000000.fits'
  big.write_bytes(b'\0' * 100_001)
  with pytest.raises(apstar.ApStarError, match=r'above the limit'):
    apstar.read_apstar(big)
  bomb = tmp_path / 'apStar-r8-2M00000002+0000000.fits.gz'
  bomb.write_bytes(gzip.compress(b'\0' * 1_000_000))  # 1 kB on disk, 1 MB inside
  with pytest.raises(apstar.ApStarError, match=r'decompresses to more than'):
    apstar.read_apstar(bomb)


def test_a_gzipped_real_file_reads_as_the_file(tmp_path, real_file):
  import gzip
  packed = tmp_path / (real_file.name + '.gz')
  packed.write_bytes(gzip.compress(real_file.read_bytes()))
  np.testing.assert_array_equal(apstar.read_apstar(packed).flux,
                                apstar.read_apstar(real_file).flux)


# ------------------------------------------------------------------------------------------------
# The rules a spectrum must pass, the build's and inference's alike.


def _flux_cases(spectrum):
  flux, err = spectrum.flux.copy(), spectrum.flux_err.copy()
  one_good = np.zeros_like(flux)
  one_good[100] = flux[100]
  one_err = np.full_like(err, constants.BAD_PIXEL_ERROR)
  one_err[100] = err[100]
  return {
      'one good pixel': (one_good, one_err, 'too little spectrum'),
      'every good pixel negative': (-np.abs(flux), err, 'too little spectrum'),
      'a flux level of 1e-40': (flux * np.float32(1e-40), err * np.float32(1e-40),
                                'below 0.001'),
      'flux x 1e28': (flux * np.float32(1e28), err * np.float32(1e28), 'above 1e+10'),
      '3e38 in a few pixels': (np.where(np.arange(flux.size) < 5, np.float32(3e38), flux), err,
                               'above 1e+10'),
      'half the pixels negative': (np.where(np.arange(flux.size) % 2 == 0, -flux, flux), err,
                                   'not positive'),
  }


def test_spectrum_rules_refuse_empty_or_absurd_spectra(real_file):
  spectrum = apstar.read_apstar(real_file)
  assert apstar.spectrum_problem(spectrum.flux, spectrum.flux_err) is None
  for name, (flux, err, reason) in _flux_cases(spectrum).items():
    problem = apstar.spectrum_problem(flux, err)
    assert problem and reason in problem, (name, problem)
