"""APOGEE Net as a Flax (linen) module: the VGG-style 1-D CNN of Olney et al. 2020, Appendix B.

The module mirrors the authors' PyTorch code layer for layer so that their weights load with a
transpose and nothing else (see ``convert_torch``):

    12 × Conv1d(kernel 3, padding 1) + ReLU, a max-pool of 2 after every pair,
    channels 8,8 | 16,16 | 16,16 | 32,32 | 32,32 | 64,64;
    flatten channel-major (64 × 133 = 8512, PyTorch's (C, L) order);
    Dense 512 → dropout → ReLU → Dense 512 → dropout → ReLU → Dense 3.

Input: raw combined apStar flux, (batch, 8575) or (batch, 8575, 1), 1e-17 erg/s/cm²/Å. Before the
first layer, each spectrum may be divided by its own flux level (``flux_scaling='median'``: the
median of its good pixels), then by one global constant ``input_scale``. The authors' network
reads the raw flux (``flux_scaling='none'``, ``input_scale=1.0``, the defaults); a trained
checkpoint records both in meta['model'], so prediction, Monte Carlo draws and the linear σ all
see the same scaling: it is part of the function of raw flux that the module computes.
Output: (batch, 3) standardised (log g, Teff, [Fe/H]) — see ``normalization``.
"""

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from apogeenet_jax.constants import LABEL_NAMES, N_PIXELS
from apogeenet_jax.models import Family, LabelSpace, ModelError, register
from apogeenet_jax.models.layers import max_pool2, scale_flux
from apogeenet_jax.normalization import PAPER_STANDARDIZER

# Appendix B of the paper.
PAPER_CHANNELS = (8, 8, 16, 16, 16, 16, 32, 32, 32, 32, 64, 64)
PAPER_HIDDEN = (512, 512)
PAPER_DROPOUT = 0.1  # §3.3
N_TARGETS = 3  # (log g, Teff, [Fe/H])


class APOGEENet(nn.Module):
  """The APOGEE Net regression network (paper Appendix B).

  Attributes:
    channels: output channels of the conv layers; a max-pool of 2 follows every second one.
    hidden: widths of the hidden dense layers.
    num_targets: number of regression outputs.
    dropout_rate: dropout after each hidden dense layer (paper: 0.1).
    input_length: pixels per spectrum (8575 on the apStar grid).
    pool: 'pairwise' (default) or 'reduce_window' (``nn.max_pool``). Identical outputs and
      gradients; 'pairwise' trains ~1.5x faster on CPU (see ``max_pool2``).
    flux_scaling: 'none' (the authors' network: raw flux) or 'median' (each spectrum divided by
      the median of its good pixels, ``scale_flux``; no parameter).
    input_scale: then the flux is divided by this one constant (no parameter). 1.0 for the
      authors' weights; with raw flux, training sets it to the median flux of the training set so
      that the first layer sees O(1) inputs (configs/paper.py keeps 1.0).
  """

  channels: Sequence[int] = PAPER_CHANNELS
  hidden: Sequence[int] = PAPER_HIDDEN
  num_targets: int = N_TARGETS
  dropout_rate: float = PAPER_DROPOUT
  input_length: int = N_PIXELS
  pool: str = 'pairwise'
  input_scale: float = 1.0
  flux_scaling: str = 'none'

  @property
  def input_shapes(self) -> dict[str, tuple[int, ...]]:
    return {'flux': (self.input_length,)}

  @nn.compact
  def __call__(self, flux: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """flux (batch, L) or (batch, L, 1) → standardised targets (batch, num_targets)."""
    x = spectrum_features(self, flux)
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, name=f'fc{i + 1}')(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_targets, name=f'fc{len(self.hidden) + 1}')(x)


def spectrum_features(module: nn.Module, flux: jnp.ndarray) -> jnp.ndarray:
  """The flux scaling and the conv stack of ``module`` (its ``input_length``, ``flux_scaling``,
  ``input_scale``, ``channels``, ``pool``), called inside its compact ``__call__``: flux (batch, L)
  or (batch, L, 1) → (batch, C · L') flattened channel-major, as PyTorch flattens (C, L'), so that
  fc1 loads unpermuted. Shared by APOGEE Net I and II (their conv stacks are the same)."""
  name = type(module).__name__
  if flux.ndim == 2:
    flux = flux[..., None]
  if flux.shape[1:] != (module.input_length, 1):
    raise ValueError(
        f'{name} expects flux of shape (batch, {module.input_length}) or '
        f'(batch, {module.input_length}, 1), got {flux.shape}')
  x = scale_flux(flux[..., 0], module.flux_scaling)[..., None]
  x = x if module.input_scale == 1.0 else x / jnp.asarray(module.input_scale, x.dtype)
  for i, features in enumerate(module.channels):
    x = nn.Conv(features, kernel_size=(3,), padding=((1, 1),), name=f'conv{i + 1}')(x)
    x = nn.relu(x)
    if i % 2 == 1:
      # VALID pooling floors odd lengths exactly like F.max_pool1d: 8575 → … → 133.
      if module.pool == 'pairwise':
        x = max_pool2(x)
      elif module.pool == 'reduce_window':
        x = nn.max_pool(x, window_shape=(2,), strides=(2,), padding='VALID')
      else:
        raise ValueError(f"pool must be 'pairwise' or 'reduce_window', got {module.pool!r}")
  return jnp.swapaxes(x, 1, 2).reshape(x.shape[0], -1)


