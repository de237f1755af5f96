"""APOGEE Net III as a Flax (linen) module: the APOGEE model of BOSS Net (Sizemore et al. 2024),
a 1-D ResNet with batch norm, after the authors' code (github.com/hutchresearch/BOSSNet, MIT:
``bossnet/model/boss_net.py`` and its ``modules/``; ``model_apogee/model_args.yaml``).

The module mirrors the authors' PyTorch layers one for one so that their state dict loads with
transposes and nothing else (``from_torch``; state-dict names in brackets):

    input x (batch, 8575): flux, then a second channel sin(i), i = 0 … 8574 [pos_enc];
    first_conv: Conv1d 2 → 4 (kernel 30, padding 15, bias) → BatchNorm → ELU → max-pool 2,
      8575 → 8576 → 4288 [first_conv.conv_layer, first_conv.bn];
    res_blocks.0 … 3, channels 4→8→16→32→64: Conv1d (kernel 30, padding 15, no bias) → BN → ELU →
      Conv1d (kernel 30, padding 14: the kernel is even) → BN, plus the block's input zero-padded
      on channels ((out − in) // 2 zeros before, the rest after), → ELU; 4288 → 4289 → 4288
      [res_blocks.i.conv1, bn1, conv2, bn2];
    adaptive average pool to 1024 (PyTorch's bins), flatten channel-major (64 × 1024 = 65,536);
    6 × (Linear + ReLU), 65,536 → 1024 → … → 1024 [linear_sequential.0 … 5.linear_layer];
    Linear 1024 → 3 [linear_sequential.6].

Flax module names are the state-dict names with the list index joined by '_' and
``linear_layer`` dropped: first_conv_conv_layer, first_conv_bn, res_blocks_0/conv1 …,
linear_sequential_0 … 6 (``flax_path``).

72,606,495 parameters, plus the batch norms' running means and variances (the Flax collection
'batch_stats'). Batch norm as PyTorch's: ε = 1e-5, momentum 0.1 (Flax ``momentum=0.9``). In
training Flax's running variance averages the biased batch variance where PyTorch's averages the
unbiased one: a factor n/(n − 1) with n = batch × length ≥ 4288, immaterial.

Input: raw combined apStar flux, (batch, 8575) or (batch, 8575, 1), 1e-17 erg/s/cm²/Å. The
module applies the authors' scaling (their ``pipeline.log_scale_flux``) itself, so that
prediction, Monte Carlo draws and the linear σ all see it: non-finite flux → 0, then
x = ln(max(flux, ``log_floor``)), clipped from above at the ``clip_percentile``-th percentile of x
plus ``clip_offset`` (torch.quantile's linear interpolation). One difference: the authors take
the percentile over the whole tensor they pass — all the Monte Carlo draws of a star at once —
where this module takes it over each spectrum alone, so that a spectrum's output does not depend
on the other spectra of its batch. For one spectrum the two agree.
Output: (batch, 3) standardised (log g, log10 Teff, [Fe/H]); the authors' μ = (3.2, 3.7, −0.2),
σ = (1.2, 0.1, 0.3) (``stats/apogee.yaml``).
"""

import itertools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from apogeenet_jax.constants import LABEL_NAMES, N_PIXELS
from apogeenet_jax.models import Family, LabelSpace, ModelError, register
from apogeenet_jax.models.apogee_net import check_torch_shapes
from apogeenet_jax.models.layers import max_pool2

