"""The training inputs: which mode a run uses (streamed from the records, held in host memory, or
resident on the devices), reading the splits once, and each epoch's (xs, k) pairs for
``steps.make_train_steps`` — k ≤ ``steps_per_call`` global batches per call, standardised
(§3.1) and sharded over the 'data' axis.
"""

import functools
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from apogeenet_jax import input_pipeline, memory_data, uncertainty
from apogeenet_jax.constants import N_PIXELS
from apogeenet_jax.normalization import Standardizer
from apogeenet_jax.sharding import (
    DATA_AXIS,
    INPUTS_KEY,
    NOISE_KEY,
    device_keys,
    replicate,
    shard_batch,
)
from apogeenet_jax.train_state import TrainingError


def model_batch(batch: Mapping[str, Any], input_names: Sequence[str],
                standardizer: Standardizer) -> dict[str, Any]:
  """A host batch of record features → the layout of the steps: the model's named inputs under
  'inputs' (``models.Family.inputs``), their noise scales under 'noise' when the batch holds
  them, standardised 'targets' (z = (x − μ)/σ, §3.1), 'data_type' and a 'mask'."""
  missing = [name for name in input_names if name not in batch]
  if missing:
    raise TrainingError(f'the batches lack the model\'s inputs {missing} (they hold '
                        f'{sorted(k for k in batch if not k.startswith("_"))})')
  out = {INPUTS_KEY: {name: batch[name] for name in input_names},
         'targets': standardizer.transform(batch['labels']),
         'data_type': batch['data_type'],
         'mask': batch['mask'] if 'mask' in batch else np.ones(np.shape(batch['labels'])[:-1], bool)}
  if NOISE_KEY in batch:
    out[NOISE_KEY] = dict(batch[NOISE_KEY])
  return out


def device_batch(batch: Mapping[str, Any], input_names: Sequence[str],
                 standardizer: Standardizer, mesh: Mesh) -> dict[str, Any]:
  """``model_batch``, sharded to the mesh."""
  return shard_batch(model_batch(batch, input_names, standardizer), mesh)


def put_chunk(chunk: Mapping[str, Any], input_names: Sequence[str], standardizer: Standardizer,
              mesh: Mesh) -> dict[str, Any]:
  """k stacked host batches (k, B_local, …) → ``model_batch``, sharded over 'data' on axis 1."""
  chunk = model_batch(chunk, input_names, standardizer)
  sharding = NamedSharding(mesh, P(None, DATA_AXIS))
  return {k: jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), chunk[k])
          for k in device_keys(chunk)}


