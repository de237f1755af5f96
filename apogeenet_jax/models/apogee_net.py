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

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from apogeenet_jax.constants import LABEL_NAMES, N_PIXELS
from apogeenet_jax.models import Family, LabelSpace, register
from apogeenet_jax.models.layers import max_pool2, scale_flux

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
    if flux.ndim == 2:
      flux = flux[..., None]
    if flux.shape[1:] != (self.input_length, 1):
      raise ValueError(
          f'APOGEENet expects flux of shape (batch, {self.input_length}) or '
          f'(batch, {self.input_length}, 1), got {flux.shape}')
    x = scale_flux(flux[..., 0], self.flux_scaling)[..., None]
    x = x if self.input_scale == 1.0 else x / jnp.asarray(self.input_scale, x.dtype)
    for i, features in enumerate(self.channels):
      x = nn.Conv(features, kernel_size=(3,), padding=((1, 1),), name=f'conv{i + 1}')(x)
      x = nn.relu(x)
      if i % 2 == 1:
        # VALID pooling floors odd lengths exactly like F.max_pool1d: 8575 → … → 133.
        if self.pool == 'pairwise':
          x = max_pool2(x)
        elif self.pool == 'reduce_window':
          x = nn.max_pool(x, window_shape=(2,), strides=(2,), padding='VALID')
        else:
          raise ValueError(f"pool must be 'pairwise' or 'reduce_window', got {self.pool!r}")
    # PyTorch flattens (C, L) channel-major; flatten the same way so fc1 loads unpermuted.
    x = jnp.swapaxes(x, 1, 2).reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, name=f'fc{i + 1}')(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_targets, name=f'fc{len(self.hidden) + 1}')(x)


FAMILY = register(Family(
    name='apogee_net', module=APOGEENet, inputs={'flux': (N_PIXELS,)}, noisy_inputs=('flux',),
    label_space=LabelSpace(LABEL_NAMES),
    description='APOGEE Net I (Olney et al. 2020, Appendix B): the spectrum alone, Teff in K'))
