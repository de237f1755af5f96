"""Parity with the paper's PyTorch model (Appendix B) through the weight converter.

Random PyTorch weights → state_dict file → ``convert_torch`` → orbax checkpoint → Flax; the Flax
outputs must equal PyTorch's to ≤ 1e-4 relative (to the output scale) on random and real spectra.
"""

import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from apogeenet_jax import apstar, checkpoint, convert_torch  # noqa: E402
from apogeenet_jax.models.torch_reference import TorchAPOGEENet  # noqa: E402
from apogeenet_jax.normalization import PAPER_STANDARDIZER  # noqa: E402
from apogeenet_jax.preprocessing import preprocess_flux  # noqa: E402

RTOL = 1e-4


@pytest.fixture(scope='module')
def torch_model():
  torch.manual_seed(0)
  model = TorchAPOGEENet().eval()
  # With PyTorch's default init the biases dominate the output on real spectra (it hardly
  # changes from star to star); shrink them so the comparison tests the convolutions and the
  # flatten order. _assert_parity checks that the outputs differ between spectra.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias'):
        p.mul_(0.01)
  return model


@pytest.fixture(scope='module')
def converted(torch_model, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('convert')
  pt = tmp / 'apogee_net.pt'
  torch.save(torch_model.state_dict(), pt)
  out = convert_torch.convert(str(pt), str(tmp / 'ckpt'))
  params, meta = checkpoint.load_params(out)
  return checkpoint.model_from_meta(meta), params, meta


def _assert_parity(torch_model, converted, flux):
  model, params, _ = converted
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(flux[:, None, :])).numpy()
  got = np.asarray(jax.jit(model.apply)({'params': params}, flux))
  # The comparison only means something if the outputs depend on the spectrum.
  spread = expected.std(axis=0) / np.abs(expected).max(axis=0)
  assert np.all(spread > 0.01), f'outputs barely differ between spectra: {spread}'
  scale = np.abs(expected).max()
  np.testing.assert_array_less(np.abs(got - expected).max() / scale, RTOL)


def test_parity_on_random_spectra(torch_model, converted):
  rng = np.random.default_rng(0)
  # Raw apStar-like flux: a positive level that varies from star to star, plus structure.
  flux = (rng.uniform(50, 2000, (16, 1)) * (1 + 0.3 * rng.standard_normal((16, 8575))))
  _assert_parity(torch_model, converted, flux.astype(np.float32))


def test_parity_on_real_apstar_spectra(torch_model, converted, real_apstar_files):
  flux = np.stack([preprocess_flux(apstar.read_apstar(f).flux) for f in real_apstar_files])
  assert flux.shape == (len(real_apstar_files), 8575)
  _assert_parity(torch_model, converted, flux)


def test_converted_weights_read_raw_flux_and_input_scale_is_one_constant(torch_model, converted,
                                                                      real_apstar_files):
  """Converted weights carry input_scale 1.0 (the authors' network reads raw flux). A trained
  model's input_scale s divides the flux once, before conv1: APOGEENet(input_scale=s) with conv1's
  kernel × s is the same function as the PyTorch model, to the parity tolerance."""
  model, params, meta = converted
  assert meta['model']['input_scale'] == 1.0
  flux = np.stack([preprocess_flux(apstar.read_apstar(f).flux) for f in real_apstar_files])
  s = 157.3
  scaled = model.clone(input_scale=s)
  scaled_params = {**params, 'conv1': {**params['conv1'], 'kernel': params['conv1']['kernel'] * s}}
  _assert_parity(torch_model, (scaled, scaled_params, meta), flux)


def test_checkpoint_meta_carries_paper_normalisation(converted):
  _, _, meta = converted
  np.testing.assert_array_equal(checkpoint.standardizer_from_meta(meta).mean,
                                PAPER_STANDARDIZER.mean)
  assert meta['label_names'] == ['LOGG', 'TEFF', 'FE_H']
  assert meta['ensemble_size'] == 1  # the authors' weights: one network, unstacked params


def test_mismatched_keys_are_listed(torch_model):
  sd = dict(torch_model.state_dict())
  sd.pop('conv7.bias')
  sd['conv13.weight'] = torch.zeros(3)
  sd['fc1.weight'] = torch.zeros(512, 100)
  with pytest.raises(convert_torch.ConversionError) as e:
    convert_torch.torch_to_flax_params(sd)
  msg = str(e.value)
  assert 'conv7.bias' in msg and 'conv13.weight' in msg and 'fc1.weight' in msg


def test_dataparallel_prefix_is_accepted(torch_model):
  sd = {f'module.{k}': v for k, v in torch_model.state_dict().items()}
  params = convert_torch.torch_to_flax_params(sd)
  np.testing.assert_array_equal(params['fc3']['bias'], torch_model.fc3.bias.detach().numpy())


def test_refuses_to_overwrite_and_rejects_non_torch_files(tmp_path):
  (tmp_path / 'existing').mkdir()
  (tmp_path / 'existing' / 'x').write_text('keep me')
  with pytest.raises(FileExistsError):
    convert_torch.convert(str(tmp_path / 'x.pt'), str(tmp_path / 'existing'))
  bad = tmp_path / 'bad.pt'
  bad.write_text('not a torch file')
  with pytest.raises(convert_torch.ConversionError, match=r'bad\.pt'):
    convert_torch.convert(str(bad), str(tmp_path / 'out'))


def test_command_line_help():
  # absl's --help exits with status 1 by design; the text is what matters.
  out = subprocess.run([sys.executable, '-m', 'apogeenet_jax.convert_torch', '--help'],
                       capture_output=True, text=True, check=False).stdout
  assert '--state_dict' in out and '--output' in out
