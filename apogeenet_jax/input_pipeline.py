"""The input pipeline: built APOGEE records → shuffled, sharded, preprocessed NumPy batches.

Reads the array_record files that ``tfds_apogee`` builds through ``tfds`` data sources (random
access, no TensorFlow) and batches them with grain worker threads plus a background prefetch, so
the accelerator does not wait on I/O. Flux and errors go through ``preprocessing`` — the same
functions inference uses. NumPy only: no JAX here.

Every batch is a dict of NumPy arrays:
  'flux'      (B, 8575) float32  raw flux after ``preprocess_flux``, 1e-17 erg/s/cm²/Å
  'flux_err'  (B, 8575) float32  after ``preprocess`` (bad pixels = 1e10)
  'labels'    (B, 3)    float32  (log g [dex], Teff [K], [Fe/H] [dex]), native units
  'data_type' (B,)      int32    index into ``constants.DATA_TYPES``
  'apogee_id' (B,)      str
  'file'      (B,)      str      the apStar file ('' when the source has none)
  'snr', 'ra', 'dec' (B,) float32
  'mask'      (B,)      bool     True for real rows; eval batches pad the last batch with False.
Records of a data set built with photometry (builder version ≥ 1.1.0, ``has_metadata``) add
  'metadata'     (B, 7) float32  PLX (mas), G, BP, RP, J, H, K (mag), ``constants.METADATA_COLUMNS``
  'metadata_err' (B, 7) float32  their errors; NaN where missing (values ≥ 98: catalogue missing)
Eval batches (``eval_batches``) also carry
  'index'     (B,)      int64    each row's position in its source (the per-star PRNG key's index)
  'problem'   (B,)      str      why a row could not be read ('' when it was; such rows are masked)

Inference on apStar files reads them through the same machinery: ``ApStarFiles`` is a
random-access source over a file list, like a tfds data source, so ``eval_batches`` serves a
built split and a folder of new files alike (grain threads, in order, fixed batch shapes).
"""

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging
from etils import epath

from apogeenet_jax import apstar, file_io
from apogeenet_jax.constants import DATA_TYPES, LABEL_NAMES, METADATA_COLUMNS, N_PIXELS
from apogeenet_jax.preprocessing import preprocess, preprocess_flux

DEFAULT_NAME = 'apogee'
# data_type of a record without labels (an apStar file given for inference).
UNLABELLED = -1
# Per-star scalars and their dtypes: RA/Dec stay float64 (float32 rounds them by ~0.05″).
_SCALAR_KEYS = {'snr': np.float32, 'ra': np.float64, 'dec': np.float64}
# Photometric features of APOGEE Net II: passed through when a record has them, never required.
METADATA_KEYS = ('metadata', 'metadata_err')


class InputPipelineError(RuntimeError):
  """A dataset directory, split or record does not have the expected content."""


# ------------------------------------------------------------------------------------------------
# Opening built data.


def _find_builder_dir(data_dir: str | os.PathLike, name: str) -> epath.Path:
  """DATA_DIR/name/VERSION (highest version), or DATA_DIR itself when it is a version folder.

  Local folders or object storage (gs://…, through ``etils.epath``).
  """
  data_dir = file_io.as_path(data_dir)
  if (data_dir / 'dataset_info.json').is_file():
    return data_dir
  root = data_dir / name
  if not root.is_dir():
    raise InputPipelineError(
        f'{data_dir}: no built dataset {name!r} here (expected {root}/<version>/); build it with '
        f'`python -m tfds_apogee.build --manual_dir=M --data_dir={data_dir}`')
  versions = [v.name for v in root.iterdir() if (v / 'dataset_info.json').is_file()]
  if not versions:
    raise InputPipelineError(f'{root}: holds no built version (no */dataset_info.json)')

  def version_key(v: str):
    try:
      return tuple(int(p) for p in v.split('.'))
    except ValueError:
      return (-1,)

  return root / max(versions, key=version_key)


