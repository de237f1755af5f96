"""apogeenet_jax.synthetic: real apStar format, clean default survey, labels visible in the flux."""

import collections
import hashlib
import pathlib

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from apogeenet_jax import apstar, constants, labels, photometry, synthetic


@pytest.fixture(scope='module')
def survey(tmp_path_factory):
  out = tmp_path_factory.mktemp('synth')
  catalog = synthetic.write_survey(out, num_stars=24, seed=3, show_progress=False)
  return out, catalog


def test_catalogue_matches_files_and_headers(survey):
  out, catalog = survey
  stars = labels.read_label_catalog(catalog)
  matched, problems = labels.match_files(stars, out)
  assert problems == [] and len(matched) == 24
  assert set(collections.Counter(s.data_type for s in stars)) == set(constants.DATA_TYPES)
  for star, path in matched:
    assert apstar.apogee_id_from_filename(path) == star.apogee_id
    assert star.apogee_id.startswith('2M99')
    header = fits.getheader(path)
    assert header['TELESCOP'] == 'SYNTHETIC' and header['SYNTHETC'] is True
    assert header['FIELD'].startswith('SYNTH')
    np.testing.assert_allclose([header['SYNLOGG'], header['SYNTEFF'], header['SYNFEH']],
                               star.labels, rtol=1e-6)


def test_files_follow_the_real_layout(survey, real_apstar_files):
  out, _ = survey
  real = fits.open(real_apstar_files[0])
  n_visits = collections.Counter()
  for path in apstar.find_apstar_files(out):
    with fits.open(path) as hdul:
      hdul.verify('exception')
      assert len(hdul) == len(real) == 10
      nvisits = hdul[0].header['NVISITS']
      n_visits[nvisits > 1] += 1
      for i in range(1, 8):
        assert hdul[i].data.dtype == real[i].data.dtype  # Big-endian >f4 / >i2 like SDSS.
        expected = (constants.N_PIXELS,) if nvisits == 1 else (nvisits + 2, constants.N_PIXELS)
        assert hdul[i].data.shape == expected
      for key in ('CRVAL1', 'CDELT1', 'NWAVE'):
        assert hdul[0].header[key] == real[0].header[key]
    s = apstar.read_apstar(path)
    # Chip gaps and array ends exactly like real files: flux 0, error 1e10, 800-900 pixels.
    assert 700 <= s.n_bad_pixels <= 1000
    assert s.bad_pixels[:150].all() and s.bad_pixels[-150:].all()
    assert s.bad_pixels[3400] and s.bad_pixels[6200] and not s.bad_pixels[1000]
    assert np.isfinite(s.flux).all() and np.isfinite(s.flux_err).all()
    good = s.flux_err[~s.bad_pixels]
    assert good.max() > 50 * np.median(good)  # A few huge errors, as in real spectra.
    assert 3 < s.snr < 600
  assert n_visits[True] > 0 and n_visits[False] > 0  # Both 1-D and NVISITS+2-row files.


def test_bad_pixel_edges_vary_between_stars(survey):
  out, _ = survey
  counts = {apstar.read_apstar(p).n_bad_pixels for p in apstar.find_apstar_files(out)}
  assert len(counts) > 5


def test_same_seed_same_survey(tmp_path):
  a = synthetic.write_survey(tmp_path / 'a', 4, seed=1, show_progress=False)
  b = synthetic.write_survey(tmp_path / 'b', 4, seed=1, show_progress=False)
  c = synthetic.write_survey(tmp_path / 'c', 4, seed=2, show_progress=False)
  ta, tb, tc = Table.read(a), Table.read(b), Table.read(c)
  np.testing.assert_array_equal(ta['TEFF'], tb['TEFF'])
  assert not np.array_equal(ta['TEFF'], tc['TEFF'])
  fa = apstar.find_apstar_files(tmp_path / 'a')[0]
  fb = apstar.find_apstar_files(tmp_path / 'b')[0]
  assert open(fa, 'rb').read() == open(fb, 'rb').read()


@pytest.mark.parametrize('index', [0, 1, 2])
def test_each_label_changes_the_flux(index):
  base = np.array([3.0, 4500.0, -0.2])
  step = np.array([0.5, 300.0, 0.3])
  up = base.copy()
  up[index] += step[index]
  a = synthetic.model_flux(*base)
  b = synthetic.model_flux(*up)
  # Shape, not only level: compare after normalising each by its median.
  change = np.abs(a / np.median(a) - b / np.median(b)).mean()
  assert change > 0.005, (constants.LABEL_NAMES[index], change)


def _stars_and_combined_flux(n: int):
  """(star, combined flux row) of n stars of every kind in turn, seed 0."""
  rng = np.random.default_rng(0)
  for i in range(n):
    kind, data_type, _ = synthetic.KINDS[i % len(synthetic.KINDS)]
    star = synthetic.draw_star(i, 0, kind, data_type, rng)
    flux, _, _, _ = synthetic.simulate_rows(star, rng)
    yield star, flux[0]


