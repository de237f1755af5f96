"""One bad-pixel rule for flux and error: a pixel bad for one is bad for the other, everywhere
the spectra are prepared (streamed batches, in-memory splits, Monte Carlo noise scale)."""

import numpy as np

from apogeenet_jax import input_pipeline, memory_data, preprocessing, train_inputs, uncertainty
from apogeenet_jax.constants import BAD_PIXEL_ERROR, N_PIXELS


def _record(seed=0):
  rng = np.random.default_rng(seed)
  flux = rng.uniform(50, 150, N_PIXELS).astype(np.float32)
  err = np.full(N_PIXELS, 2.0, np.float32)
  flux[[10, 20]] = [np.nan, np.inf]  # bad flux, finite error
  err[[30, 40]] = [np.nan, -1.0]  # bad error, finite flux
  return {'flux': flux, 'flux_err': err, 'labels': np.zeros(3, np.float32), 'data_type': 0,
          'apogee_id': 'x'}


def _check(flux, err):
  for pixel in (10, 20, 30, 40):
    assert flux[..., pixel] == 0, pixel
    assert err[..., pixel] == BAD_PIXEL_ERROR, pixel
  assert np.all(np.isfinite(flux)) and np.all(err[..., 0] == 2.0)


def test_preprocess_marks_a_pixel_bad_for_flux_and_error_alike():
  r = _record()
  _check(*preprocessing.preprocess(r['flux'], r['flux_err']))
  assert preprocessing.preprocess_error(r['flux_err'], r['flux'])[10] == BAD_PIXEL_ERROR


def test_streamed_batch_draws_no_noise_on_a_nan_flux_pixel():
  batch = input_pipeline.collate([input_pipeline.decode_example(_record())])
  _check(batch['flux'], batch['flux_err'])
  for scale in (uncertainty.prepare_errors(batch['flux_err']),
                train_inputs.training_noise_scale(batch['flux_err'])):
    assert np.all(scale[0, [10, 20, 30, 40]] == 0)
    assert scale[0, 0] > 0


def test_in_memory_split_holds_no_noise_on_a_nan_flux_pixel():
  arrays = memory_data.load_split([_record(0), _record(1)], num_threads=1,
                                  noise_scale=train_inputs.training_noise_scale)
  assert np.all(arrays.flux[:, [10, 20, 30, 40]] == 0)
  assert np.all(arrays.noise[:, [10, 20, 30, 40]] == 0)
  assert np.all(arrays.noise[:, 0] > 0)
