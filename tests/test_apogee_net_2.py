"""APOGEE Net II (models/apogee_net_2.py) against an independent PyTorch twin of the authors' layout
(models.torch_reference.TorchAPOGEENet2), through the weight converter, on real apStar spectra and made-up
metadata rows that hit every case of the authors' replacement rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from apogeenet_jax import apstar, checkpoint, convert_torch, models  # noqa: E402
from apogeenet_jax.models import apogee_net_2  # noqa: E402
from apogeenet_jax.models.apogee_net_2 import APOGEENet2  # noqa: E402
from apogeenet_jax.models.torch_reference import TorchAPOGEENet, TorchAPOGEENet2  # noqa: E402
from apogeenet_jax.preprocessing import preprocess_flux  # noqa: E402

PARAM_COUNT = 4_691_963  # the authors' network: convs 32,424 + metadata 3,920 + fc 4,655,619
TOL = 1e-4  # log g and [Fe/H] in dex; Teff relative (float32 holds 5000 K to ~5e-4 K)
N_CONV_FEATURES = 64 * 133

# [parallax (mas), G, BP, RP, J, H, K], raw, as the catalogues give them.
METADATA_ROWS = np.array([
    [1.2, 12.5, 13.1, 11.8, 10.9, 10.3, 10.1],           # all good
    [0.3, 15.9, 16.8, 15.0, 13.6, 12.9, 12.7],           # all good, fainter
    [np.nan, 14.0, 14.8, 13.2, 12.1, 11.5, 11.3],        # no parallax
    [2.0, 99.999, 99.999, 99.999, 9.0, 8.4, 8.2],        # no Gaia photometry: placeholders
    [np.inf, 13.0, -np.inf, 12.2, 11.0, 99.999, 10.2],   # ±inf and a 2MASS placeholder
    [-0.5, 17.5, 18.9, 16.4, 14.8, 14.1, 98.0],          # 98 itself counts as missing
], np.float32)


@pytest.fixture(scope='module')
def torch_model():
  """Random weights large enough that the outputs depend on the spectrum AND the metadata.

  PyTorch's default init leaves outputs ~1e-3, set by the biases; Kaiming-normal weights keep the
  scale through the ReLUs, conv1 / 300 brings raw flux (medians 14 to 1500) to O(1), and fc1's
  metadata columns × 30 let 64 metadata features weigh against 8512 spectral ones.
  ``test_parity_on_real_spectra_and_metadata`` checks both spreads.
  """
  torch.manual_seed(0)
  model = TorchAPOGEENet2().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias'):
        p.mul_(0.01)
      else:
        torch.nn.init.kaiming_normal_(p, nonlinearity='relu')
    model.conv1.weight.div_(300.0)
    model.fc1.weight[:, N_CONV_FEATURES:].mul_(30.0)
  return model


@pytest.fixture(scope='module')
def converted(torch_model, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('convert_net2')
  pt = tmp / 'apogee_net_2.pt'
  torch.save(torch_model.state_dict(), pt)
  out = convert_torch.convert(str(pt), str(tmp / 'ckpt'))
  params, meta = checkpoint.load_params(out)
  return checkpoint.model_from_meta(meta), params, meta


@pytest.fixture(scope='module')
def real_batch(real_apstar_files):
  """Every real spectrum with every metadata row: flux (S·M, 8575), metadata (S·M, 7)."""
  flux = np.stack([preprocess_flux(apstar.read_apstar(f).flux) for f in real_apstar_files])
  m = len(METADATA_ROWS)
  return np.repeat(flux, m, axis=0), np.tile(METADATA_ROWS, (len(flux), 1)), (len(flux), m)


def _physical(z: np.ndarray) -> np.ndarray:
  """Standardised (log g, log10 Teff, [Fe/H]) → (log g dex, Teff K, [Fe/H] dex), float64."""
  mean, std = (np.asarray(v) for v in apogee_net_2.AUTHORS_LABELS)
  values = np.asarray(z, np.float64) * std + mean
  return models.get('apogee_net_2').label_space.to_catalogue(values)


def test_parity_on_real_spectra_and_metadata(torch_model, converted, real_batch):
  model, params, _ = converted
  flux, metadata, (n_spectra, n_rows) = real_batch
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(flux[:, None, :]), torch.from_numpy(metadata))
  expected = _physical(expected.numpy())
  got = _physical(jax.jit(model.apply)({'params': params}, flux, metadata))
  assert np.all(np.isfinite(got))
  # Meaningful only if the outputs depend on both inputs: the smallest spread over the spectra
  # (any one metadata row) and over the metadata rows (any one spectrum), in physical units.
  # Teff's spread is relative, as its tolerance: the spread of ln Teff.
  grid = expected.copy()
  grid[:, 1] = np.log(grid[:, 1])
  grid = grid.reshape(n_spectra, n_rows, 3)
  spread_spectra, spread_metadata = grid.std(axis=0).min(axis=0), grid.std(axis=1).min(axis=0)
  assert np.all(spread_spectra > 100 * TOL), spread_spectra
  assert np.all(spread_metadata > 100 * TOL), spread_metadata
  diff = np.abs(got - expected)
  diff[:, 1] /= expected[:, 1]
  print(f'spread over spectra {spread_spectra}, over metadata rows {spread_metadata}; '
        f'max |Δ| (log g, Teff relative, [Fe/H]) {diff.max(axis=0)}, Teff K {_max_teff(got, expected)}')
  assert np.all(diff.max(axis=0) <= TOL), f'max |Δ| (log g, Teff relative, [Fe/H]): {diff.max(0)}'


def _max_teff(got, expected):
  return np.abs(got[:, 1] - expected[:, 1]).max()


def test_metadata_preparation_follows_the_authors_rule():
  got = np.asarray(apogee_net_2.prepare_metadata(
      jnp.asarray(METADATA_ROWS), apogee_net_2.AUTHORS_METADATA_FILL,
      apogee_net_2.AUTHORS_METADATA_MEAN, apogee_net_2.AUTHORS_METADATA_STD))
  expected = TorchAPOGEENet2.prepare_metadata(torch.from_numpy(METADATA_ROWS)).numpy()
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  # Every bad value becomes its column's fill: one z-score per column, the same in every row.
  filled = np.asarray(apogee_net_2.AUTHORS_METADATA_FILL, np.float32)
  bad = ~np.isfinite(METADATA_ROWS) | (METADATA_ROWS >= 98)
  assert bad.sum() == 8
  cols = np.nonzero(bad)[1]
  z_fill = (filled - apogee_net_2.AUTHORS_METADATA_MEAN) / apogee_net_2.AUTHORS_METADATA_STD
  np.testing.assert_allclose(got[bad], z_fill[cols], rtol=1e-6)


def test_jacobian_is_finite_where_metadata_is_missing():
  """The linear σ differentiates through the replacement: missing values pass zero, not NaN."""
  model = APOGEENet2(input_length=64, channels=(2, 2), hidden=(4,), dropout_rate=0.0)
  flux = jnp.ones((len(METADATA_ROWS), 64))
  variables = model.init(jax.random.key(0), flux, METADATA_ROWS)
  assert np.all(np.isfinite(model.apply(variables, flux, METADATA_ROWS)))
  jac = jax.jacrev(lambda m: model.apply(variables, flux, m).sum())(jnp.asarray(METADATA_ROWS))
  assert np.all(np.isfinite(jac))
  bad = ~np.isfinite(METADATA_ROWS) | (METADATA_ROWS >= 98)
  assert np.all(np.asarray(jac)[bad] == 0) and np.any(np.asarray(jac)[~bad] != 0)


def test_family_is_detected_from_the_state_dict_keys(torch_model):
  assert models.family_of_state_dict(torch_model.state_dict()).name == 'apogee_net_2'
  assert models.family_of_state_dict(TorchAPOGEENet().state_dict()).name == 'apogee_net'


def test_converted_checkpoint_records_net2_and_the_authors_constants(converted):
  model, params, meta = converted
  assert meta['model']['name'] == 'apogee_net_2' and isinstance(model, APOGEENet2)
  standardizer = checkpoint.standardizer_from_meta(meta)
  np.testing.assert_array_equal(standardizer.mean, apogee_net_2.AUTHORS_LABELS[0])
  np.testing.assert_array_equal(standardizer.std, apogee_net_2.AUTHORS_LABELS[1])
  assert model.metadata_fill == apogee_net_2.AUTHORS_METADATA_FILL
  assert model.metadata_mean == apogee_net_2.AUTHORS_METADATA_MEAN
  assert model.metadata_std == apogee_net_2.AUTHORS_METADATA_STD
  assert (model.flux_scaling, model.input_scale) == ('none', 1.0)
  assert set(params['metadata']) == {'l1', 'l2', 'l3', 'l4', 'l5'}


def test_family_contract():
  family = models.get('apogee_net_2')
  model = APOGEENet2()
  assert family.input_shapes(model) == {'flux': (8575,), 'metadata': (7,)}
  assert family.noisy_inputs == ('flux', 'metadata')
  assert family.label_space.log10 == ('TEFF',)
  assert models.family_of(model) is family
  assert models.create(models.model_config(model)) == model


def test_parameter_count(torch_model):
  model = APOGEENet2()
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), **models.get('apogee_net_2').dummy_inputs(model)))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == PARAM_COUNT
  assert sum(p.numel() for p in torch_model.parameters()) == PARAM_COUNT


@pytest.mark.parametrize('change', ['missing', 'misshaped'])
def test_bad_metadata_layer_is_named(torch_model, change):
  state_dict = dict(torch_model.state_dict())
  if change == 'missing':
    del state_dict['metadata.l3.weight']
  else:
    state_dict['metadata.l3.weight'] = torch.zeros(32, 17)
  with pytest.raises(convert_torch.ConversionError, match=r'metadata\.l3\.weight'):
    convert_torch.import_state_dict(state_dict)
