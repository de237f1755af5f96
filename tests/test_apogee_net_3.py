"""APOGEE Net III (models/apogee_net_3.py) against an independent PyTorch twin.

The twin below is written from the layout (the module docstring of apogee_net_3), not from the
Flax code: random PyTorch weights with non-trivial batch-norm statistics → state dict →
``convert_torch.import_state_dict`` (or ``variables_from_torch`` for the tiny variants) → Flax;
the outputs must agree in physical units on real apStar spectra. The layers it is built from
(adaptive pooling, the per-spectrum percentile clip, the residual's channel padding, batch norm
in train and eval mode) are checked one by one on tiny inputs.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from torch import nn as tnn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from apogeenet_jax import apstar, convert_torch, models  # noqa: E402
from apogeenet_jax.models import apogee_net_3  # noqa: E402
from apogeenet_jax.models.apogee_net_3 import APOGEENet3  # noqa: E402

FULL_PARAM_COUNT = 72_606_495
# Physical units: log g, log10 Teff and [Fe/H] in dex; Teff in K relative (``assert_parity``).
TOL_DEX = 1e-4
# A tiny variant: even kernel (conv2's padding one less), ragged pooling, real length.
TINY = dict(model_dim=2, dim_mults=(1, 2, 3, 4), kernel_size=8, pool_size=50, linear_depth=2,
            linear_width=16)


# --- the PyTorch twin ---------------------------------------------------------------------------

def torch_log_scale(flux, per_spectrum=True):
  """Non-finite → 0, ln(max(flux, 1e-6)), clipped at the 95th percentile + 1: per row, or over
  the whole tensor as the authors' pipeline does (``per_spectrum=False``)."""
  flux = torch.where(torch.isfinite(flux), flux, torch.zeros_like(flux))
  x = torch.log(torch.clamp(flux, min=1e-6))
  top = (torch.quantile(x, 0.95, dim=1, keepdim=True) if per_spectrum
         else torch.quantile(x, 0.95))
  return torch.minimum(x, top + 1.0)


class TorchPositional(tnn.Module):
  def __init__(self):
    super().__init__()
    self.register_buffer('inv_freq', torch.ones(1))

  def forward(self, x):  # x (B, 1, L) → sin(i · inv_freq), (B, 1, L)
    i = torch.arange(x.shape[-1], dtype=x.dtype)
    return torch.sin(i * self.inv_freq).expand(x.shape[0], 1, -1)