def _flux_blocks(num_spectra: int, mesh: Mesh) -> tuple[tuple[int, int], NamedSharding]:
  """Global flux shape of a resident split (rows padded to a multiple of the device count) and
  its sharding: device i of the mesh holds rows [i·block, (i+1)·block)."""
  n_dev = mesh.shape[DATA_AXIS]
  return (-(-num_spectra // n_dev) * n_dev, N_PIXELS), NamedSharding(mesh, P(DATA_AXIS))


def resident_rows(num_spectra: int, mesh: Mesh) -> np.ndarray:
  """The split rows whose flux this process's devices hold: all it needs to load."""
  shape, sharding = _flux_blocks(num_spectra, mesh)
  rows = [np.arange(idx[0].start or 0, min(idx[0].stop or shape[0], num_spectra))
          for idx in sharding.addressable_devices_indices_map(shape).values()]
  return np.unique(np.concatenate(rows))


def place_split(arrays: memory_data.SplitArrays, standardizer: Standardizer, mesh: Mesh,
                input_names: Sequence[str] = ('flux',)) -> dict[str, Any]:
  """A split in memory → device-resident arrays (``sharding.resident_specs``): the model's
  inputs ``input_names`` (the flux in its storage dtype, small vectors such as 'metadata' in
  float32) and the flux's noise scale, when held, one block of rows per device; standardised
  targets (n, 3) and data types on every device."""
  missing = [k for k in input_names if k != 'flux' and k not in arrays.vectors]
  if missing:
    raise TrainingError(f'the split in memory holds no {missing}, inputs of the model')
  shape, sharding = _flux_blocks(len(arrays), mesh)
  n = len(arrays)

  def blocks_of(held_rows: np.ndarray, every_row: bool = False):
    full = (shape[0], *held_rows.shape[1:])

    def block(index):
      start, stop = index[0].start or 0, index[0].stop or shape[0]
      held = np.arange(start, min(stop, n))
      first = 0 if every_row else (arrays.positions(held[:1])[0] if len(held) else 0)
      # A view: rows are held in ascending order (every row, for the small vectors).
      rows = held_rows[start:start + len(held)] if every_row else held_rows[first:first + len(held)]
      if len(held) == stop - start:
        return rows
      pad = np.zeros((stop - start - len(held), *held_rows.shape[1:]), rows.dtype)
      return np.concatenate([rows, pad])
    return jax.make_array_from_callback(full, sharding, block)

  blocked = {INPUTS_KEY: {k: (blocks_of(arrays.flux) if k == 'flux'
                              else blocks_of(arrays.vectors[k], every_row=True))
                          for k in input_names}}
  if arrays.noise is not None:
    blocked[NOISE_KEY] = {'flux': blocks_of(arrays.noise)}
  return {**blocked,
          **replicate({'targets': standardizer.transform(arrays.labels),
                       'data_type': np.asarray(arrays.data_type, np.int32)}, mesh)}


def stream_inputs(batches: Iterable[Mapping[str, np.ndarray]], input_names: Sequence[str],
                  standardizer: Standardizer, mesh: Mesh, steps_per_call: int = 1,
                  noise: bool = False) -> Iterator[tuple[dict, int]]:
  """Host batches (``input_pipeline.train_batches``) stacked k at a time and sharded; with
  ``noise``, each batch's MC noise scale of the flux (``training_noise_scale`` of its errors)
  goes along."""
  batches = iter(batches)
  keys = (*input_names, 'labels', 'data_type', 'mask')
  while chunk := list(itertools.islice(batches, steps_per_call)):
    stacked = {k: np.stack([b[k] for b in chunk]) for k in keys if k in chunk[0]}
    if noise:
      stacked[NOISE_KEY] = {'flux': np.stack([training_noise_scale(b['flux_err']) for b in chunk])}
    yield put_chunk(stacked, input_names, standardizer, mesh), len(chunk)


def training_noise_scale(flux_err: np.ndarray) -> np.ndarray:
  """The per-pixel noise scale of noise augmentation: the Monte Carlo's (the authors' median
  cap, no noise on BAD_PIXEL_ERROR pixels), so training noise is drawn like the MC draws."""
  return uncertainty.prepare_errors(flux_err, 'median')


def memory_inputs(arrays: memory_data.SplitArrays, batch_indices: np.ndarray,
                  input_names: Sequence[str], standardizer: Standardizer, mesh: Mesh,
                  steps_per_call: int = 1) -> Iterator[tuple[dict, int]]:
  """k batches at a time gathered from host memory; ``batch_indices`` (batches, B_local)."""
  for start in range(0, len(batch_indices), steps_per_call):
    rows = batch_indices[start:start + steps_per_call]
    yield put_chunk(arrays.gather(rows), input_names, standardizer, mesh), len(rows)


def resident_inputs(split: Mapping[str, jax.Array], batch_indices: np.ndarray, mesh: Mesh,
                    steps_per_call: int = 1) -> Iterator[tuple[tuple, int]]:
  """k global batches of row indices at a time; the flux never leaves the devices.
  ``batch_indices`` (batches, B_global) from ``global_batch_indices``."""
  for start in range(0, len(batch_indices), steps_per_call):
    rows = np.asarray(batch_indices[start:start + steps_per_call], np.int32)
    yield (split, replicate(rows, mesh)), len(rows)


def global_batch_indices(indices: np.ndarray, local_batch: int, *, seed: int, epoch: int,
                         mesh: Mesh, start_batch: int = 0) -> np.ndarray:
  """(batches, B_global) rows of the global batches: each process's stream batch side by side in
  the mesh's process order, which is how ``shard_batch`` assembles the streamed batches."""
  processes = list(dict.fromkeys(d.process_index for d in mesh.devices.flat))
  return np.concatenate([
      input_pipeline.epoch_batch_indices(indices, local_batch, seed=seed, epoch=epoch,
                                         shard_index=p, shard_count=len(processes),
                                         start_batch=start_batch)
      for p in processes], axis=1)


def open_sources(config: ml_collections.ConfigDict, sources: Mapping[str, Sequence] | None
             ) -> tuple[Sequence, Sequence]:
  if sources is not None:
    return sources['train'], sources['dev']
  if not config.data_dir:
    raise TrainingError('config.data_dir is empty: point it at a built tfds data dir')
  return (input_pipeline.open_split(config.data_dir, 'train', config.dataset_name),
          input_pipeline.open_split(config.data_dir, 'dev', config.dataset_name))


def resolve_input_scale(config: ml_collections.ConfigDict, train_source: Sequence) -> float:
  """``config.model.input_scale`` if > 0; else 1.0 when each spectrum is scaled by its own level
  (``config.model.flux_scaling``), or the median flux of the training set (a fixed sample, so a
  resumed run computes the same value)."""
  scale = float(config.model.get('input_scale', 1.0))
  if scale > 0:
    return scale
  if config.model.get('flux_scaling', 'none') != 'none':
    return 1.0
  scale = input_pipeline.median_flux(train_source)
  logging.info('Input scale: median training flux %.6g (1e-17 erg/s/cm²/Å).', scale)
  return scale


def _device_budget_bytes(config: ml_collections.ConfigDict) -> float:
  """config.device_memory_budget_gb, or half of what the device reports (the rest is for the
  model, its activations and XLA); a device that reports nothing (CPU) gets the host budget."""
  if config.device_memory_budget_gb:
    return config.device_memory_budget_gb * 1e9
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return 0.5 * stats['bytes_limit']
  return config.memory_budget_gb * 1e9


def choose_input(config: ml_collections.ConfigDict, num_train: int, num_dev: int, mesh: Mesh
                 ) -> tuple[str, bool]:
  """('memory' or 'stream', whether the training split sits on the devices) for this run.

  ``input_mode='auto'`` takes memory when the process's share of train + dev fits
  ``memory_budget_gb``; ``data_on_device='auto'`` puts the training flux on the devices when each
  device's block fits the device budget. Across processes, memory mode needs the device-resident
  layout (a process holds only its devices' rows, but its stream batches draw from every row).
  """
  mode = config.input_mode
  if mode not in ('auto', 'memory', 'stream'):
    raise TrainingError(f"config.input_mode must be 'auto', 'memory' or 'stream', got {mode!r}")
  on_device_option = str(config.data_on_device).lower()
  if on_device_option not in ('auto', 'true', 'false'):
    raise TrainingError(f"config.data_on_device must be 'auto', 'true' or 'false', got "
                        f'{config.data_on_device!r}')
  if config.steps_per_call < 1:
    raise TrainingError(f'config.steps_per_call must be ≥ 1, got {config.steps_per_call}')
  with_noise = noise_augmentation(config) > 0
  try:
    per_spectrum = memory_data.bytes_per_spectrum(config.memory_dtype)
    per_train_spectrum = memory_data.bytes_per_spectrum(config.memory_dtype, noise=with_noise)
  except ValueError as e:
    raise TrainingError(f'config.memory_dtype: {e}') from e
  if mode == 'stream':
    return 'stream', False
  processes = jax.process_count()
  host_bytes = (num_train * per_train_spectrum + num_dev * per_spectrum) / processes
  if host_bytes > config.memory_budget_gb * 1e9:
    if mode == 'auto':
      logging.info('Streaming: the splits need %.1f GB, over memory_budget_gb=%g.',
                   host_bytes / 1e9, config.memory_budget_gb)
      return 'stream', False
    logging.warning('input_mode=memory: %.1f GB per process, over memory_budget_gb=%g.',
                    host_bytes / 1e9, config.memory_budget_gb)
  device_bytes = (-(-num_train // mesh.devices.size) *
                  memory_data.row_bytes(config.memory_dtype, noise=with_noise) + num_train * 16)
  on_device = (on_device_option == 'true' or
               (on_device_option == 'auto' and device_bytes <= _device_budget_bytes(config)))
  if processes > 1 and not on_device:
    if mode == 'memory':
      raise TrainingError('input_mode=memory across processes needs the training split on the '
                          f'devices ({device_bytes / 1e9:.1f} GB per device): raise '
                          'device_memory_budget_gb, set data_on_device=true, or stream')
    return 'stream', False
  logging.info('Input: memory (%s), training flux %s (%.2f GB per device).', config.memory_dtype,
               'on the devices' if on_device else 'in host RAM', device_bytes / 1e9)
  return 'memory', on_device


def read_splits(config: ml_collections.ConfigDict, train_source: Sequence, dev_source: Sequence,
                 mesh: Mesh, *, memory: bool, on_device: bool, dev_indices: np.ndarray
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray], Any]:
  """(training data for ``epoch_inputs``, training metadata, dev split in memory or None).

  One pass over each split either way: the stream reads only the labels now; memory mode keeps
  the flux of the rows this process needs (its devices' blocks, or all) and its dev shard.
  """
  if not memory:
    logging.info('Reading labels of %d training spectra …', len(train_source))
    meta = input_pipeline.read_metadata(train_source, num_threads=config.num_threads)
    return {'source': train_source}, meta, None
  logging.info('Loading %d training and %d dev spectra into memory …', len(train_source),
               len(dev_source))
  load = functools.partial(memory_data.load_split, dtype=config.memory_dtype,
                           num_threads=config.num_threads)
  where = f' of {config.data_dir}' if config.data_dir else ''
  arrays = load(train_source, name=f'train split{where}',
                rows=resident_rows(len(train_source), mesh) if on_device else None,
                noise_scale=training_noise_scale if noise_augmentation(config) > 0 else None)
  return ({'arrays': arrays}, arrays.metadata(),
          load(dev_source, rows=dev_indices, name=f'dev split{where}'))


def epoch_inputs(config: ml_collections.ConfigDict, data: Mapping[str, Any],
                  standardizer: Standardizer, mesh: Mesh, *, input_names: Sequence[str],
                  local_batch: int, epoch: int, indices: np.ndarray, start_batch: int
                  ) -> Iterator[tuple[Any, int]]:
  """One epoch's (xs, k) from ``data``: {'source'} streamed, {'arrays'} in host memory or
  {'resident'} on the devices. All three yield the batches of ``epoch_batch_indices``."""
  k = config.steps_per_call
  if 'resident' in data:
    rows = global_batch_indices(indices, local_batch, seed=config.seed, epoch=epoch, mesh=mesh,
                                start_batch=start_batch)
    return resident_inputs(data['resident'], rows, mesh, k)
  shard = {'shard_index': jax.process_index(), 'shard_count': jax.process_count()}
  if 'arrays' in data:
    rows = input_pipeline.epoch_batch_indices(indices, local_batch, seed=config.seed, epoch=epoch,
                                              start_batch=start_batch, **shard)
    return memory_inputs(data['arrays'], rows, input_names, standardizer, mesh, k)
  batches = input_pipeline.train_batches(
      data['source'], local_batch, seed=config.seed, epoch=epoch, indices=indices,
      start_batch=start_batch, num_threads=config.num_threads,
      prefetch_batches=config.prefetch_batches, **shard)
  return stream_inputs(batches, input_names, standardizer, mesh, k,
                       noise=noise_augmentation(config) > 0)


def noise_augmentation(config: ml_collections.ConfigDict) -> float:
  """``config.noise_augmentation`` (0 when absent): the scale of the training noise, a finite
  number ≥ 0 (``steps.add_training_noise``)."""
  value = config.get('noise_augmentation', 0.0)
  try:
    value = float(value)
  except (TypeError, ValueError):
    value = float('nan')
  if not np.isfinite(value) or value < 0:
    raise TrainingError(f'config.noise_augmentation must be a finite number ≥ 0 (0: off, 1: noise '
                        f'drawn like the Monte Carlo draws), got {config.get("noise_augmentation")!r}')
  return value
