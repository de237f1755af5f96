"""Spectra held in memory: a split loaded once as preprocessed arrays (the 'memory' input mode).

The grain pipeline (``input_pipeline``) decodes and preprocesses every spectrum again each epoch,
at ~700–770 spectra/s per process (``benchmarks/data_benchmark.py``), which leaves an accelerator
waiting. The data are small: 8575 float32 pixels are 34.3 kB per spectrum, 3.43 GB per 100k
spectra, and half that in a 16-bit storage dtype. So this module reads a split ONCE, through the
same ``decode_example`` and ``preprocess_flux`` as the stream, into

  flux       (n_held, 8575) storage dtype  preprocessed flux of the rows this process holds,
                                            1e-17 erg/s/cm²/Å
  rows       (n_held,) int64  source index of each held flux row, ascending
  labels     (n, 3)  float32  (log g, Teff, [Fe/H]) in native units, every row of the split
  data_type  (n,)    int32    index into ``constants.DATA_TYPES``, every row
  apogee_id  (n,)    str
  noise      (n_held, 8575) storage dtype, or None: the per-pixel noise scale of each held row
             (``noise_scale`` of its preprocessed errors), held only for noise augmentation

Labels and data types of the whole split are kept because the Standardizer and the adaptation
subsets need them (16 bytes a spectrum); only flux is restricted to the rows a process holds.
Batches are gathered with the indices of ``input_pipeline.epoch_batch_indices``: the same batches,
in the same order, as the stream.

Storage dtype: 'float32' is exact. 'bfloat16' keeps 8 significant bits: relative rounding
≤ 2⁻⁸ = 0.39% (rms ~0.11%) at any flux, below the ~1% noise of an S/N-100 spectrum. 'float16'
keeps 11 bits (≤ 2⁻¹¹ = 0.049%) but holds |flux| ≤ 65504 only; a larger flux is an error. The rounding a load
actually incurred is measured and returned (``SplitArrays.rounding``).
NumPy only (``ml_dtypes`` provides bfloat16): ``training`` places the arrays on devices.
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from absl import logging

from apogeenet_jax.constants import LABEL_NAMES, N_PIXELS
from apogeenet_jax.input_pipeline import InputPipelineError, read_metadata
from apogeenet_jax.preprocessing import preprocess

STORAGE_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
                  'float16': np.dtype(np.float16)}
# Labels (3 float32) + data type (int32) per spectrum; on a device the standardised targets
# (3 float32) replace the labels.
_PER_SPECTRUM_EXTRA_BYTES = 4 * len(LABEL_NAMES) + 4


def storage_dtype(name: str) -> np.dtype:
  if name not in STORAGE_DTYPES:
    raise ValueError(f'storage dtype {name!r}: expected one of {sorted(STORAGE_DTYPES)}')
  return STORAGE_DTYPES[name]


def row_bytes(dtype: str = 'float32', noise: bool = False) -> int:
  """Bytes of one held row: its flux (and with ``noise`` its noise scale) in the storage dtype."""
  return (1 + noise) * N_PIXELS * storage_dtype(dtype).itemsize


def bytes_per_spectrum(dtype: str = 'float32', noise: bool = False) -> int:
  """Memory one held spectrum costs: ``row_bytes`` plus labels and data type."""
  return row_bytes(dtype, noise) + _PER_SPECTRUM_EXTRA_BYTES


@dataclasses.dataclass(frozen=True)
class SplitArrays:
  """One split in memory; see the module docstring for the fields."""

  flux: np.ndarray
  rows: np.ndarray
  labels: np.ndarray
  data_type: np.ndarray
  apogee_id: np.ndarray
  # Relative rounding of the storage dtype over the non-zero pixels: {'max': …, 'rms': …}.
  rounding: Mapping[str, float]
  noise: np.ndarray | None = None
  # Small per-star input vectors of EVERY row (``input_pipeline.VECTOR_KEYS`` the records carry,
  # e.g. 'metadata' (n, 7) float32): 28 bytes a star, kept whole like the labels.
  vectors: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.labels)

  def metadata(self) -> dict[str, np.ndarray]:
    """What ``input_pipeline.read_metadata`` returns for the split."""
    return {'labels': self.labels, 'data_type': self.data_type, 'apogee_id': self.apogee_id,
            'vectors': self.vectors}

  def positions(self, indices: np.ndarray) -> np.ndarray:
    """Source indices → positions in ``flux``; an index this process does not hold is an error."""
    indices = np.asarray(indices, np.int64)
    if len(self.rows) == len(self.labels):  # All rows held: position = index.
      return indices
    pos = np.searchsorted(self.rows, indices)
    if np.any(pos >= len(self.rows)) or np.any(self.rows[np.minimum(pos, len(self.rows) - 1)]
                                               != indices):
      raise InputPipelineError('asked for spectra this process does not hold in memory')
    return pos

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """A batch (any leading shape) of source ``indices``: float32 flux, labels, data_type."""
    indices = np.asarray(indices, np.int64)
    positions = self.positions(indices)
    batch = {'flux': self.flux[positions].astype(np.float32, copy=False),
             'labels': self.labels[indices], 'data_type': self.data_type[indices]}
    if self.noise is not None:  # sharding.NOISE_KEY: the flux's (this module stays free of JAX)
      batch['noise'] = {'flux': self.noise[positions].astype(np.float32, copy=False)}
    for key, values in self.vectors.items():
      batch[key] = values[indices]
    return batch


def load_split(source: Sequence[Mapping[str, Any]], *, rows: np.ndarray | None = None,
               dtype: str = 'float32', num_threads: int = 8, name: str = 'split',
               noise_scale: Callable[[np.ndarray], np.ndarray] | None = None) -> SplitArrays:
  """Reads every record of ``source`` once; keeps the preprocessed flux of ``rows`` (default all)
  and, given ``noise_scale`` (preprocessed errors (1, 8575) → per-pixel noise scale), the noise
  scale of the same rows.

  ``name`` only labels errors and log lines (e.g. the split and data dir).
  """
  n = len(source)
  rows = np.arange(n) if rows is None else np.unique(np.asarray(rows, np.int64))
  if len(rows) and (rows[0] < 0 or rows[-1] >= n):
    raise ValueError(f'{name}: rows outside [0, {n})')
  store = storage_dtype(dtype)
  flux = np.empty((len(rows), N_PIXELS), store)
  noise = None if noise_scale is None else np.empty((len(rows), N_PIXELS), store)
  position = np.full(n, -1, np.int64)
  position[rows] = np.arange(len(rows))
  err_max, err_sq, err_count = 0.0, 0.0, 0

  def keep(i: int, example: dict[str, Any]) -> None:
    nonlocal err_max, err_sq, err_count
    if position[i] < 0:
      return
    f, err = preprocess(example['flux'], example['flux_err'])
    q = f.astype(store)
    if store != np.float32:
      if not np.all(np.isfinite(q)):
        raise InputPipelineError(
            f'{name}: record {i} ({example["apogee_id"]}) has flux up to {np.abs(f).max():.4g}, '
            f'beyond the range of {dtype}; use memory_dtype bfloat16 or float32')
      good = f != 0
      rel = np.abs(q[good].astype(np.float32) - f[good]) / np.abs(f[good])
      if rel.size:
        err_max = max(err_max, float(rel.max()))
        err_sq += float(np.sum(np.square(rel, dtype=np.float64)))
        err_count += rel.size
    flux[position[i]] = q
    if noise is not None:
      scale = noise_scale(err[None])[0].astype(store)
      if not np.all(np.isfinite(scale)):
        raise InputPipelineError(f'{name}: record {i} ({example["apogee_id"]}) has a noise scale '
                                 f'beyond the range of {dtype}; use memory_dtype float32')
      noise[position[i]] = scale

  meta = read_metadata(source, num_threads=num_threads, visit=keep)
  rounding = {'max': err_max, 'rms': float(np.sqrt(err_sq / err_count)) if err_count else 0.0}
  logging.info('%s: %d of %d spectra in memory as %s (%.2f GB); relative rounding max %.2g, '
               'rms %.2g.', name, len(rows), n, dtype, flux.nbytes / 1e9, rounding['max'],
               rounding['rms'])
  return SplitArrays(flux=flux, rows=rows, rounding=rounding, noise=noise, **meta)


def eval_batches(arrays: SplitArrays, batch_size: int, *, indices: np.ndarray | None = None,
                 num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """In-order fixed-size batches with a 'mask', padded like ``input_pipeline.eval_batches``."""
  indices = np.arange(len(arrays)) if indices is None else np.asarray(indices, np.int64)
  n_needed = -(-len(indices) // batch_size)
  num_batches = n_needed if num_batches is None else num_batches
  if num_batches < n_needed:
    raise ValueError(f'num_batches {num_batches} < {n_needed} needed for {len(indices)} examples')
  if num_batches and not len(indices):
    raise InputPipelineError('cannot pad an empty index set (no example to copy shapes from)')
  total = num_batches * batch_size
  pad = indices[0] if len(indices) else 0  # Any held row: masked out of every metric.
  padded = np.concatenate([indices, np.full(total - len(indices), pad, np.int64)])
  valid = np.arange(total) < len(indices)
  for b in range(num_batches):
    sl = slice(b * batch_size, (b + 1) * batch_size)
    yield {**arrays.gather(padded[sl]), 'mask': valid[sl]}