# The authors' released label normalisation (their inference code; Table 1 rounds it).
AUTHORS_LABELS = (tuple(PAPER_STANDARDIZER.mean), tuple(PAPER_STANDARDIZER.std))
_TORCH_LAYER = re.compile(r'^(conv|fc)(\d+)\.(weight|bias)$')


def expected_torch_shapes(model: APOGEENet) -> dict[str, tuple[int, ...]]:
  """The state_dict keys and shapes of the PyTorch model that ``model`` mirrors."""
  shapes, c_in = {}, 1
  for i, c_out in enumerate(model.channels, start=1):
    shapes[f'conv{i}.weight'], shapes[f'conv{i}.bias'] = (c_out, c_in, 3), (c_out,)
    c_in = c_out
  length = model.input_length
  for _ in range(len(model.channels) // 2):
    length //= 2
  widths = [c_in * length, *model.hidden, model.num_targets]
  for i, (w_in, w_out) in enumerate(itertools.pairwise(widths), start=1):
    shapes[f'fc{i}.weight'], shapes[f'fc{i}.bias'] = (w_out, w_in), (w_out,)
  return shapes


def check_torch_shapes(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
                       what: str) -> None:
  """Raises ModelError listing every missing, unexpected or mis-shaped key."""
  problems = []
  if missing := sorted(set(expected) - set(arrays)):
    problems.append(f'missing keys: {missing}')
  if unexpected := sorted(set(arrays) - set(expected)):
    problems.append(f'unexpected keys: {unexpected}')
  problems += [f'{k}: shape {arrays[k].shape}, expected {s}' for k, s in expected.items()
               if k in arrays and arrays[k].shape != tuple(s)]
  if problems:
    raise ModelError(f'state_dict does not match {what}: ' + '; '.join(problems))


def torch_layer(key: str, value: np.ndarray) -> tuple[str, str, np.ndarray]:
  """(Flax layer name, leaf name, array) of one Conv1d / Linear state-dict entry 'name.weight'
  or 'name.bias': Conv1d weight (out, in, k) → kernel (k, in, out); Linear (out, in) → (in, out)."""
  layer, what = key.rsplit('.', 1)
  if what == 'bias':
    return layer, 'bias', value
  if value.ndim == 3:
    return layer, 'kernel', np.ascontiguousarray(value.transpose(2, 1, 0))
  return layer, 'kernel', np.ascontiguousarray(value.T)


def params_from_torch(arrays: Mapping[str, np.ndarray], model: APOGEENet | None = None
                      ) -> dict[str, Any]:
  """A PyTorch APOGEE Net state_dict (float32 arrays) → Flax params for ``model`` (default: the
  paper's). fc1 needs no row permutation because the module flattens channel-major."""
  model = model or APOGEENet()
  check_torch_shapes(arrays, expected_torch_shapes(model), 'APOGEE Net (Appendix B)')
  params: dict[str, dict[str, np.ndarray]] = {}
  for key, value in arrays.items():
    layer, leaf, array = torch_layer(key, value)
    params.setdefault(layer, {})[leaf] = array
  return params


def _from_torch(arrays: Mapping[str, np.ndarray]) -> tuple[APOGEENet, dict[str, Any]]:
  model = APOGEENet()  # the authors' network reads raw flux (flux_scaling 'none')
  return model, {'params': params_from_torch(arrays, model)}


FAMILY = register(Family(
    name='apogee_net', module=APOGEENet, inputs={'flux': (N_PIXELS,)}, noisy_inputs=('flux',),
    label_space=LabelSpace(LABEL_NAMES),
    description='APOGEE Net I (Olney et al. 2020, Appendix B): the spectrum alone, Teff in K',
    torch_keys=frozenset({'conv1.weight', 'conv12.weight', 'fc3.weight'}),
    from_torch=_from_torch, authors_labels=AUTHORS_LABELS))