def open_split(data_dir: str | os.PathLike, split: str, name: str = DEFAULT_NAME
               ) -> Sequence[Mapping[str, Any]]:
  """A random-access source (len, [i] → feature dict) over one split of a built dataset.

  Reads the built directory directly (``tfds.builder_from_directory``), so neither TensorFlow nor
  the builder code is needed. ``data_dir`` is the tfds data dir (holding ``name/<version>/``) or the
  version folder itself.
  """
  import tensorflow_datasets as tfds  # Heavy import; only needed for real data.

  builder_dir = _find_builder_dir(data_dir, name)
  try:
    builder = tfds.builder_from_directory(str(builder_dir))
  except Exception as e:  # tfds raises a variety of types for a broken directory.
    raise InputPipelineError(f'{builder_dir}: cannot open the built dataset: {e}') from e
  if split not in builder.info.splits:
    raise InputPipelineError(
        f'{builder_dir}: no split {split!r} (has {sorted(builder.info.splits.keys())})')
  source = builder.as_data_source(split=split)
  logging.info('Opened %s split %r: %d examples.', builder_dir, split, len(source))
  return _BuiltSplit(source, builder_dir, split, name)


def has_metadata(source: Sequence[Mapping[str, Any]]) -> bool:
  """Whether ``source``'s records carry the photometric features (APOGEE Net II's input): from
  the built data set's features (``open_split``), else from its first record."""
  info = getattr(source, 'dataset_info', None)
  if info is not None:
    return all(key in info.features for key in METADATA_KEYS)
  return len(source) > 0 and all(key in source[0] for key in METADATA_KEYS)


def require_metadata(source: Sequence[Mapping[str, Any]], needed_by: str = 'APOGEE Net II'
                     ) -> None:
  """Raises InputPipelineError (one line) unless ``source``'s records carry the photometry."""
  if has_metadata(source):
    return
  info = getattr(source, 'dataset_info', None)
  where = f'{info.data_dir} (version {info.version})' if info is not None else 'the source'
  raise InputPipelineError(
      f'{where}: records without the photometric features {METADATA_KEYS} that {needed_by} '
      f'needs; rebuild with the current builder (python -m tfds_apogee.build … --overwrite) from '
      f'a catalogue with the columns {", ".join(METADATA_COLUMNS)} (docs/data.md)')


class _BuiltSplit(Sequence[Mapping[str, Any]]):
  """A split of the built data set whose read errors name its shard files (a truncated or
  bit-flipped array_record shard raises riegeli's RuntimeError, which names none). Every other
  attribute (``dataset_info`` …) is the TFDS data source's."""

  def __init__(self, source: Sequence, builder_dir: epath.Path, split: str, name: str):
    self._source, self._builder_dir, self._split, self._name = source, builder_dir, split, name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    try:
      return self._source[index]
    except IndexError:
      raise
    except Exception as e:  # riegeli, array_record and TFDS decoding raise various types.
      shards = sorted(str(p) for p in self._builder_dir.iterdir()
                      if p.name.startswith(f'{self._name}-{self._split}.'))
      first = (str(e).strip().splitlines() or [''])[0][:300]
      raise InputPipelineError(
          f'{self._builder_dir}: record {index} of the {self._split!r} split cannot be read '
          f'({type(e).__name__}: {first}); its shard file is damaged: {", ".join(shards)}. '
          f'Rebuild the data set (python -m tfds_apogee.build … --overwrite).') from e

  def __getattr__(self, attribute):
    return getattr(self._source, attribute)


class ApStarFiles(Sequence[Mapping[str, Any]]):
  """A random-access source over apStar files ([i] reads file i), for ``eval_batches``.

  Records look like a built split's, without labels. A file that cannot be read gives a record
  whose 'problem' says why (flux 0, errors infinite): ``eval_batches`` masks that row, and the
  caller reports it. Reading never raises, so one bad file among 263,000 does not stop a run.
  """

  def __init__(self, paths: Sequence[str],
               photometry: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None):
    """``photometry``: {APOGEE_ID: (values (7,), errors (7,))} (``labels.read_photometry_table``)
    for a network that reads it: every record then carries 'metadata' and 'metadata_err', NaN
    for a star without a row (the network's replacement values stand in)."""
    self.paths = tuple(str(p) for p in paths)
    self.photometry = photometry

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    record = self._read(i)
    if self.photometry is not None:
      missing = np.full(len(METADATA_COLUMNS), np.nan, np.float32)
      values, errors = self.photometry.get(record['apogee_id'], (missing, missing))
      record.update(metadata=values, metadata_err=errors)
    return record

  def _read(self, i: int) -> dict[str, Any]:
    path = self.paths[i]
    try:
      s = apstar.read_apstar(path)
    except apstar.ApStarError as e:
      return {'flux': np.zeros(N_PIXELS, np.float32),
              'flux_err': np.full(N_PIXELS, np.inf, np.float32),
              'apogee_id': apstar.apogee_id_from_filename(path) or '', 'file': path,
              'problem': str(e)}
    return {'flux': s.flux, 'flux_err': s.flux_err, 'apogee_id': s.apogee_id, 'snr': s.snr,
            'ra': s.ra, 'dec': s.dec, 'file': path}


