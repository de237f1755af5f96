"""APOGEE Net II's metadata_transform: 'colours' feeds the metadata MLP the same information as the
authors' 7 magnitudes, as PLX, G and five colours; missing bands, the fit and the gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apogeenet_jax import config_validation, constants
from apogeenet_jax.models import ModelError, apogee_net_2
from apogeenet_jax.models.apogee_net_2 import APOGEENet2
from configs import net2

# [parallax (mas), G, BP, RP, J, H, K], raw, as the catalogues give them.
ROWS = np.array([
    [1.2, 12.5, 13.1, 11.8, 10.9, 10.3, 10.1],           # all good
    [0.3, 15.9, 16.8, 15.0, 13.6, 12.9, 12.7],           # all good, fainter
    [np.nan, 14.0, np.nan, 13.2, 12.1, 11.5, 11.3],      # no parallax, no BP
    [2.0, 99.999, 99.999, 99.999, 9.0, 8.4, 8.2],        # no Gaia photometry: placeholders
    [1.5, 13.0, 13.6, 12.2, 11.0, 99.999, 10.2],         # a 2MASS placeholder (H)
], np.float32)


def _colours_by_hand(row):
  """(values, missing) of one raw row, written out band by band (NaN where missing)."""
  plx, g, bp, rp, j, h, k = (np.nan if not np.isfinite(v) or v >= 98 else float(v) for v in row)
  values = np.array([plx, g, bp - g, g - rp, rp - j, j - h, h - k])
  return np.nan_to_num(values, nan=0.0), np.isnan(values)


def test_colours_are_neighbouring_bands_and_a_colour_is_missing_with_either_band():
  assert constants.metadata_column_names('colours') == ('PLX', 'G', 'BP-G', 'G-RP', 'RP-J', 'J-H',
                                                        'H-K')
  values, missing = apogee_net_2.transform_metadata(jnp.asarray(ROWS), 'colours')
  for i, row in enumerate(ROWS):
    want, want_missing = _colours_by_hand(row)
    np.testing.assert_array_equal(np.asarray(missing[i]), want_missing, err_msg=f'row {i}')
    np.testing.assert_allclose(np.asarray(values[i]), want, rtol=1e-6, err_msg=f'row {i}')
  # No BP: BP − G only; no H: J − H and H − K; no Gaia: everything but RP − J's J … and PLX.
  assert np.flatnonzero(missing[2]).tolist() == [0, 2]
  assert np.flatnonzero(missing[4]).tolist() == [5, 6]
  assert np.flatnonzero(missing[3]).tolist() == [1, 2, 3, 4]
  # 'magnitudes' is the identity with the authors' missing rule.
  values, missing = apogee_net_2.transform_metadata(jnp.asarray(ROWS), 'magnitudes')
  bad = ~np.isfinite(ROWS) | (ROWS >= 98)
  np.testing.assert_array_equal(np.asarray(missing), bad)
  np.testing.assert_array_equal(np.asarray(values)[~bad], ROWS[~bad])


def test_the_fit_is_of_the_colour_columns():
  model = APOGEENet2(metadata_fill=(), metadata_mean=(), metadata_std=(),
                     metadata_transform='colours')
  fitted = apogee_net_2.fit_metadata(model, {'metadata': ROWS})
  by_hand = [_colours_by_hand(r) for r in ROWS.astype(np.float64)]
  values = np.stack([v for v, _ in by_hand])
  missing = np.stack([m for _, m in by_hand])
  # BP − G: rows 0, 1 and 4 have it; the fill is the reddest seen, the mean that of the filled column.
  seen = values[~missing[:, 2], 2]
  assert fitted.metadata_fill[2] == pytest.approx(seen.max())
  filled = np.where(missing[:, 2], seen.max(), values[:, 2])
  assert fitted.metadata_mean[2] == pytest.approx(filled.mean())
  assert fitted.metadata_std[2] == pytest.approx(filled.std())
  assert fitted.metadata_fill[0] == pytest.approx(np.nanmin(np.where(missing[:, 0], np.nan,
                                                                     values[:, 0])))
  # The magnitudes' fit differs: G − RP is not RP.
  authors_rule = apogee_net_2.fit_metadata(model.clone(metadata_transform='magnitudes'),
                                           {'metadata': ROWS})
  assert authors_rule.metadata_mean[3] == pytest.approx(np.mean([11.8, 15.0, 13.2, 15.0, 12.2]),
                                                        rel=1e-6)
  assert fitted.metadata_mean[3] != pytest.approx(authors_rule.metadata_mean[3])


def test_the_network_reads_colours_with_a_finite_gradient_where_bands_are_missing():
  fitted = apogee_net_2.fit_metadata(
      APOGEENet2(input_length=64, channels=(2, 2), hidden=(4,), dropout_rate=0.0,
                 metadata_fill=(), metadata_mean=(), metadata_std=(),
                 metadata_transform='colours'), {'metadata': ROWS})
  flux = jnp.ones((len(ROWS), 64))
  variables = fitted.init(jax.random.key(0), flux, ROWS)
  out = fitted.apply(variables, flux, ROWS)
  assert np.all(np.isfinite(out))
  # The same weights reading magnitudes give other outputs: the transform is in the path.
  assert not np.allclose(out, fitted.clone(metadata_transform='magnitudes').apply(
      variables, flux, ROWS))
  jac = jax.jacrev(lambda m: fitted.apply(variables, flux, m).sum())(jnp.asarray(ROWS))
  assert np.all(np.isfinite(jac))
  bad = ~np.isfinite(ROWS) | (ROWS >= 98)
  assert np.all(np.asarray(jac)[bad] == 0)


def test_an_unknown_transform_is_refused_by_the_config_and_the_module():
  config = net2.get_config()
  config.model.metadata_transform = 'colors'
  assert config_validation.problems(config) == [
      "model.metadata_transform must be 'magnitudes' or 'colours', got 'colors'"]
  with pytest.raises(ModelError, match="metadata_transform 'colors'"):
    apogee_net_2.transform_metadata(jnp.asarray(ROWS), 'colors')
