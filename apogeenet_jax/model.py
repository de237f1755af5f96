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

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from apogeenet_jax.constants import N_PIXELS

# Appendix B of the paper.
PAPER_CHANNELS = (8, 8, 16, 16, 16, 16, 32, 32, 32, 32, 64, 64)
PAPER_HIDDEN = (512, 512)
PAPER_DROPOUT = 0.1  # §3.3
N_TARGETS = 3  # (log g, Teff, [Fe/H])
FLUX_SCALINGS = ('none', 'median', 'log_median')
# 'log_median': flux / level below this is clipped before the log (noise at low S/N can be ≤ 0).
LOG_FLOOR = 0.01


def scale_flux(flux: jnp.ndarray, scaling: str) -> jnp.ndarray:
  """flux (batch, L) divided by each spectrum's flux level: 'none' (raw flux), 'median' (the
  median of its good pixels, flux > 0: bad pixels hold exactly 0, §2.1) or 'log_median' (the log
  of that ratio, clipped at ``LOG_FLOOR``; bad pixels stay 0, i.e. at the level).

  Real apStar flux levels span three decades (median good-pixel flux ~15 to ~15,000 in DR17
  files), so no one constant makes the first layer's input O(1) for every star; the per-spectrum
  median does, and leaves the shape of the spectrum — continuum slope and lines, where the labels
  are — unchanged. A spectrum with no positive pixel keeps its flux (level 1).
  """
  if scaling == 'none':
    return flux
  if scaling not in FLUX_SCALINGS:
    raise ValueError(f'flux_scaling must be one of {FLUX_SCALINGS}, got {scaling!r}')
  level = good_pixel_median(flux)[:, None]
  level = jnp.where(jnp.isfinite(level) & (level > 0), level, jnp.ones((), flux.dtype))
  if scaling == 'median':
    return flux / level
  # Absorption is multiplicative (continuum × e^−τ): in log flux the lines add to a smooth
  # continuum, whatever the star's level.
  return jnp.where(flux != 0, jnp.log(jnp.maximum(flux / level, LOG_FLOOR)), 0.0)


@jax.custom_jvp
def good_pixel_median(flux: jnp.ndarray) -> jnp.ndarray:
  """Median of each row's positive pixels, (batch, L) → (batch,); NaN for a row with none.

  The same numbers as ``jnp.nanmedian(jnp.where(flux > 0, flux, nan), axis=1)``, bit for bit,
  and the same derivative (1 on the middle pixel, ½ on each of the two middle ones for an even
  count), without a sort: XLA's CPU sort of 8575 pixels cost 2.2 ms a spectrum, as much as half
  of a forward pass, and the Monte Carlo draws pay it for every draw. Positive floats order like
  their bit patterns as integers, so the k-th smallest is found by bisection on the integer,
  one comparison of the whole row per bit (31 for float32).
  """
  return _median_and_ranks(flux)[0]


def _median_and_ranks(flux):
  """(median, pixel index of the lower middle value, of the upper one) of the positive pixels.

  The indices are the ones a stable sort puts at the two middle ranks, so the derivative is
  the sort-based median's.
  """
  int_type = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[flux.dtype.itemsize]
  good = flux > 0
  bits = jnp.where(good, lax.bitcast_convert_type(flux, int_type), 0)
  top = lax.bitcast_convert_type(jnp.array(jnp.inf, flux.dtype), int_type)
  n = good.sum(axis=1)
  low_rank, high_rank = (n - 1) // 2, n // 2

  def kth(rank):  # smallest pattern v with more than `rank` good pixels at or below it
    def halve(_, bounds):
      lo, hi = bounds
      mid = lo + (hi - lo) // 2
      enough = (good & (bits <= mid[:, None])).sum(axis=1) > rank
      return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)
    lo = jnp.zeros_like(n, dtype=int_type)
    _, v = lax.fori_loop(0, 8 * flux.dtype.itemsize, halve, (lo, jnp.full_like(lo, top)))
    return v

  low = kth(low_rank)
  below = (good & (bits < low[:, None])).sum(axis=1)
  at_or_below = (good & (bits <= low[:, None])).sum(axis=1)
  # The upper middle value is the lower one again when it is tied, else the next pattern up.
  next_up = jnp.min(jnp.where(good & (bits > low[:, None]), bits, top), axis=1)
  high = jnp.where(at_or_below > high_rank, low, next_up)
  values = [lax.bitcast_convert_type(v, flux.dtype) for v in (low, high)]
  median = jnp.where(n > 0, values[0] * 0.5 + values[1] * 0.5, jnp.nan)
  median = jnp.where(low_rank == high_rank, jnp.where(n > 0, values[0], jnp.nan), median)

  def index_of(value_bits, rank, first_rank):  # the (rank - first_rank)-th tied pixel, in order
    tied = good & (bits == value_bits[:, None])
    return jnp.argmax(jnp.cumsum(tied, axis=1) > (rank - first_rank)[:, None], axis=1)

  below_high = (good & (bits < high[:, None])).sum(axis=1)
  return median, index_of(low, low_rank, below), index_of(high, high_rank, below_high)


@good_pixel_median.defjvp
def _good_pixel_median_jvp(primals, tangents):
  (flux,), (dflux,) = primals, tangents
  median, i_low, i_high = _median_and_ranks(flux)
  d_low, d_high = (jnp.take_along_axis(dflux, i[:, None], axis=1)[:, 0] for i in (i_low, i_high))
  n = (flux > 0).sum(axis=1)
  dmedian = jnp.where(n % 2 == 1, d_low, d_low * 0.5 + d_high * 0.5)
  return median, jnp.where(n > 0, dmedian, 0.0).astype(dflux.dtype)


def module_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Constructor arguments of a module from a config or a checkpoint meta's 'model': sequences
  (JSON lists) become tuples, as flax modules must be hashable."""
  return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in dict(cfg).items()}


def max_pool2(x: jnp.ndarray) -> jnp.ndarray:
  """Max-pool of window and stride 2 along axis 1: (B, L, C) → (B, L // 2, C), odd L floored.

  The same values as ``nn.max_pool(x, (2,), (2,), 'VALID')``, and the same gradient: ties go to
  the first element, as in XLA's select-and-scatter. Written as an elementwise ``where`` so that
  XLA fuses the backward pass; select-and-scatter took ~40% of a CPU training step (measured:
  pool backward 160 ms → 20 ms at (128, 8575, 8)).
  """
  half = x.shape[1] // 2
  pairs = x[:, :2 * half].reshape(x.shape[0], half, 2, x.shape[2])
  first, second = pairs[:, :, 0], pairs[:, :, 1]
  return jnp.where(first >= second, first, second)


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
