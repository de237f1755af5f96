"""Layers and input scalings shared by the families: the per-spectrum flux scaling (with its
sort-free good-pixel median) and the fused max-pool of 2."""

import jax
import jax.numpy as jnp
from jax import lax

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
