"""Prediction with uncertainties: spectra streamed batch by batch through the jitted Monte Carlo
(or first-order) function of ``uncertainty`` → per-star arrays in native units (§3.5).

``uncertainty.MCSettings`` says how the σ_noise is made; ``predict_batches`` runs one stream of batches;
``predict_inputs`` runs this shard (``Shard``) of every input (splits of the built data set,
apStar files). Device memory is bounded by the batch and draw chunk, host memory by a few numbers
per star. Star i of a stream draws its noise from ``fold_in(fold_in(PRNGKey(seed), stream), i)``
with i its position in the input, so results depend neither on the batch size nor on the shard.
"""

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from apogeenet_jax import checkpoint, input_pipeline, models, uncertainty
from apogeenet_jax.constants import LABEL_NAMES, SPLITS
from apogeenet_jax.labels import SKIP_REPORT_COLUMNS
from apogeenet_jax.normalization import Standardizer
from apogeenet_jax.sharding import DATA_AXIS, make_mesh
from apogeenet_jax.uncertainty import MCSettings

DEFAULT_BATCH_SIZE = 16


# Noise streams: split s uses SPLITS.index(s), apStar files the next one. Star 0 of dev and of
# test get different noise, and a split's result does not depend on which others run with it.
APSTAR_STREAM = len(SPLITS)


class EvaluationError(RuntimeError):
  """Evaluation cannot run: bad arguments, no checkpoint, no spectra, parts that do not fit."""


@dataclasses.dataclass(frozen=True)
class Shard:
  """Shard ``index`` of ``count``: contiguous whole batches of every input (module docstring)."""
  index: int = 0
  count: int = 1

  def __post_init__(self):
    if not 0 <= self.index < self.count:
      raise EvaluationError(f'--shard_index must be in [0, --num_shards={self.count}), '
                            f'got {self.index}')


def process_shard() -> Shard:
  """This process's shard under ``jax.distributed`` (the whole input on one process)."""
  return Shard(jax.process_index(), jax.process_count())


def split_batches(data_dir: str | epath.PathLike, split: str, batch_size: int):
  """(in-order batches, number of stars) of one split of the built data set (benchmarks)."""
  source = input_pipeline.open_split(data_dir, split)
  return input_pipeline.eval_batches(source, batch_size), len(source)


def input_sources(splits: Sequence[str], data_dir, apstar_files: Sequence[str]):
  """(name, noise stream, random-access source) of every input, in catalogue order."""
  for split in splits:
    if split not in SPLITS:
      raise EvaluationError(f'--split {split!r} is not one of {SPLITS}')
    yield split, SPLITS.index(split), input_pipeline.open_split(data_dir, split)
  if apstar_files:
    yield '', APSTAR_STREAM, input_pipeline.ApStarFiles(apstar_files)


def predict_batches(params: Any, model, standardizer: Standardizer,
                    batches: Iterable[Mapping[str, np.ndarray]],
                    settings: MCSettings = MCSettings(), *, total: int | None = None,
                    stream: int = 0, desc: str = 'stars', devices: Sequence[Any] | None = None,
                    ensemble_size: int = 1) -> dict[str, np.ndarray]:
  """Streams batches through the function of ``settings``; returns per-star arrays.

  Returns a dict with 'pred' (n, 3) native units, the raw σ (n, 3) native units
  'pred_err_noise' (MC or linear spread, averaged over members; NaN when mc == 0),
  'pred_err_model' (spread of the members' means; NaN for one network) and 'pred_err' (their
  quadrature sum, σ_model counted 0 for one network), 'pred_z', 'labels', 'data_type',
  'apogee_id', 'snr', 'ra', 'dec', 'file' of the valid rows, and 'problems' (m, 3) str: file,
  apogee_id, reason of the rows that could not be read (``input_pipeline.ApStarFiles``).
  ``ensemble_size`` K > 1: ``params`` carry a leading member axis (``uncertainty``).
  Star i draws its noise from ``fold_in(fold_in(PRNGKey(seed), stream), i)``, i the batch's
  'index' (position in the source; without one, the count of valid rows before it), so results
  depend neither on the batch size nor on the shard; ``stream`` separates the noise of different
  inputs (splits, apStar files) under one seed.
  With several ``devices`` (default: all local ones) each batch is split over them (data
  parallel, params replicated) whenever the batch size is a multiple of their number.
  """
  fn = settings.make_fn(uncertainty.model_apply_fn(model), ensemble_size)
  input_shapes = models.family_of(model).input_shapes(model)
  key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), stream)
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = make_mesh(devices=devices)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  shardings = (NamedSharding(mesh, P(DATA_AXIS)), NamedSharding(mesh, P()))
  keep = {k: [] for k in (*_ROW_FIELDS, 'problems')}
  outputs = []
  start = 0
  pending = None  # one batch in flight: the host prepares batch k+1 while the device runs k
  with tqdm(total=total, desc=desc, unit='star', mininterval=2.0) as bar:
    for batch in batches:
      valid = np.asarray(batch['mask'], bool)
      inputs = _model_inputs(batch, input_shapes)
      scale = settings.noise_scale(batch, tuple(input_shapes))
      index = (np.asarray(batch['index']) if 'index' in batch
               else np.arange(start, start + len(valid))).astype(np.uint32)
      # Rows split over the devices when they divide evenly; otherwise all rows on every device.
      where = shardings[0] if len(valid) % len(devices) == 0 else shardings[1]
      out = fn(params, *jax.device_put((inputs, scale, index), where), key)
      if pending is not None:
        outputs.append(_fetch(pending))
      pending = (out, valid)
      _keep_rows(keep, batch, valid)
      start += int(valid.sum())
      bar.update(int(valid.sum()))
    if pending is not None:
      outputs.append(_fetch(pending))
  return _per_star(keep, outputs, standardizer)