# ------------------------------------------------------------------------------------------------
# One record → one example.


def _as_str(x: Any) -> str:
  if isinstance(x, bytes):
    return x.decode('utf-8')
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return _as_str(x.item())
  return str(x)


def _data_type_index(x: Any) -> int:
  """A ClassLabel int or a data-type name → index into DATA_TYPES."""
  if isinstance(x, np.ndarray) and x.ndim == 0:
    x = x.item()
  if isinstance(x, bytes | str):
    name = _as_str(x)
    if name not in DATA_TYPES:
      raise InputPipelineError(f'unknown data_type {name!r} (expected one of {DATA_TYPES})')
    return DATA_TYPES.index(name)
  index = int(x)
  if not 0 <= index < len(DATA_TYPES):
    raise InputPipelineError(f'data_type index {index} out of range for {DATA_TYPES}')
  return index


def _labels(record: Mapping[str, Any]) -> np.ndarray:
  if 'labels' not in record:  # Unlabelled (inference): NaN, ignored by every metric.
    return np.full(len(LABEL_NAMES), np.nan, np.float32)
  labels = np.asarray(record['labels'], np.float32).reshape(-1)
  if labels.shape != (len(LABEL_NAMES),):
    raise InputPipelineError(f'labels of shape {labels.shape}, expected ({len(LABEL_NAMES)},)')
  return labels


def decode_example(record: Mapping[str, Any]) -> dict[str, Any]:
  """One source record → the example dict (flux/error NOT yet preprocessed; batches do that)."""
  flux = np.asarray(record['flux'])
  if flux.shape[-1] != N_PIXELS:
    raise InputPipelineError(f'flux of shape {flux.shape}, expected ({N_PIXELS},)')
  err = record.get('flux_err', record.get('error'))
  example = {
      'flux': flux,
      'flux_err': np.full_like(flux, np.inf) if err is None else np.asarray(err),
      'labels': _labels(record),
      'data_type': (_data_type_index(record['data_type']) if 'data_type' in record
                    else UNLABELLED),
      'apogee_id': _as_str(record.get('apogee_id', '')),
      'file': _as_str(record.get('file', '')),
      'problem': _as_str(record.get('problem', '')),
  }
  for key, dtype in _SCALAR_KEYS.items():
    example[key] = dtype(record.get(key, np.nan))
  for key in METADATA_KEYS:
    if key in record:
      example[key] = np.asarray(record[key], np.float32)
  return example


def collate(examples: Sequence[Mapping[str, Any]], mask: np.ndarray | None = None
            ) -> dict[str, np.ndarray]:
  """Stacks decoded examples into a batch and applies THE flux preprocessing once per batch."""
  flux, flux_err = preprocess(np.stack([e['flux'] for e in examples]),
                              np.stack([e['flux_err'] for e in examples]))
  batch = {
      'flux': flux,
      'flux_err': flux_err,
      'labels': np.stack([e['labels'] for e in examples]).astype(np.float32),
      'data_type': np.asarray([e['data_type'] for e in examples], np.int32),
      'apogee_id': np.asarray([e['apogee_id'] for e in examples], dtype=str),
      'file': np.asarray([e.get('file', '') for e in examples], dtype=str),
  }
  for key, dtype in _SCALAR_KEYS.items():
    batch[key] = np.asarray([e[key] for e in examples], dtype)
  for key in METADATA_KEYS:
    if all(key in e for e in examples):
      batch[key] = np.stack([e[key] for e in examples])
  batch['mask'] = np.ones(len(examples), bool) if mask is None else np.asarray(mask, bool)
  return batch


# ------------------------------------------------------------------------------------------------
# Index bookkeeping (cheap: no flux is read).