class TorchFirstConv(tnn.Module):
  def __init__(self, c_out, k):
    super().__init__()
    self.conv_layer = tnn.Conv1d(2, c_out, k, padding=k // 2)
    self.bn = tnn.BatchNorm1d(c_out)

  def forward(self, x):
    return F.max_pool1d(F.elu(self.bn(self.conv_layer(x))), 2)


class TorchResBlock(tnn.Module):
  def __init__(self, c_in, c_out, k):
    super().__init__()
    self.c_in, self.c_out = c_in, c_out
    self.conv1 = tnn.Conv1d(c_in, c_out, k, padding=k // 2, bias=False)
    self.bn1 = tnn.BatchNorm1d(c_out)
    self.conv2 = tnn.Conv1d(c_out, c_out, k, padding=k // 2 - (k + 1) % 2, bias=False)
    self.bn2 = tnn.BatchNorm1d(c_out)

  def forward(self, x):
    out = self.bn2(self.conv2(F.elu(self.bn1(self.conv1(x)))))
    before = (self.c_out - self.c_in) // 2
    # (B, C, L): F.pad's last pair pads C, the first pair (none) pads L.
    residual = F.pad(x, (0, 0, before, self.c_out - self.c_in - before))
    return F.elu(out + residual)


class TorchLinearBlock(tnn.Module):
  def __init__(self, w_in, w_out):
    super().__init__()
    self.linear_layer = tnn.Linear(w_in, w_out)

  def forward(self, x):
    return F.relu(self.linear_layer(x))


class TorchNet3(tnn.Module):
  """The layout of APOGEE Net III with its state-dict names; forward takes raw flux (B, L)."""

  def __init__(self, model_dim=4, dim_mults=(1, 2, 4, 8, 16), kernel_size=30, pool_size=1024,
               linear_depth=6, linear_width=1024, num_targets=3, per_spectrum=True):
    super().__init__()
    dims = [model_dim * m for m in dim_mults]
    self.per_spectrum = per_spectrum
    self.pos_enc = TorchPositional()
    self.first_conv = TorchFirstConv(dims[0], kernel_size)
    self.res_blocks = tnn.ModuleList(
        TorchResBlock(a, b, kernel_size) for a, b in itertools.pairwise(dims))
    self.adapt_pool = tnn.AdaptiveAvgPool1d(pool_size)
    widths = [dims[-1] * pool_size] + [linear_width] * linear_depth
    self.linear_sequential = tnn.Sequential(
        *[TorchLinearBlock(a, b) for a, b in itertools.pairwise(widths)],
        tnn.Linear(linear_width, num_targets))

  def features(self, flux):
    x = torch_log_scale(flux, self.per_spectrum)[:, None, :]
    x = torch.cat([x, self.pos_enc(x)], dim=1)
    x = self.first_conv(x)
    for block in self.res_blocks:
      x = block(x)
    x = self.adapt_pool(x).flatten(1)
    return self.linear_sequential[:-1](x)

  def forward(self, flux):
    return self.linear_sequential[-1](self.features(flux))


def randomise(model, flux, seed=0):
  """Non-trivial batch norm (affine and running statistics), He-scaled Linear weights with small
  biases (PyTorch's default init lets the biases drown the spectrum), and a last layer scaled so
  that the outputs vary by O(1) over ``flux``. Returns the model in eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, tnn.BatchNorm1d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.uniform_(-0.3, 0.3, generator=g)
        m.running_mean.uniform_(-0.5, 0.5, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
      elif isinstance(m, tnn.Linear):
        m.weight.mul_(math.sqrt(6.0))
        m.bias.mul_(0.01)
    model.eval()
    # Each output: spread 0.5 about 0 over ``flux`` (a trained network's last layer also
    # subtracts the common part of the features).
    last = model.linear_sequential[-1]
    z = model(flux)
    scale = 0.5 / z.std(dim=0)
    last.weight.mul_(scale[:, None])
    last.bias.copy_(last.bias * scale - z.mean(dim=0) * scale)
  return model


def physical(z):
  """Standardised (log g, log10 Teff, [Fe/H]) → (log g dex, log10 Teff dex, Teff K, [Fe/H] dex)."""
  mean, std = (np.asarray(a, np.float64) for a in apogee_net_3.AUTHORS_LABELS)
  v = np.asarray(z, np.float64) * std + mean
  return np.stack([v[:, 0], v[:, 1], 10.0 ** v[:, 1], v[:, 2]], axis=1)


def assert_parity(expected_z, got_z):
  """Returns max |Δ| and the spread over spectra of (log g dex, log10 Teff dex, Teff K, [Fe/H]
  dex). Teff in K is held to 1e-4 relative, not 1e-4 K: float32's spacing at 5000 K is 5e-4 K."""
  expected, got = physical(expected_z), physical(got_z)
  spread = expected.std(axis=0)
  diff = np.abs(got - expected).max(axis=0)
  # Outputs that hardly vary between spectra would hide a wrong convolution or flatten order.
  assert np.all(spread[[0, 1, 3]] > 100 * TOL_DEX), f'spread {spread}'
  teff_relative = (np.abs(got - expected)[:, 2] / expected[:, 2]).max()
  assert np.all(diff[[0, 1, 3]] <= TOL_DEX) and teff_relative <= TOL_DEX, \
      f'max |Δ| (logg, log10 Teff, Teff K, [Fe/H]) = {diff}, Teff relative {teff_relative}'
  return diff, spread


def read_flux(files):
  return np.stack([np.asarray(apstar.read_apstar(f).flux, np.float32) for f in files])


def tiny_pair(flux, per_spectrum=True, seed=0):
  torch.manual_seed(seed)
  twin = randomise(TorchNet3(**TINY, per_spectrum=per_spectrum), torch.from_numpy(flux), seed)
  model = APOGEENet3(**TINY)
  arrays = convert_torch.state_dict_arrays(twin.state_dict())
  return twin, model, apogee_net_3.variables_from_torch(arrays, model)


# --- sizes, keys and detection ------------------------------------------------------------------

def test_full_size_parameter_count_and_batch_stats():
  model = APOGEENet3()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8575))))
  count = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes['params']))
  assert count == FULL_PARAM_COUNT
  stats = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes['batch_stats']))
  assert stats == 2 * (4 + 2 * (8 + 16 + 32 + 64))  # a mean and a variance per BN channel
  expected = apogee_net_3.expected_torch_shapes(model)
  assert sum(math.prod(s) for k, s in expected.items()
             if 'running' not in k and k != 'pos_enc.inv_freq') == FULL_PARAM_COUNT