def test_labels_are_learnable_from_noisy_flux():
  """A ridge regression on median-normalised noisy flux already recovers all three labels."""
  x, y = [], []
  for star, f in _stars_and_combined_flux(400):
    x.append(f[::4] / np.median(f[f > 0]))
    y.append((star.logg, star.teff, star.fe_h))
  x, y = np.array(x), np.array(y)
  n = 300
  xm, ym = x[:n].mean(0), y[:n].mean(0)
  a = x[:n] - xm
  w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ (y[:n] - ym))
  pred = (x[n:] - xm) @ w + ym
  r2 = 1 - ((pred - y[n:]) ** 2).mean(0) / y[n:].var(0)
  assert (r2 > 0.8).all(), dict(zip(constants.LABEL_NAMES, r2, strict=True))


def test_kind_mix_exact_for_small_surveys(tmp_path):
  catalog = synthetic.write_survey(tmp_path, 10, seed=0, show_progress=False)
  counts = collections.Counter(Table.read(catalog)['KIND'])
  assert counts == {'giant': 5, 'dwarf': 1, 'mdwarf': 2, 'yso': 2}


def test_flux_levels_and_continuum_shapes_vary_like_real_files():
  """Real apStar median fluxes span ~15 to ~15,000 and their chip-to-chip flux ratios vary by
  ~±10% beyond Teff: the survey's scale spreads over three decades and its response varies."""
  medians, ratios = [], []
  for star, f in _stars_and_combined_flux(400):
    medians.append(np.median(f[f > 0]))
    r = synthetic.response(star.response)  # the shape that is not the labels' Planck slope
    ratios.append(r[:3300].mean() / r[3544:6113].mean())
  assert np.percentile(medians, 95) / np.percentile(medians, 5) > 300
  assert 5 < np.min(medians) and np.max(medians) < 5e4
  assert 0.04 < np.std(ratios) < 0.2


def test_noise_is_the_stated_error_around_the_header_truth(survey):
  """The files' flux scatters around model_flux(header truth: labels, scale, response, telluric)
  by exactly the stored error on the good pixels (what the Cramér–Rao bound assumes)."""
  out, _ = survey
  for path in apstar.find_apstar_files(out):
    h = fits.getheader(path)
    s = apstar.read_apstar(path)
    model = synthetic.model_flux(h['SYNLOGG'], h['SYNTEFF'], h['SYNFEH'], h['SYNSCALE'],
                                 (h['SYNRESP1'], h['SYNRESP2']), h['SYNTELL'])
    good = ~s.bad_pixels
    chi2 = np.mean(((s.flux[good] - model[good]) / s.flux_err[good]) ** 2)
    # Huge-error pixels pull it below 1 a little (their flux has only the base noise).
    assert 0.94 < chi2 < 1.06, (path, chi2)


# The columns every survey had before the photometry and the hot kind were added.
_SPECTRAL_COLUMNS = ('APOGEE_ID', 'LOGG', 'TEFF', 'FE_H', 'DATA_TYPE', 'FILE', 'SNR', 'NVISITS',
                     'KIND')


def _survey_digest(out: pathlib.Path) -> str:
  """sha256 of every apStar file (relative path and bytes, sorted) and of the catalogue's
  _SPECTRAL_COLUMNS (strings joined by newlines, numbers as little-endian bytes)."""
  h = hashlib.sha256()
  for path in sorted(out.rglob('apStar-*')):
    h.update(str(path.relative_to(out)).encode())
    h.update(path.read_bytes())
  table = Table.read(out / 'labels.fits')
  for name in _SPECTRAL_COLUMNS:
    h.update(name.encode())
    v = np.asarray(table[name])
    h.update('\n'.join(map(str, v)).encode() if v.dtype.kind in 'USO'
             else v.astype(v.dtype.newbyteorder('<')).tobytes())
  return h.hexdigest()


def test_default_survey_is_bit_for_bit_the_one_before_photometry_and_hot_stars(survey):
  """Adding the photometry (its own random stream) and the hot kind (off by default) changed no
  spectrum and no label. The digest is _survey_digest of write_survey(out, 24, seed=3) computed
  with the code before either existed (main at 8fb82b2, `synthetic.write_survey` then
  `_survey_digest` above, run with PYTHONPATH pointing at that checkout)."""
  out, _ = survey
  assert _survey_digest(pathlib.Path(out)) == (
      'c5943fc1439dff13490f2ef70c5fcca04a31020c2d75647b6b7bc5f5910dcbc7')


def test_hot_fraction_adds_hot_payne_stars_and_scales_the_rest(tmp_path):
  catalog = synthetic.write_survey(tmp_path, 20, seed=0, show_progress=False, hot_fraction=0.1)
  table = Table.read(catalog)
  counts = collections.Counter(table['KIND'])
  assert counts == {'giant': 8, 'dwarf': 3, 'mdwarf': 4, 'yso': 3, 'hot': 2}
  hot = table[table['KIND'] == 'hot']
  assert set(hot['DATA_TYPE']) == {'Payne'}
  assert np.all((hot['TEFF'] >= 7000) & (hot['TEFF'] <= 20000))
  assert np.all((hot['LOGG'] >= 3.5) & (hot['LOGG'] <= 4.5))
  assert labels.read_label_catalog(catalog)  # Valid input catalogue.
  with pytest.raises(ValueError, match='hot_fraction'):
    synthetic.survey_kinds(1.0)