# The authors' model_apogee/model_args.yaml (and pipeline.log_scale_flux for the scaling).
AUTHORS_MODEL_DIM = 4
AUTHORS_DIM_MULTS = (1, 2, 4, 8, 16)  # first_conv: 4 channels; res_blocks 4→8→16→32→64
AUTHORS_KERNEL = 30
AUTHORS_POOL = 1024
AUTHORS_LINEAR_DEPTH = 6
AUTHORS_LINEAR_WIDTH = 1024
N_TARGETS = 3  # (log g, log10 Teff, [Fe/H])
LOG_FLOOR = 1e-6
CLIP_PERCENTILE = 95.0
CLIP_OFFSET = 1.0
# The authors' label normalisation (stats/apogee.yaml), in this family's label space.
AUTHORS_LABELS = ((3.2, 3.7, -0.2), (1.2, 0.1, 0.3))
# PyTorch's BatchNorm1d defaults: momentum 0.1 weighs the new batch, Flax's the running value.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def percentile(x: jnp.ndarray, q: float) -> jnp.ndarray:
  """The q-th percentile of each row of x (batch, L) → (batch,), torch.quantile's default
  (linear interpolation between the two nearest ranks). The rank q/100 · (L − 1) is computed in
  x's dtype, as torch does."""
  n = x.shape[-1]
  rank = jnp.asarray(q / 100.0, x.dtype) * jnp.asarray(n - 1, x.dtype)
  low = jnp.clip(jnp.floor(rank).astype(jnp.int32), 0, n - 1)
  high = jnp.minimum(low + 1, n - 1)
  weight = rank - low.astype(x.dtype)
  ordered = jnp.sort(x, axis=-1)
  lo, hi = ordered[..., low], ordered[..., high]
  return lo + weight * (hi - lo)


def log_scale_flux(flux: jnp.ndarray, log_floor: float = LOG_FLOOR,
                   clip_percentile: float = CLIP_PERCENTILE,
                   clip_offset: float = CLIP_OFFSET) -> jnp.ndarray:
  """flux (batch, L) raw → ln(max(flux, log_floor)) clipped above at each spectrum's own
  ``clip_percentile``-th percentile plus ``clip_offset``; non-finite flux counts as 0."""
  flux = jnp.where(jnp.isfinite(flux), flux, jnp.zeros((), flux.dtype))
  x = jnp.log(jnp.maximum(flux, jnp.asarray(log_floor, flux.dtype)))
  top = percentile(x, clip_percentile) + jnp.asarray(clip_offset, x.dtype)
  return jnp.minimum(x, top[:, None])