def test_torch_shapes_match_the_twin_and_the_family_is_detected():
  twin = TorchNet3(**TINY)
  sd = twin.state_dict()
  expected = apogee_net_3.expected_torch_shapes(APOGEENet3(**TINY))
  assert {k: tuple(v.shape) for k, v in sd.items()
          if not k.endswith('num_batches_tracked')} == expected
  assert models.family_of_state_dict(sd).name == 'apogee_net_3'
  assert models.family_of_state_dict(['conv1.weight', 'conv12.weight', 'fc3.weight']).name == \
      'apogee_net'
  assert 'linear_sequential.6.weight' in apogee_net_3.expected_torch_shapes(APOGEENet3())


def test_importer_rejects_bad_keys_and_positional_frequency():
  arrays = convert_torch.state_dict_arrays(TorchNet3(**TINY).state_dict())
  model = APOGEENet3(**TINY)
  bad = dict(arrays, **{'pos_enc.inv_freq': np.array([0.5], np.float32)})
  with pytest.raises(models.ModelError, match='inv_freq'):
    apogee_net_3.variables_from_torch(bad, model)
  bad = dict(arrays)
  bad.pop('res_blocks.1.bn2.running_var')
  bad['res_blocks.0.conv1.weight'] = np.zeros((3, 3, 3), np.float32)
  with pytest.raises(models.ModelError) as e:
    apogee_net_3.variables_from_torch(bad, model)
  assert 'res_blocks.1.bn2.running_var' in str(e.value) and 'res_blocks.0.conv1' in str(e.value)


def test_config_round_trip():
  model = APOGEENet3(**TINY, input_length=300)
  assert models.create(models.model_config(model)) == model
  assert models.get('apogee_net_3').input_shapes(model) == {'flux': (300,)}
  space = models.get('apogee_net_3').label_space
  teff = space.to_catalogue(np.array([[3.0, 3.7, 0.0]]))
  np.testing.assert_allclose(teff[0, 1], 10 ** 3.7)


# --- the layers ---------------------------------------------------------------------------------

@pytest.mark.parametrize('length,size', [(4288, 1024), (37, 10), (10, 7), (5, 8)])
def test_adaptive_avg_pool_is_torchs(length, size):
  x = np.random.default_rng(length).standard_normal((2, 3, length)).astype(np.float32)
  expected = F.adaptive_avg_pool1d(torch.from_numpy(x), size).numpy()
  got = apogee_net_3.adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 1)), size)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1), expected, rtol=1e-6, atol=1e-6)


def test_percentile_clip_is_torch_quantile_per_spectrum(real_apstar_files):
  flux = read_flux(real_apstar_files[:4])
  flux[0, :100] = np.nan
  flux[1, 5] = np.inf
  flux[2] *= 50.0  # a brighter star: its clip level differs from the others'
  expected = torch_log_scale(torch.from_numpy(flux)).numpy()
  got = np.asarray(apogee_net_3.log_scale_flux(jnp.asarray(flux)))
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
  x = np.log(np.maximum(np.where(np.isfinite(flux), flux, 0), 1e-6))
  np.testing.assert_allclose(apogee_net_3.percentile(jnp.asarray(x), 95.0),
                             torch.quantile(torch.from_numpy(x), 0.95, dim=1).numpy(), atol=2e-6)
  # Per spectrum: one spectrum's scaling does not depend on the rest of the batch.
  alone = np.asarray(apogee_net_3.log_scale_flux(jnp.asarray(flux[2:3])))
  np.testing.assert_array_equal(alone[0], got[2])