def epoch_permutation(indices: np.ndarray, *, seed: int, epoch: int, shard_index: int = 0,
                      shard_count: int = 1) -> np.ndarray:
  """This process's share of a fresh shuffle of ``indices`` for ``epoch``.

  Every process draws the same permutation (same seed and epoch), trims it to a multiple of
  ``shard_count`` so all processes see equally many examples (else collectives would hang), and
  takes every ``shard_count``-th element starting at ``shard_index``.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, {shard_count})')
  rng = np.random.default_rng([int(seed), int(epoch)])
  perm = rng.permutation(np.asarray(indices, np.int64))
  perm = perm[:len(perm) // shard_count * shard_count]
  return perm[shard_index::shard_count]


def shard_range(num_examples: int, batch_size: int, shard_index: int, shard_count: int
                ) -> tuple[int, int]:
  """[start, stop) of shard ``shard_index`` of ``shard_count``: contiguous whole batches.

  Boundaries fall on multiples of ``batch_size``, so every shard's batches are batches of the
  one-shard run (same rows, same places): a sharded prediction is bit-identical to one run.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, {shard_count})')
  n_batches = -(-num_examples // batch_size)
  bounds = [min(num_examples, (k * n_batches // shard_count) * batch_size)
            for k in (shard_index, shard_index + 1)]
  return bounds[0], bounds[1]


def num_train_batches(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
  """Batches per epoch per process (drop_remainder), given the per-process batch size."""
  return (num_examples // shard_count) // batch_size


def epoch_batch_indices(indices: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                        shard_index: int = 0, shard_count: int = 1, start_batch: int = 0
                        ) -> np.ndarray:
  """(batches, batch_size) source indices of this process's batches ``start_batch`` … of ``epoch``.

  The one definition of an epoch's batches: the streamed and the in-memory paths both read it,
  so they see the same batches in the same order (drop_remainder).
  """
  perm = epoch_permutation(indices, seed=seed, epoch=epoch, shard_index=shard_index,
                           shard_count=shard_count)
  n_batches = len(perm) // batch_size
  return perm[:n_batches * batch_size].reshape(n_batches, batch_size)[start_batch:]


def read_all(source: Sequence[Mapping[str, Any]], *, num_threads: int = 8
             ) -> Iterator[tuple[int, dict[str, Any]]]:
  """(index, decoded example) for every record of ``source`` once, in no particular order."""
  ds = grain.MapDataset.source(np.arange(len(source))).map(
      lambda i: (int(i), decode_example(source[int(i)])))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads),
                                                   prefetch_buffer_size=64)))


def read_metadata(source: Sequence[Mapping[str, Any]], *, num_threads: int = 8,
                  visit: Callable[[int, dict[str, Any]], None] | None = None
                  ) -> dict[str, np.ndarray]:
  """Labels (n, 3), data_type (n,) and apogee_id (n,) of a whole split, in source order, and
  'vectors': the ``METADATA_KEYS`` the records carry ({'metadata': (n, 7), …}; empty when none).

  Used to fit the Standardizer, a family's input statistics and the adaptation subsets. Reads
  every record once;
  ``visit(index, example)`` sees each decoded example on the way (``memory_data`` keeps the flux
  from this same pass).
  """
  n = len(source)
  labels = np.zeros((n, len(LABEL_NAMES)), np.float32)
  data_type = np.zeros(n, np.int32)
  ids = []
  vectors: dict[str, np.ndarray] = {}
  for i, ex in read_all(source, num_threads=num_threads):
    if visit is not None:
      visit(i, ex)
    labels[i] = ex['labels']
    data_type[i] = ex['data_type']
    ids.append((i, ex['apogee_id']))
    for key in METADATA_KEYS:
      if key in ex:
        if key not in vectors:
          vectors[key] = np.full((n, *np.shape(ex[key])), np.nan, np.float32)
        vectors[key][i] = ex[key]
  apogee_id = np.empty(n, dtype=object)
  for i, a in ids:
    apogee_id[i] = a
  return {'labels': labels, 'data_type': data_type, 'apogee_id': apogee_id.astype(str),
          'vectors': vectors}


def median_flux(source: Sequence[Mapping[str, Any]], *, num_samples: int = 512) -> float:
  """The median positive flux of up to ``num_samples`` evenly spaced spectra of ``source``.

  One robust number for the flux level of a training set (the model's ``input_scale``): bad
  pixels (flux 0) are left out. Deterministic, so a resumed run gets the same value.
  """
  n = len(source)
  if n == 0:
    raise InputPipelineError('cannot take the median flux of an empty split')
  idx = np.unique(np.linspace(0, n - 1, min(n, num_samples)).round().astype(np.int64))
  flux = preprocess_flux(np.stack([np.asarray(source[int(i)]['flux']) for i in idx]))
  good = flux[flux > 0]
  if good.size == 0:
    raise InputPipelineError(f'no positive flux in {len(idx)} sampled spectra of the split')
  return float(np.median(good))


# ------------------------------------------------------------------------------------------------
# Batch iterators.


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(1, prefetch))