def _model_inputs(batch: Mapping[str, np.ndarray], input_shapes: Mapping[str, tuple[int, ...]]
                  ) -> dict[str, np.ndarray]:
  """The model's named inputs of a host batch, float32, each checked against its shape."""
  inputs = {}
  for name, shape in input_shapes.items():
    if name not in batch:
      raise EvaluationError(f'the batches carry no {name!r}, an input of the model')
    value = np.asarray(batch[name], np.float32)
    if value.shape[1:] != tuple(shape):
      raise EvaluationError(f'{name} batch of shape {value.shape}, expected (B, '
                            f'{", ".join(map(str, shape))})')
    inputs[name] = value
  return inputs


# Per-star fields that travel from the batches to the catalogue unchanged, and those predicted.
_ROW_FIELDS = ('labels', 'data_type', 'apogee_id', 'snr', 'ra', 'dec', 'file')
_PREDICTED = ('pred', 'pred_err_noise', 'pred_err_model', 'pred_err', 'pred_z')
_EMPTY = {'labels': np.zeros((0, len(LABEL_NAMES)), np.float32), 'data_type': np.zeros(0, np.int32),
          'apogee_id': np.zeros(0, str), 'file': np.zeros(0, str), 'snr': np.zeros(0, np.float32),
          'ra': np.zeros(0, np.float64), 'dec': np.zeros(0, np.float64),
          'problems': np.zeros((0, len(SKIP_REPORT_COLUMNS)), str)}


def _keep_rows(keep: dict[str, list], batch: Mapping[str, np.ndarray], valid: np.ndarray):
  for k in _ROW_FIELDS:
    column = batch[k] if k in batch else np.full(len(valid), '')  # 'file' is optional
    keep[k].append(np.asarray(column)[valid])
  problem = np.asarray(batch.get('problem', np.full(len(valid), '')), str)
  bad = problem != ''
  for row in np.flatnonzero(bad):
    logging.warning('Skipping %s', problem[row])
  if bad.any():
    keep['problems'].append(np.stack([np.asarray(batch['file'])[bad],
                                      np.asarray(batch['apogee_id'])[bad], problem[bad]], 1))


def _fetch(pending) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean_z, noise_z, model_z) of the valid rows of one batch's device output."""
  out, valid = pending
  mean_z = np.asarray(out[0])[valid]
  model_z = np.asarray(out[2])[valid] if len(out) > 2 else np.full_like(mean_z, np.nan)
  return mean_z, np.asarray(out[1])[valid], model_z


def _per_star(keep: Mapping[str, list], outputs: Sequence[tuple[np.ndarray, ...]],
              standardizer: Standardizer) -> dict[str, np.ndarray]:
  result = {k: (np.concatenate(v) if v else _EMPTY[k]) for k, v in keep.items()}
  if outputs:
    mean_z, noise_z, model_z = (np.concatenate(parts) for parts in zip(*outputs, strict=True))
  else:
    mean_z = noise_z = model_z = np.zeros((0, len(LABEL_NAMES)), np.float32)
  # Catalogue units (Teff in K) whatever the family's label space; a log10 label's spread
  # through the exponent at the prediction (``Standardizer.inverse_sigma``).
  result['pred'] = standardizer.inverse(mean_z)
  result['pred_err_noise'] = standardizer.inverse_sigma(mean_z, noise_z)
  result['pred_err_model'] = standardizer.inverse_sigma(mean_z, model_z)
  result['pred_err'] = np.sqrt(result['pred_err_noise'] ** 2
                               + np.nan_to_num(result['pred_err_model']) ** 2)
  result['pred_z'] = mean_z.astype(np.float64)
  return result


def even_batch_size(batch_size: int) -> int:
  """Whole batches split evenly over the local devices (results do not change)."""
  n_dev = jax.local_device_count()
  return batch_size + (n_dev - batch_size % n_dev) % n_dev


def predict_inputs(params: Any, meta: Mapping[str, Any], settings: MCSettings,
                    batch_size: int, sources, shard: Shard) -> dict[str, np.ndarray]:
  """Per-star arrays (``predict_batches``) of this shard of every source, plus 'data_set'."""
  model = checkpoint.model_from_meta(meta)
  standardizer = checkpoint.standardizer_from_meta(meta)
  parts = []
  for name, stream, source in sources:
    lo, hi = input_pipeline.shard_range(len(source), batch_size, shard.index, shard.count)
    logging.info('Predicting stars %d–%d of %d of %s (σ: %s, mc=%d, error_cap=%s).', lo, hi,
                 len(source), name or 'the apStar files', settings.sigma, settings.mc,
                 settings.error_cap)
    part = predict_batches(
        params, model, standardizer,
        input_pipeline.eval_batches(source, batch_size, indices=np.arange(lo, hi)), settings,
        total=hi - lo, desc=name or 'apStar', stream=stream,
        ensemble_size=checkpoint.ensemble_size(meta))
    part['data_set'] = np.full(len(part['pred']), name)
    parts.append(part)
  if not parts:  # Only files left out before reading: no star, and skipped.csv says why.
    return {**_EMPTY, **{k: np.zeros((0, len(LABEL_NAMES))) for k in _PREDICTED},
            'data_set': np.zeros(0, str)}
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