def adaptive_avg_pool(x: jnp.ndarray, output_size: int) -> jnp.ndarray:
  """x (B, L, C) → (B, output_size, C); bin i averages positions [⌊iL/n⌋, ⌈(i+1)L/n⌉), PyTorch's
  ``adaptive_avg_pool1d``. Each bin's (at most ⌈L/n⌉ + 1) positions are gathered and summed, then
  divided by their count, as PyTorch does; a dense (L, n) averaging matrix would be 17 MB."""
  length = x.shape[1]
  i = np.arange(output_size)
  start = (i * length) // output_size
  stop = -((-(i + 1) * length) // output_size)
  width = int((stop - start).max())
  index = start[:, None] + np.arange(width)[None, :]
  inside = index < stop[:, None]
  index = np.where(inside, index, start[:, None])
  summed = jnp.sum(jnp.where(inside[None, :, :, None], x[:, index], 0.0), axis=2)
  return summed / jnp.asarray(stop - start, x.dtype)[None, :, None]


def pad_channels(x: jnp.ndarray, features: int) -> jnp.ndarray:
  """x (B, L, C) → (B, L, features): (features − C) // 2 zero channels before, the rest after
  (the residual of a block that widens the channels)."""
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(f'cannot pad {x.shape[-1]} channels down to {features}')
  return jnp.pad(x, ((0, 0), (0, 0), (extra // 2, extra - extra // 2)))


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  # The two-pass variance: PyTorch's; E[x²] − E[x]² loses digits where |mean| ≫ std.
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      use_fast_variance=False, name=name)


class ResBlock(nn.Module):
  """Conv → BN → ELU → Conv → BN, plus the channel-padded input, → ELU; length kept
  (the second conv's padding is one less for an even kernel)."""
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    pad = self.kernel_size // 2
    pad2 = pad - 1 if self.kernel_size % 2 == 0 else pad
    y = nn.Conv(self.features, (self.kernel_size,), padding=((pad, pad),), use_bias=False,
                name='conv1')(x)
    y = nn.elu(_batch_norm(train, 'bn1')(y))
    y = nn.Conv(self.features, (self.kernel_size,), padding=((pad2, pad2),), use_bias=False,
                name='conv2')(y)
    y = _batch_norm(train, 'bn2')(y)
    return nn.elu(y + pad_channels(x, self.features))


class APOGEENet3(nn.Module):
  """APOGEE Net III (BOSS Net's APOGEE model; module docstring).

  Attributes:
    model_dim: base channel count; the first conv has model_dim · dim_mults[0] channels, res
      block i goes from model_dim · dim_mults[i] to model_dim · dim_mults[i + 1].
    dim_mults: the channel multipliers (the authors' (1, 2, 4, 8, 16): 4, 8, 16, 32, 64).
    kernel_size: of every conv (30).
    pool_size: length after the adaptive average pool (1024).
    linear_depth: number of Linear + ReLU blocks (6), then the output Linear.
    linear_width: their width (1024).
    num_targets: outputs (3).
    input_length: pixels per spectrum (8575).
    dropout_rate: dropout after each Linear + ReLU block. The authors have none (0.0, the
      default); kept for the same interface as the other families.
    log_floor, clip_percentile, clip_offset: the input scaling (``log_scale_flux``).
  """

  model_dim: int = AUTHORS_MODEL_DIM
  dim_mults: tuple[int, ...] = AUTHORS_DIM_MULTS
  kernel_size: int = AUTHORS_KERNEL
  pool_size: int = AUTHORS_POOL
  linear_depth: int = AUTHORS_LINEAR_DEPTH
  linear_width: int = AUTHORS_LINEAR_WIDTH
  num_targets: int = N_TARGETS
  input_length: int = N_PIXELS
  dropout_rate: float = 0.0
  log_floor: float = LOG_FLOOR
  clip_percentile: float = CLIP_PERCENTILE
  clip_offset: float = CLIP_OFFSET

  @property
  def input_shapes(self) -> dict[str, tuple[int, ...]]:
    return {'flux': (self.input_length,)}

  @property
  def channels(self) -> tuple[int, ...]:
    return tuple(self.model_dim * m for m in self.dim_mults)

  @nn.compact
  def __call__(self, flux: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """flux (batch, L) or (batch, L, 1) raw → standardised targets (batch, num_targets)."""
    if flux.ndim == 3 and flux.shape[2] == 1:
      flux = flux[..., 0]
    if flux.shape[1:] != (self.input_length,):
      raise ValueError(f'APOGEENet3 expects flux of shape (batch, {self.input_length}) or '
                       f'(batch, {self.input_length}, 1), got {flux.shape}')
    x = log_scale_flux(flux, self.log_floor, self.clip_percentile, self.clip_offset)
    # The authors' PositionalEncoding1D(1): inv_freq [1.0], its sin column only.
    position = jnp.sin(jnp.arange(self.input_length, dtype=x.dtype))
    x = jnp.stack([x, jnp.broadcast_to(position, x.shape)], axis=-1)  # (B, L, 2) flux first
    pad = self.kernel_size // 2
    x = nn.Conv(self.channels[0], (self.kernel_size,), padding=((pad, pad),),
                name='first_conv_conv_layer')(x)
    x = max_pool2(nn.elu(_batch_norm(train, 'first_conv_bn')(x)))
    for i, features in enumerate(self.channels[1:]):
      x = ResBlock(features, self.kernel_size, name=f'res_blocks_{i}')(x, train)
    x = adaptive_avg_pool(x, self.pool_size)
    # PyTorch flattens (C, L) channel-major; flatten the same way so the first Linear loads as is.
    x = jnp.swapaxes(x, 1, 2).reshape(x.shape[0], -1)
    for i in range(self.linear_depth):
      x = nn.relu(nn.Dense(self.linear_width, name=f'linear_sequential_{i}')(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_targets, name=f'linear_sequential_{self.linear_depth}')(x)


def expected_torch_shapes(model: APOGEENet3) -> dict[str, tuple[int, ...]]:
  """The state-dict keys and shapes (``num_batches_tracked`` aside) of the PyTorch BOSS Net
  that ``model`` mirrors."""
  k, channels = model.kernel_size, model.channels
  shapes = {'pos_enc.inv_freq': (1,),
            'first_conv.conv_layer.weight': (channels[0], 2, k),
            'first_conv.conv_layer.bias': (channels[0],)}
  shapes.update(_bn_shapes('first_conv.bn', channels[0]))
  for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
    shapes[f'res_blocks.{i}.conv1.weight'] = (c_out, c_in, k)
    shapes[f'res_blocks.{i}.conv2.weight'] = (c_out, c_out, k)
    shapes.update(_bn_shapes(f'res_blocks.{i}.bn1', c_out))
    shapes.update(_bn_shapes(f'res_blocks.{i}.bn2', c_out))
  widths = [channels[-1] * model.pool_size, *[model.linear_width] * model.linear_depth]
  for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
    shapes[f'linear_sequential.{i}.linear_layer.weight'] = (w_out, w_in)
    shapes[f'linear_sequential.{i}.linear_layer.bias'] = (w_out,)
  last = f'linear_sequential.{model.linear_depth}'
  shapes[f'{last}.weight'] = (model.num_targets, widths[-1])
  shapes[f'{last}.bias'] = (model.num_targets,)
  return shapes


def _bn_shapes(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
  return {f'{prefix}.{leaf}': (c,) for leaf in ('weight', 'bias', 'running_mean', 'running_var')}


# State-dict leaf → (Flax collection, leaf) for batch-norm layers and for Conv1d / Linear.
_BN_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def flax_path(key: str) -> tuple[str, tuple[str, ...], str]:
  """(collection, Flax module path, leaf) of a state-dict key, e.g.
  'res_blocks.0.bn1.running_var' → ('batch_stats', ('res_blocks_0', 'bn1'), 'var');
  'linear_sequential.0.linear_layer.weight' → ('params', ('linear_sequential_0',), 'kernel')."""
  *parts, leaf = key.split('.')
  if parts[0] in ('first_conv', 'linear_sequential'):
    parts = ['_'.join(parts[:2]), *parts[2:]]
  elif parts[0] == 'res_blocks':
    parts = [f'res_blocks_{parts[1]}', *parts[2:]]
  parts = [p for p in parts if p != 'linear_layer']
  if parts[-1].startswith('first_conv_bn') or parts[-1].startswith('bn'):
    collection, leaf = _BN_LEAVES[leaf]
  else:
    collection, leaf = 'params', {'weight': 'kernel', 'bias': 'bias'}[leaf]
  return collection, tuple(parts), leaf


def variables_from_torch(arrays: Mapping[str, np.ndarray], model: APOGEENet3 | None = None
                         ) -> dict[str, Any]:
  """A PyTorch BOSS Net (APOGEE) state dict (float32 arrays) → Flax variables {'params',
  'batch_stats'} for ``model`` (default: the authors'). ``num_batches_tracked`` is dropped;
  ``pos_enc.inv_freq`` must be [1.0] (the sin(i) channel the module computes)."""
  model = model or APOGEENet3()
  arrays = {k: v for k, v in arrays.items() if not k.endswith('num_batches_tracked')}
  check_torch_shapes(arrays, expected_torch_shapes(model), 'APOGEE Net III (BOSS Net, APOGEE)')
  if not np.array_equal(arrays['pos_enc.inv_freq'], [1.0]):
    raise ModelError(f'pos_enc.inv_freq is {arrays["pos_enc.inv_freq"]}, expected [1.0]')
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for key, value in arrays.items():
    if key == 'pos_enc.inv_freq':
      continue
    collection, path, leaf = flax_path(key)
    if leaf == 'kernel':  # Conv1d (out, in, k) → (k, in, out); Linear (out, in) → (in, out)
      value = value.transpose(2, 1, 0) if value.ndim == 3 else value.T
    node = variables[collection]
    for name in path:
      node = node.setdefault(name, {})
    # A copy: the arrays may share memory with the torch tensors (``state_dict_arrays``), whose
    # running statistics a PyTorch forward in train mode updates in place.
    node[leaf] = np.array(value, order='C')
  return variables


def _from_torch(arrays: Mapping[str, np.ndarray]) -> tuple[APOGEENet3, dict[str, Any]]:
  model = APOGEENet3()
  return model, variables_from_torch(arrays, model)


FAMILY = register(Family(
    name='apogee_net_3', module=APOGEENet3, inputs={'flux': (N_PIXELS,)}, noisy_inputs=('flux',),
    label_space=LabelSpace(LABEL_NAMES, log10=('TEFF',)),
    description='APOGEE Net III (BOSS Net, Sizemore et al. 2024): the spectrum alone, '
                'log10 Teff, batch norm',
    torch_keys=frozenset({'pos_enc.inv_freq', 'first_conv.conv_layer.weight',
                          'res_blocks.0.conv1.weight', 'res_blocks.0.bn1.running_var',
                          'linear_sequential.0.linear_layer.weight'}),
    from_torch=_from_torch, authors_labels=AUTHORS_LABELS))