def train_batches(source: Sequence[Mapping[str, Any]], batch_size: int, *, seed: int, epoch: int,
                  indices: np.ndarray | None = None, shard_index: int = 0, shard_count: int = 1,
                  start_batch: int = 0, num_threads: int = 4, prefetch_batches: int = 2
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Shuffled training batches of this process for one epoch (drop_remainder).

  Args:
    source: random-access source (``open_split`` or any sequence of feature dicts).
    batch_size: PER-PROCESS batch size (global batch / process count).
    seed, epoch: the shuffle is a pure function of both, so a resumed run sees the same order.
    indices: restrict to these source indices (adaptation subsets); default all.
    shard_index, shard_count: this process and the process count (``jax.process_index/count``).
    start_batch: skip this many batches of the epoch (resuming mid-epoch) without reading them.
    num_threads: grain reader threads; prefetch_batches: batches prepared ahead in a background
      thread.
  """
  if indices is None:
    indices = np.arange(len(source))
  perm = epoch_batch_indices(indices, batch_size, seed=seed, epoch=epoch,
                             shard_index=shard_index, shard_count=shard_count,
                             start_batch=start_batch).reshape(-1)
  if len(perm) == 0:
    return iter(())
  ds = grain.MapDataset.source(perm).map(lambda i: decode_example(source[int(i)]))
  ds = ds.to_iter_dataset(_read_options(num_threads, batch_size * max(1, prefetch_batches)))
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=collate)
  if prefetch_batches > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return iter(ds)


def eval_batches(source: Sequence[Mapping[str, Any]], batch_size: int, *,
                 indices: np.ndarray | None = None, num_batches: int | None = None,
                 num_threads: int = 4, prefetch_batches: int = 2
                 ) -> Iterator[dict[str, np.ndarray]]:
  """In-order batches of a fixed size; the last one is padded and padded rows have mask False.

  Fixed shapes mean the jitted eval step compiles once. ``num_batches`` pads further with
  all-False batches (multi-process evaluation needs the same batch count on every process).
  Batches also carry 'index' (source position of each row) and 'problem' (why a row of an
  ``ApStarFiles`` source could not be read, or why its spectrum fails the build's rules,
  ``apstar.spectrum_problem``: that row is masked and reported, '' on every other row).
  """
  if indices is None:
    indices = np.arange(len(source))
  indices = np.asarray(indices, np.int64)
  n_needed = -(-len(indices) // batch_size)
  if num_batches is None:
    num_batches = n_needed
  elif num_batches < n_needed:
    raise ValueError(f'num_batches {num_batches} < {n_needed} needed for {len(indices)} examples')
  if num_batches == 0:
    return iter(())
  if len(indices) == 0:
    raise InputPipelineError('cannot pad an empty index set (no example to copy shapes from)')
  total = num_batches * batch_size
  # Pad by repeating the first example: same shapes and dtypes, masked out of every metric.
  padded = np.concatenate([indices, np.full(total - len(indices), indices[0], np.int64)])
  valid = np.arange(total) < len(indices)
  ds = grain.MapDataset.source(np.arange(total)).map(
      lambda j: (decode_example(source[int(padded[j])]), bool(valid[j]), int(padded[j])))
  ds = ds.to_iter_dataset(_read_options(num_threads, batch_size * max(1, prefetch_batches)))
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_collate_eval)
  if prefetch_batches > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return iter(ds)


def _spectrum_problem(example: Mapping[str, Any]) -> str:
  """The build's rules for a spectrum (``apstar.spectrum_problem``), applied at inference too:
  '' or why the star gets no prediction."""
  problem = apstar.spectrum_problem(example['flux'], example['flux_err'])
  return f'{example["file"] or example["apogee_id"]}: {problem}' if problem else ''


def _collate_eval(items: Sequence[tuple[dict[str, Any], bool, int]]) -> dict[str, np.ndarray]:
  examples = [e for e, _, _ in items]
  valid = np.asarray([m for _, m, _ in items], bool)
  # Padding copies a real row: its problem, if any, is reported once, on the real row.
  problem = np.where(valid, np.asarray([e['problem'] or _spectrum_problem(e) for e in examples],
                                        dtype=str), '')
  batch = collate(examples, valid & (problem == ''))
  batch['index'] = np.asarray([i for _, _, i in items], np.int64)
  batch['problem'] = problem
  return batch