def test_hot_stars_show_hydrogen_lines_and_pressure_wings_only():
  """Metal, molecular and CO-like strengths fade above 6,500 K; the cool kinds are untouched."""
  for logg, teff, fe_h in ((4.1, 6500.0, 0.3), (2.0, 5200.0, -1.0)):  # Hottest default stars.
    t = teff / 5000.0  # The strengths as they were before the hot kind, bit for bit.
    before = [10.0 ** fe_h * (1.6 - 0.6 * t) * 1.5,
              np.exp(-(teff - 3000.0) / 600.0) * (1.0 + 0.5 * fe_h) * 1.2,
              (5.2 - logg) / 2.0 * 10.0 ** (0.5 * fe_h) * np.clip(1.5 - 0.5 * t, 0.3, None),
              np.clip(logg - 2.0, 0.0, None) / 2.5,
              np.clip((teff - 3500.0) / 2500.0, 0.0, None) * (0.5 + logg / 9.0)]
    np.testing.assert_array_equal(synthetic.line_strengths(logg, teff, fe_h), before)
  hot = synthetic.line_strengths(4.0, 15000.0, 0.0)
  assert np.all(hot[:3] < 0.01) and hot[3] > 0.5 and hot[4] > 2.0
  base = np.array([4.0, 12000.0, 0.0])
  for index, step in ((0, 0.5), (1, 2000.0)):  # log g and Teff stay visible in the flux.
    up = base.copy()
    up[index] += step
    a, b = synthetic.model_flux(*base), synthetic.model_flux(*up)
    assert np.abs(a / np.median(a) - b / np.median(b)).mean() > 0.005, index


def test_photometry_follows_the_labels_and_its_errors(survey):
  """The catalogue's PLX … K scatter around the noiseless relation at the true labels and
  DIST_PC by their stated errors; a few values are missing (NaN or 99.999)."""
  _, catalog = survey
  table = Table.read(catalog)
  values = np.stack([np.asarray(table[c], float) for c in constants.METADATA_COLUMNS], -1)
  errs = np.stack([np.asarray(table[c], float) for c in constants.METADATA_ERR_COLUMNS], -1)
  true = photometry.observables(np.asarray(table['LOGG'], float),
                                np.asarray(table['TEFF'], float),
                                np.asarray(table['DIST_PC'], float))
  ok = photometry.valid(values, errs)
  z = (values - true)[ok] / errs[ok]
  assert ok.mean() > 0.9 and 0.5 < np.std(z) < 1.5 and np.abs(z).max() < 5
  np.testing.assert_allclose(true[:, 0], 1000.0 / table['DIST_PC'])


def test_photometry_missing_values_and_error_ranges():
  rng = np.random.default_rng(1)
  lab = np.stack([rng.uniform(1, 5, 4000), rng.uniform(3000, 20000, 4000), np.zeros(4000)], -1)
  columns = photometry.draw(lab, rng)
  values = np.stack([columns[c] for c in constants.METADATA_COLUMNS], -1)
  errs = np.stack([columns[c] for c in constants.METADATA_ERR_COLUMNS], -1)
  missing = ~photometry.valid(values, errs)
  assert 0.01 < missing.mean() < 0.06
  assert np.any(values == photometry.CATALOGUE_MISSING) and np.any(np.isnan(values))
  assert np.nanmin(errs[:, 0]) >= 0.02 and np.nanmax(errs[:, 0]) <= 0.3
  assert np.nanmin(errs[:, 1:]) >= 0.001 and np.nanmax(errs[:, 1:]) <= 0.05


def test_photometric_relation_is_monotone_and_solar_at_the_sun():
  np.testing.assert_allclose(photometry.absolute_magnitudes(np.array(photometry.LOGG_SUN),
                                                            np.array(photometry.T_SUN)),
                             photometry.SUN_ABSOLUTE_MAGNITUDES, atol=1e-3)
  teff = np.linspace(2800, 20000, 50)
  mags = photometry.absolute_magnitudes(np.full(50, 4.3), teff)
  assert np.all(np.diff(mags, axis=0) < 0)  # Hotter dwarfs are brighter in every band,
  assert np.all(np.diff(mags[:, 1] - mags[:, 2]) < 0)  # and bluer (BP − RP).
  giant = photometry.absolute_magnitudes(np.array(2.0), np.array(4500.0))
  dwarf = photometry.absolute_magnitudes(np.array(4.6), np.array(4500.0))
  assert np.all(giant < dwarf - 4)  # Lower log g: larger radius, brighter.