def test_residual_channel_padding():
  x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3) + 1
  y = np.asarray(apogee_net_3.pad_channels(x, 8))  # 5 extra: 2 before, 3 after
  assert y.shape == (2, 4, 8)
  np.testing.assert_array_equal(y[..., 2:5], x)
  assert not y[..., :2].any() and not y[..., 5:].any()
  expected = F.pad(torch.from_numpy(np.array(x).transpose(0, 2, 1)), (0, 0, 2, 3))
  np.testing.assert_array_equal(y, expected.numpy().transpose(0, 2, 1))


def test_batch_norm_train_updates_stats_and_eval_uses_them():
  model = APOGEENet3(**TINY, input_length=256)
  rng = np.random.default_rng(0)
  flux = jnp.asarray(rng.uniform(50, 500, (4, 256)).astype(np.float32))
  other = flux.at[1:].set(jnp.asarray(rng.uniform(50, 500, (3, 256)).astype(np.float32)))
  # Weights through the importer: model.init is slow on CPU (it compiles each initialiser).
  variables = apogee_net_3.variables_from_torch(
      convert_torch.state_dict_arrays(TorchNet3(**TINY).state_dict()), model)
  train = jax.jit(lambda v, f: model.apply(v, f, train=True, mutable=['batch_stats']))
  evaluate = jax.jit(model.apply)
  out, updates = train(variables, flux)
  old, new = variables['batch_stats'], updates['batch_stats']
  # PyTorch's fresh statistics (mean 0, var 1) move towards the batch's.
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
    assert not np.allclose(a, b)
  # In training spectrum 0's output depends on the rest of the batch; in eval mode (running
  # statistics) it does not.
  assert not np.allclose(train(variables, other)[0][0], out[0], atol=1e-4)
  evaluated = {'params': variables['params'], 'batch_stats': new}
  np.testing.assert_array_equal(evaluate(evaluated, flux)[0], evaluate(evaluated, other)[0])


# --- parity -------------------------------------------------------------------------------------

def test_tiny_parity_on_real_spectra(real_apstar_files):
  flux = read_flux(real_apstar_files)
  flux[0, :50] = np.nan  # non-finite pixels count as 0 on both sides
  twin, model, variables = tiny_pair(flux)
  with torch.no_grad():
    expected = twin(torch.from_numpy(flux)).numpy()
  got = np.asarray(jax.jit(model.apply)(variables, flux))
  diff, spread = assert_parity(expected, got)
  print(f'tiny parity: max |Δ| {diff}, spread {spread}')


def test_full_size_parity_on_real_spectra(real_apstar_files):
  """The authors' size, imported through convert_torch's family detection, on three stars."""
  flux = read_flux(real_apstar_files[:3])
  torch.manual_seed(1)
  twin = randomise(TorchNet3(), torch.from_numpy(flux), seed=1)
  with torch.no_grad():
    expected = twin(torch.from_numpy(flux)).numpy()
  model, variables, standardizer = convert_torch.import_state_dict(twin.state_dict())
  del twin
  assert isinstance(model, APOGEENet3) and set(variables) == {'params', 'batch_stats'}
  np.testing.assert_array_equal(standardizer.std, [1.2, 0.1, 0.3])
  got = np.asarray(jax.jit(model.apply)(variables, flux))
  diff, spread = assert_parity(expected, got)
  print(f'full-size parity: max |Δ| {diff}, spread {spread}')


def test_tiny_train_mode_matches_torch(real_apstar_files):
  """Train mode normalises with the batch's statistics and moves the running ones with PyTorch's
  momentum (0.1 of the batch); PyTorch's running variance is the unbiased one, a factor
  n / (n − 1) on the batch part (n = batch × length), inside the tolerance."""
  flux = read_flux(real_apstar_files[:4])
  twin, model, variables = tiny_pair(flux, seed=2)
  twin.train()
  with torch.no_grad():
    expected = twin(torch.from_numpy(flux)).numpy()
  got, updates = jax.jit(lambda v, f: model.apply(v, f, train=True, mutable=['batch_stats']))(
      variables, flux)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  torch_stats = apogee_net_3.variables_from_torch(
      convert_torch.state_dict_arrays(twin.state_dict()), model)['batch_stats']
  for a, b in zip(jax.tree.leaves(updates['batch_stats']), jax.tree.leaves(torch_stats),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
