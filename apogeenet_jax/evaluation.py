"""Inference with Monte Carlo uncertainties → catalogue, metrics (Tables 2–3) and figures.

``evaluate(...)`` is what ``evaluate.py`` calls and what a notebook or test can call directly:
it streams spectra (splits of the built TFDS data set, or apStar files, both read through
``input_pipeline.eval_batches``) through the jitted MC function of ``uncertainty`` batch by batch —
device memory is bounded by the batch and draw chunk, host memory by a few numbers per star — and
writes into ``output_dir``:

  catalog.fits, catalog.csv   the catalogue (``catalog``), written atomically
  metrics.json                Table 2 (standardised MSE), Table 3 (scatter) and the coverage
                              of the σ (calibrated and raw), when labelled
  figures/*.png               ``figures``
  skipped.csv                 apStar files that could not be read, and why (apStar mode), in the
                              layout of the builder's report (``labels.write_problems``)

Survey scale (``Shard``): each input is cut into contiguous runs of whole batches, one per shard.
Star i of a stream draws its noise from ``fold_in(fold_in(PRNGKey(seed), stream), i)`` with i its
position in the input (split or file list), so a shard predicts its stars exactly as one run
would, provided every shard has the same number of local devices as that run (the per-device
batch then has the same shape: XLA's float32 rounding depends on it). Under ``jax.distributed``
each process predicts shard ``process_index`` on its own devices (no collective inside the
prediction), the parts go to process 0 through ``multihost_utils.process_allgather``, and process 0
writes the catalogue. Without it (``--shard_index/--num_shards`` on a batch scheduler) each run
writes its part file (``part-00001-of-00003.npz``) and ``merge`` writes the catalogue from the
parts. Either way the metrics are those of the whole catalogue, and the files are bit-identical
to a one-shard run.
"""

import dataclasses
import fnmatch
import hashlib
import io
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from apogeenet_jax import (
  apstar,
  calibration,
  catalog,
  checkpoint,
  figures,
  file_io,
  input_pipeline,
  uncertainty,
)
from apogeenet_jax.constants import DATA_TYPES, LABEL_NAMES, LABEL_UNITS, N_PIXELS, SPLITS
from apogeenet_jax.labels import SKIP_REPORT_COLUMNS, Problem, write_problems
from apogeenet_jax.normalization import Standardizer
from apogeenet_jax.sharding import DATA_AXIS, make_mesh

CATALOG_FITS = 'catalog.fits'
CATALOG_CSV = 'catalog.csv'
METRICS_JSON = 'metrics.json'
SKIPPED_CSV = 'skipped.csv'
FIGURES_DIR = 'figures'
PART_NAME = 'part-{index:05d}-of-{count:05d}.npz'
PART_GLOB = 'part-*-of-*.npz'
_PART_FORMAT = 1
DEFAULT_BATCH_SIZE = 16
DEFAULT_DRAW_CHUNK = 25
CALIBRATION_MODES = ('auto', 'none')  # auto: apply the checkpoint's calibration when it has one
CALIBRATION_SPLIT = 'dev'
# Noise streams: split s uses SPLITS.index(s), apStar files the next one. Star 0 of dev and of
# test get different noise, and a split's result does not depend on which others run with it.
APSTAR_STREAM = len(SPLITS)

# Table 2 (standardised MSE, train/dev/test: SPLITS order) and Table 3 (test scatter) of the
# paper, to print beside ours. 'Full' is every data type together.
PAPER_TABLE2 = {'Full': (0.044, 0.049, 0.063), 'MStar': (0.08, 0.098, 0.196),
                'YSO': (0.153, 0.168, 0.217)}
PAPER_TABLE3 = {'Full': (0.216, 183.74, 0.0914), 'MStar': (0.346, 273.7, 0.18),
                'YSO': (0.4, 490.99, 0.0879)}


class EvaluationError(RuntimeError):
  """Evaluation cannot run: bad arguments, no checkpoint, no spectra, parts that do not fit."""


@dataclasses.dataclass(frozen=True)
class MCSettings:
  """How the prediction and its σ_noise are made (§3.5); the same settings, the same numbers.

  mc: noisy draws per star (paper: 100); 0: the noiseless prediction, no σ.
  estimator: 'mc' (the draws) or 'linear' (first-order propagation of the same capped errors;
    ``mc`` then only says whether a σ is wanted).
  error_cap: 'median' (authors' code, draw 0 noiseless) or 'mean' (paper text).
  seed: PRNG seed of the draws. draw_chunk: draws evaluated together (device memory).
  linear_draws: 'linear' only: M ≥ 2 (default 2) = the noise-averaged Jacobian from M of the
    MC's draws; 0 = the Jacobian at the spectrum (delta method) (``uncertainty.make_linear_fn``).
  """
  mc: int = uncertainty.PAPER_NUM_DRAWS
  estimator: str = 'mc'
  error_cap: str = 'median'
  seed: int = 0
  draw_chunk: int = DEFAULT_DRAW_CHUNK
  linear_draws: int = uncertainty.DEFAULT_LINEAR_DRAWS

  def __post_init__(self):
    problems = [f'--{name} must be >= {least}, got {value}'
                for name, value, least in (('mc', self.mc, 0), ('draw_chunk', self.draw_chunk, 1))
                if value < least]
    if self.linear_draws == 1 or self.linear_draws < 0:
      problems.append(f'--linear_draws must be 0 or >= 2, got {self.linear_draws}')
    problems += [f'--{name} must be one of {choices}, got {value!r}'
                 for name, value, choices in (
                     ('uncertainty', self.estimator, uncertainty.ESTIMATORS),
                     ('error_cap', self.error_cap, uncertainty.ERROR_CAP_MODES))
                 if value not in choices]
    if problems:
      raise EvaluationError('; '.join(problems))

  @property
  def sigma(self) -> str:
    """What produced the σ columns: 'mc', 'linear' or 'none' (catalog.SIGMA_SOURCES)."""
    return 'none' if self.mc == 0 else self.estimator

  def make_fn(self, apply_fn, ensemble_size: int = 1):
    """The jitted ``fn(params, flux, noise_scale, star_index, key)`` of these settings."""
    if self.mc == 0:
      fn = uncertainty.make_predict_fn(apply_fn)
    elif self.estimator == 'linear':
      fn = uncertainty.make_linear_fn(apply_fn, num_draws=self.linear_draws)
    else:
      fn = uncertainty.make_mc_fn(apply_fn, num_draws=self.mc, draw_chunk=self.draw_chunk,
                                  noiseless_first=(self.error_cap == 'median'))
    return uncertainty.make_ensemble_fn(fn) if ensemble_size > 1 else fn


@dataclasses.dataclass(frozen=True)
class Shard:
  """Shard ``index`` of ``count``: contiguous whole batches of every input (module docstring)."""
  index: int = 0
  count: int = 1

  def __post_init__(self):
    if not 0 <= self.index < self.count:
      raise EvaluationError(f'--shard_index must be in [0, --num_shards={self.count}), '
                            f'got {self.index}')

  @property
  def path_name(self) -> str:
    return PART_NAME.format(index=self.index, count=self.count)


def process_shard() -> Shard:
  """This process's shard under ``jax.distributed`` (the whole input on one process)."""
  return Shard(jax.process_index(), jax.process_count())


def output_dir_problem(path: str | epath.PathLike) -> str | None:
  """Why ``path`` cannot receive the outputs (an existing file, an unwritable place), or None.

  Checked before any work: otherwise a raw FileExistsError would come after minutes of MC.
  Local folders only: on object storage (gs://) permissions show only when writing.
  """
  path = epath.Path(path)
  if file_io.is_remote(path):
    return None
  if path.exists() and not path.is_dir():
    return f'{path} exists and is not a directory'
  # The nearest existing ancestor is where the folder would be created.
  existing = path.resolve()
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    return f'{path} cannot be created: {existing} is a file'
  if not os.access(str(existing), os.W_OK | os.X_OK):
    return f'{path} is not writable (no write permission on {existing})'
  return None


# ------------------------------------------------------------------------------------------------
# Checkpoints and inputs.


def load_checkpoint(*, workdir: str | epath.PathLike | None = None,
                    checkpoint_dir: str | epath.PathLike | None = None
                    ) -> tuple[Any, dict[str, Any]]:
  """Params and meta: the best step of a training ``workdir`` or any ``checkpoint_dir``."""
  if (workdir is None) == (checkpoint_dir is None):
    raise EvaluationError('give exactly one of --workdir (a training run) or --checkpoint')
  directory = file_io.as_path(checkpoint.workdir_checkpoints(workdir) if workdir is not None
                              else checkpoint_dir)
  params, meta = checkpoint.load_params(directory)
  meta['checkpoint_dir'] = str(directory)
  return params, meta


def apstar_inputs(apstar_dir: str | None = None, apstar_list: str | None = None
                  ) -> tuple[list[str], list[Problem]]:
  """(apStar files to read, files left out and why) from a folder and/or a list file.

  Each real file is read once, however many links or list lines lead to it; files named like
  apStar files that the file name pattern does not match are left out with a reason, not
  silently ignored.
  """
  candidates, skipped = [], []
  if apstar_dir:
    found, near_misses = apstar.scan_apstar_files(apstar_dir)
    candidates += found
    skipped += [_problem(p, f'{p}: named like an apStar file but not apStar-<reduction>-'
                         '<APOGEE_ID>.fits[.gz] (nor asStar-…); rename it or give it in '
                         '--apstar_list') for p in near_misses]
  if apstar_list:
    lines = epath.Path(apstar_list).read_text().splitlines()
    candidates += [line.strip() for line in lines if line.strip() and not line.startswith('#')]
  files, first = [], {}
  for path in candidates:
    # epath's resolve() does not follow links; realpath does (local files only).
    real = str(path) if file_io.is_remote(path) else os.path.realpath(path)
    if real in first:
      skipped.append(_problem(path, f'{path}: the same file as {first[real]}, read once'))
      continue
    first[real] = path
    files.append(path)
  return files, skipped


def _problem(path: str, reason: str) -> Problem:
  return Problem(file=str(path), apogee_id=apstar.apogee_id_from_filename(path) or '',
                        reason=reason)


def open_split(data_dir: str | epath.PathLike, split: str):
  """A random-access source over one split of the built data set (``input_pipeline``)."""
  return input_pipeline.open_split(str(data_dir), split)


def split_batches(data_dir: str | epath.PathLike, split: str, batch_size: int):
  """(in-order batches, number of stars) of one split of the built data set (benchmarks)."""
  source = open_split(data_dir, split)
  return input_pipeline.eval_batches(source, batch_size), len(source)


def _sources(splits: Sequence[str], data_dir, apstar_files: Sequence[str]):
  """(name, noise stream, random-access source) of every input, in catalogue order."""
  for split in splits:
    if split not in SPLITS:
      raise EvaluationError(f'--split {split!r} is not one of {SPLITS}')
    yield split, SPLITS.index(split), open_split(data_dir, split)
  if apstar_files:
    yield '', APSTAR_STREAM, input_pipeline.ApStarFiles(apstar_files)


# ------------------------------------------------------------------------------------------------
# Prediction.


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
      flux = np.asarray(batch['flux'], np.float32)
      if flux.shape[1:] != (N_PIXELS,):
        raise EvaluationError(f'flux batch of shape {flux.shape}, expected (B, {N_PIXELS})')
      scale = (uncertainty.prepare_errors(batch['flux_err'], settings.error_cap)
               if settings.mc > 0 else np.zeros_like(flux))
      index = (np.asarray(batch['index']) if 'index' in batch
               else np.arange(start, start + len(flux))).astype(np.uint32)
      # Rows split over the devices when they divide evenly; otherwise all rows on every device.
      where = shardings[0] if len(flux) % len(devices) == 0 else shardings[1]
      out = fn(params, *jax.device_put((flux, scale, index), where), key)
      if pending is not None:
        outputs.append(_fetch(pending))
      pending = (out, valid)
      _keep_rows(keep, batch, valid)
      start += int(valid.sum())
      bar.update(int(valid.sum()))
    if pending is not None:
      outputs.append(_fetch(pending))
  return _per_star(keep, outputs, standardizer)


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
  result['pred'] = standardizer.inverse(mean_z)
  result['pred_err_noise'] = standardizer.inverse_scale(noise_z)
  result['pred_err_model'] = standardizer.inverse_scale(model_z)
  result['pred_err'] = np.sqrt(result['pred_err_noise'] ** 2
                               + np.nan_to_num(result['pred_err_model']) ** 2)
  result['pred_z'] = mean_z.astype(np.float64)
  return result


# ------------------------------------------------------------------------------------------------
# Metrics: paper Tables 2 and 3.


def compute_metrics(pred: np.ndarray, labels: np.ndarray, data_type: np.ndarray,
                    standardizer: Standardizer, *, sigma: np.ndarray | None = None,
                    raw_sigma: np.ndarray | None = None) -> dict[str, Any]:
  """Table 2 (standardised MSE over the 3 labels) and Table 3 (std of pred − label, native).

  Args:
    pred, labels: (n, 3) native units; rows with non-finite labels are ignored.
    data_type: (n,) index into DATA_TYPES.
    sigma, raw_sigma: optional (n, 3) catalogue σ (calibrated) and raw σ, native units: add
      'coverage_1sigma', 'coverage_2sigma', 'nll' and the same three prefixed 'raw_'.
  Returns: {group: {'n', 'mse_standardised', 'mse_standardised_per_label', 'scatter', 'bias',
    [coverage keys]}} for group in 'Full' (all data types) and each data type present; every
    per-label entry is a dict keyed by label name.
  """
  pred = np.asarray(pred, np.float64)
  labels = np.asarray(labels, np.float64)
  data_type = np.asarray(data_type)
  ok = np.all(np.isfinite(labels), axis=1) & np.all(np.isfinite(pred), axis=1)
  groups = {'Full': ok}
  for i, name in enumerate(DATA_TYPES):
    groups[name] = ok & (data_type == i)
  out = {}
  for name, sel in groups.items():
    n = int(sel.sum())
    if n == 0:
      continue
    dz = (pred[sel] - labels[sel]) / standardizer.std
    diff = pred[sel] - labels[sel]
    out[name] = {
        'n': n,
        'mse_standardised': float(np.mean(dz ** 2)),
        'mse_standardised_per_label': dict(zip(LABEL_NAMES, np.mean(dz ** 2, 0).tolist(),
                                               strict=True)),
        'scatter': dict(zip(LABEL_NAMES, diff.std(0).tolist(), strict=True)),
        'bias': dict(zip(LABEL_NAMES, diff.mean(0).tolist(), strict=True)),
    }
    for prefix, sig in (('', sigma), ('raw_', raw_sigma)):
      if sig is not None:
        out[name].update(_coverage_metrics(diff, np.asarray(sig, np.float64)[sel], prefix))
  return out


def _coverage_metrics(diff: np.ndarray, sigma: np.ndarray, prefix: str) -> dict[str, Any]:
  """coverage_1sigma, coverage_2sigma, nll (each {label: value}) of residuals (n, 3)."""
  out = {f'{prefix}coverage_1sigma': {}, f'{prefix}coverage_2sigma': {}, f'{prefix}nll': {}}
  for j, n in enumerate(LABEL_NAMES):
    out[f'{prefix}coverage_1sigma'][n] = calibration.coverage(diff[:, j], sigma[:, j], 1.0)
    out[f'{prefix}coverage_2sigma'][n] = calibration.coverage(diff[:, j], sigma[:, j], 2.0)
    out[f'{prefix}nll'][n] = calibration.gaussian_nll(diff[:, j], sigma[:, j])
  return out


def format_metrics(metrics: Mapping[str, Any]) -> str:
  """A readable Table 2 / Table 3 with the paper's values beside ours."""
  lines = []
  for split, groups in metrics['splits'].items():
    lines.append(f'== {split} ==')
    lines.append(f'{"":8s} {"n":>7s} {"MSE(std)":>9s} {"paper":>7s}   '
                 + '   '.join(f'σ {n} [{u}] (paper)' for n, u in zip(LABEL_NAMES, LABEL_UNITS,
                                                                     strict=True)))
    col = SPLITS.index(split) if split in SPLITS else None
    for name, m in groups.items():
      paper = PAPER_TABLE2.get(name)
      paper_mse = f'{paper[col]:7.3f}' if paper and col is not None else f'{"":7s}'
      paper3 = PAPER_TABLE3.get(name) if split == 'test' else None
      scatter = '   '.join(
          f'{m["scatter"][n]:9.4g} ({paper3[j]:g})' if paper3 else f'{m["scatter"][n]:9.4g}'
          for j, n in enumerate(LABEL_NAMES))
      lines.append(f'{name:8s} {m["n"]:7d} {m["mse_standardised"]:9.4f} {paper_mse}   {scatter}')
    if any('coverage_1sigma' in m for m in groups.values()):
      lines.append(f'{"":8s} coverage 1σ / 2σ, calibrated (raw); ideal '
                   f'{calibration.NOMINAL_1SIGMA:.3f} / {calibration.NOMINAL_2SIGMA:.3f}')
      for name, m in groups.items():
        if 'coverage_1sigma' in m:
          lines.append(f'{name:8s} ' + '   '.join(
              f'{n} {m["coverage_1sigma"][n]:.3f}/{m["coverage_2sigma"][n]:.3f} '
              f'({m["raw_coverage_1sigma"][n]:.3f}/{m["raw_coverage_2sigma"][n]:.3f})'
              for n in LABEL_NAMES))
  return '\n'.join(lines)


def _write_json_atomic(obj: Any, path: epath.Path) -> None:
  with file_io.atomic_path(str(path)) as tmp, open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, allow_nan=True)


def _remove_stale_outputs(output_dir: epath.Path, out: Mapping[str, Any]) -> None:
  """Deletes outputs an earlier run (of another mode) left that this run did not rewrite.

  A skipped.csv from an apStar run beside a split run's catalogue, or last week's figures,
  would describe another run than the catalogue beside them. Runs after the new outputs are
  written, so a failed run leaves the previous run's outputs whole. Part files stay: a merge
  may still need them.
  """
  written = {str(p) for p in (out['catalog_fits'], out['catalog_csv'], out['metrics_json'],
                              out['skipped_csv'], *out['figures']) if p}
  ours = [output_dir / name for name in (CATALOG_FITS, CATALOG_CSV, METRICS_JSON, SKIPPED_CSV)]
  if (output_dir / FIGURES_DIR).is_dir():
    ours += [p for p in (output_dir / FIGURES_DIR).iterdir() if p.suffix == '.png']
  for path in ours:
    if path.is_file() and str(path) not in written:
      logging.info('Removing %s: left by an earlier run, not written by this one.', path)
      path.unlink()


# ------------------------------------------------------------------------------------------------
# Predicting one shard, and the parts of a sharded run.


def _even_batch_size(batch_size: int) -> int:
  """Whole batches split evenly over the local devices (results do not change)."""
  n_dev = jax.local_device_count()
  return batch_size + (n_dev - batch_size % n_dev) % n_dev


def _predict_inputs(params: Any, meta: Mapping[str, Any], settings: MCSettings,
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


def _run_header(meta: Mapping[str, Any], settings: MCSettings, cal: Mapping[str, Any] | None,
                *, sources, splits: Sequence[str], apstar: bool, batch_size: int, shard: Shard
                ) -> dict[str, Any]:
  """What the catalogue and metrics need besides the per-star arrays; JSON, equal in all parts.

  'inputs' (name, number of stars, digest of the apStar file list) lets a merge refuse parts
  that saw other inputs (another folder listing, another build of the data set).
  """
  standardizer = checkpoint.standardizer_from_meta(meta)
  # 'mc' counts the draws actually made: none in linear mode.
  run = {'checkpoint': str(meta.get('checkpoint_dir', '')), 'step': meta.get('step'),
         'sigma': settings.sigma, 'mc': int(settings.mc) if settings.sigma == 'mc' else 0,
         'error_cap': settings.error_cap, 'seed': int(settings.seed),
         'ensemble': checkpoint.ensemble_size(meta)}
  if settings.sigma == 'linear':
    run['linear_draws'] = int(settings.linear_draws)
  # Without 'path': only the process that stored the calibration knows it, the rest agree.
  cal = None if cal is None else {k: v for k, v in cal.items() if k != 'path'}
  return {'format': _PART_FORMAT, 'run': run, 'calibration': cal,
          'splits': list(splits), 'apstar': bool(apstar), 'batch_size': int(batch_size),
          'label_mean': standardizer.mean.tolist(), 'label_std': standardizer.std.tolist(),
          'inputs': [[name, len(source), _digest(source)] for name, _, source in sources],
          'shard': dataclasses.asdict(shard)}


def _digest(source) -> str:
  if not isinstance(source, input_pipeline.ApStarFiles):
    return ''
  return hashlib.sha256('\n'.join(source.paths).encode()).hexdigest()[:16]


def _part_bytes(part: Mapping[str, np.ndarray], header: Mapping[str, Any]) -> bytes:
  buffer = io.BytesIO()
  # Prefixed names: a field called 'file' would clash with savez's own argument.
  np.savez(buffer, header=np.asarray(json.dumps(header)),
           **{f'star_{k}': v for k, v in part.items()})
  return buffer.getvalue()


def _read_part(data: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      header = json.loads(str(z['header']))
      part = {k.removeprefix('star_'): z[k] for k in z.files if k.startswith('star_')}
  except (OSError, ValueError, KeyError) as e:
    raise EvaluationError(f'{where}: not a part file of evaluate.py ({e})') from e
  if header.get('format') != _PART_FORMAT:
    raise EvaluationError(f'{where}: part format {header.get("format")}, expected '
                          f'{_PART_FORMAT}')
  return part, header


def _gather_parts(data: bytes) -> list[bytes] | None:
  """Every process's part (bytes) on process 0, in process order; None on the others."""
  from jax.experimental import multihost_utils  # Only multi-process runs need it.
  mine = np.frombuffer(data, np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(mine)))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(mine)] = mine
  everything = np.asarray(multihost_utils.process_allgather(padded))
  if jax.process_index() != 0:
    return None
  return [everything[k, :sizes[k]].tobytes() for k in range(len(sizes))]


def _merge_parts(parts: Sequence[tuple[dict[str, np.ndarray], dict[str, Any]]]
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The parts of one sharded run, in star order: each input's rows, shard after shard."""
  header, ordered = _check_parts(parts)
  inputs = [*header['splits'], *([''] if header['apstar'] else [])]
  merged = {k: np.concatenate([p[k][p['data_set'] == name] for name in inputs for p in ordered])
            for k in ordered[0] if k != 'problems'}
  merged['problems'] = np.concatenate([p['problems'] for p in ordered])
  return merged, header


def _check_parts(parts: Sequence[tuple[dict[str, np.ndarray], dict[str, Any]]]
                 ) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
  """(the run's header, the parts in shard order); refuses parts of different runs or gaps."""
  headers = [{k: v for k, v in h.items() if k != 'shard'} for _, h in parts]
  shards = [h['shard'] for _, h in parts]
  for h, shard in zip(headers, shards, strict=True):
    differ = sorted(k for k in {*h, *headers[0]} if h.get(k) != headers[0].get(k))
    if shard['count'] != shards[0]['count']:
      differ.append('shard count')
    if differ:
      raise EvaluationError(f'the parts come from different runs: {", ".join(differ)} differ '
                            f'(shard {shards[0]} vs {shard})')
  count = shards[0]['count']
  indices = sorted(s['index'] for s in shards)
  if indices != list(range(count)):
    raise EvaluationError(f'expected parts 0–{count - 1} of {count} once each, got shards '
                          f'{indices}')
  by_index = {s['index']: part for (part, _), s in zip(parts, shards, strict=True)}
  return headers[0], [by_index[k] for k in range(count)]


def _find_parts(paths: Sequence[str | epath.PathLike]) -> list[epath.Path]:
  found = []
  for path in map(epath.Path, paths):
    # iterdir + fnmatch: a listing every epath backend has (glob mangled gs:// names in a test).
    found += (sorted(p for p in path.iterdir() if fnmatch.fnmatch(p.name, PART_GLOB))
              if path.is_dir() else [path])
  if not found:
    raise EvaluationError(f'no {PART_GLOB} files in {", ".join(map(str, paths))}')
  return found


# ------------------------------------------------------------------------------------------------
# Writing the catalogue, metrics and figures of a whole run.


def _write_outputs(merged: Mapping[str, np.ndarray], header: Mapping[str, Any],
                   output_dir: epath.Path, make_figures: bool) -> dict[str, Any]:
  """Writes skipped.csv, the catalogue, metrics.json and the figures; returns what it wrote."""
  output_dir.mkdir(parents=True, exist_ok=True)
  out = {'catalog_fits': None, 'catalog_csv': None, 'metrics_json': None, 'skipped_csv': None,
         'figures': [], 'metrics': None, 'part': None, 'n_skipped': len(merged['problems'])}
  if header['apstar']:
    # Written before anything can fail: when no file at all is readable, this says why.
    out['skipped_csv'] = str(output_dir / SKIPPED_CSV)
    write_problems([Problem(*row) for row in merged['problems'].tolist()], out['skipped_csv'])
  if len(merged['pred']) == 0:
    raise EvaluationError(f'no star could be read ({out["n_skipped"]} files skipped, listed in '
                          f'{out["skipped_csv"]})')
  table = _build_table(merged, header)
  out['catalog_fits'] = str(output_dir / CATALOG_FITS)
  out['catalog_csv'] = str(output_dir / CATALOG_CSV)
  catalog.write_fits(table, out['catalog_fits'])
  catalog.write_csv(table, out['catalog_csv'])
  if header['splits']:
    out['metrics'] = _metrics(merged, header)
    out['metrics_json'] = str(output_dir / METRICS_JSON)
    _write_json_atomic(out['metrics'], output_dir / METRICS_JSON)
  if make_figures:
    out['figures'] = figures.make_figures(table, str(output_dir / FIGURES_DIR),
                                          with_labels=bool(header['splits']))
  _remove_stale_outputs(output_dir, out)
  out.update(n_stars=len(table), table=table, sigma=header['run']['sigma'],
             calibrated=header['calibration'] is not None)
  logging.info('Wrote %d stars to %s.', len(table), output_dir)
  return out


def _build_table(merged: Mapping[str, np.ndarray], header: Mapping[str, Any]):
  cal = header['calibration']
  dtype_names = np.asarray([DATA_TYPES[i] if 0 <= i < len(DATA_TYPES) else ''
                            for i in merged['data_type'].astype(int)], dtype=str)
  table = catalog.build_catalog(
      apogee_id=merged['apogee_id'], ra=merged['ra'], dec=merged['dec'], pred=merged['pred'],
      pred_err=calibration.apply(merged['pred_err'], cal, merged['pred']),
      pred_err_noise=merged['pred_err_noise'], pred_err_model=merged['pred_err_model'],
      snr=merged['snr'], labels=merged['labels'], data_set=merged['data_set'],
      data_type=dtype_names, calibrated=cal is not None, sigma=header['run']['sigma'],
      file=merged['file'])
  for k, v in header['run'].items():
    table.meta[k.upper()[:8]] = '' if v is None else v
  table.meta['CALIB'] = 'dev' if cal is not None else 'none'
  return table


def _metrics(merged: Mapping[str, np.ndarray], header: Mapping[str, Any]) -> dict[str, Any]:
  """metrics.json: the run, Tables 2–3 and coverage per split, the paper's values."""
  cal = header['calibration']
  run = {**header['run'], 'calibration': (
      {k: cal[k] for k in ('a', 'b', 'n', 'floor', 'floor_choice', 'step', 'split', 'mc')
       if k in cal}
      if cal is not None else None)}
  standardizer = Standardizer(mean=np.asarray(header['label_mean']),
                              std=np.asarray(header['label_std']))
  sigma = calibration.apply(merged['pred_err'], cal, merged['pred'])
  metrics = {'run': run, 'splits': {}}
  for split in header['splits']:
    sel = merged['data_set'] == split
    metrics['splits'][split] = compute_metrics(
        merged['pred'][sel], merged['labels'][sel], merged['data_type'][sel], standardizer,
        sigma=sigma[sel], raw_sigma=merged['pred_err'][sel])
  metrics['paper'] = {'table2_train_dev_test': PAPER_TABLE2, 'table3_test': PAPER_TABLE3}
  return metrics


# ------------------------------------------------------------------------------------------------
# The whole job.


def calibrate(*, params: Any, meta: Mapping[str, Any], data_dir: str | epath.PathLike,
              settings: MCSettings = MCSettings(), batch_size: int = DEFAULT_BATCH_SIZE,
              save: bool = True, floor: str = 'auto') -> dict[str, Any]:
  """Fits σ_cal² = (a σ)² + b² per label on the dev split (``calibration``); returns the record.

  ``floor``: how b may vary, one of ``calibration.FLOOR_CHOICES`` ('auto': constant or a function
  of the star's predicted labels, chosen per label by cross-validation on the dev split;
  'constant': one b per label).

  ``settings.estimator`` (with ``linear_draws``) is the σ_noise estimator the fit is made for: on
  the demo network the linear σ is ~0.9× the MC's with the default 2 draws and ~1.2× with 0, so a
  fit carries over only to the estimator it was made with; ``evaluate`` warns on a mismatch.

  The dev stars are predicted exactly as ``evaluate(splits=['dev'])`` would (same noise stream).
  With ``save`` the record goes to ``meta['checkpoint_dir']/calibration.json``, tied to
  ``meta['step']``, where every later ``load_checkpoint`` of that step finds it.
  """
  if settings.mc < 1:
    raise EvaluationError('--calibrate needs Monte Carlo draws (--mc >= 1): σ_noise is part of '
                          'the fitted total')
  if not data_dir:
    raise EvaluationError('--calibrate needs --data_dir (it fits on the dev split)')
  split = CALIBRATION_SPLIT
  part = _predict_inputs(params, meta, settings, _even_batch_size(batch_size),
                         _sources([split], data_dir, ()), Shard())
  standardizer = checkpoint.standardizer_from_meta(meta)
  try:
    record = calibration.fit(part['pred'], part['labels'], part['pred_err'], standardizer.std,
                             floor=floor, step=meta.get('step'), split=split, mc=int(settings.mc),
                             error_cap=settings.error_cap, seed=int(settings.seed),
                             estimator=settings.estimator,
                             linear_draws=int(settings.linear_draws),
                             ensemble_size=checkpoint.ensemble_size(meta))
  except calibration.CalibrationError as e:
    raise EvaluationError(f'{data_dir} {split} split: {e}') from e
  logging.info('Calibration: %s', calibration.describe(record))
  if save:
    if not meta.get('checkpoint_dir') or meta.get('step') is None:
      raise EvaluationError('cannot store a calibration: meta has no checkpoint_dir/step '
                            '(load it with load_checkpoint)')
    record['path'] = calibration.save(meta['checkpoint_dir'], record)
  return record


def _calibration_in_use(meta: Mapping[str, Any], mode: str, settings: MCSettings
                        ) -> dict[str, Any] | None:
  if mode not in CALIBRATION_MODES:
    raise EvaluationError(f'--calibration must be one of {CALIBRATION_MODES}, got {mode!r}')
  record = meta.get('calibration') if mode == 'auto' else None
  if record is None:
    return None
  if ((record.get('estimator', 'mc'), record.get('linear_draws', 0))
      != (settings.estimator, settings.linear_draws)):
    logging.warning('The calibration was fitted for the %r σ estimator (linear_draws=%s), this '
                    'run uses %r (linear_draws=%d): rerun evaluate.py --calibrate with this '
                    "run's --uncertainty and --linear_draws for a matching fit.",
                    record.get('estimator', 'mc'), record.get('linear_draws', 0),
                    settings.estimator, settings.linear_draws)
  if (record.get('mc'), record.get('error_cap')) != (settings.mc, settings.error_cap):
    logging.warning('The calibration was fitted with mc=%s error_cap=%s, this run uses mc=%d '
                    'error_cap=%s: the σ it scales differ somewhat.', record.get('mc'),
                    record.get('error_cap'), settings.mc, settings.error_cap)
  return record


def _check_request(splits, data_dir, apstar_files, skipped_files, batch_size, output_dir):
  if not splits and not apstar_files and not skipped_files:
    raise EvaluationError('nothing to evaluate: give --split (with --data_dir) or --apstar_dir')
  if splits and not data_dir:
    raise EvaluationError('--split needs --data_dir (the tfds data dir of the built data set)')
  if batch_size < 1:
    raise EvaluationError(f'--batch_size must be >= 1, got {batch_size}')
  if problem := output_dir_problem(output_dir):
    raise EvaluationError(f'--output_dir: {problem}')


def evaluate(*, params: Any, meta: Mapping[str, Any], output_dir: str | epath.PathLike,
             splits: Sequence[str] = (), data_dir: str | epath.PathLike | None = None,
             apstar_files: Sequence[str] = (), skipped_files: Sequence[Problem] = (),
             settings: MCSettings = MCSettings(), batch_size: int = DEFAULT_BATCH_SIZE,
             make_figures: bool = True, calibration_mode: str = 'auto',
             shard: Shard | None = None) -> dict[str, Any]:
  """Predicts every star, writes the catalogue, metrics and figures; returns what it wrote.

  Give ``splits`` (with ``data_dir``) for labelled stars of the built data set, or
  ``apstar_files`` for unlabelled apStar spectra (or both); ``skipped_files`` (e.g. from
  ``apstar_inputs``) go into skipped.csv with the unreadable ones. ``settings`` (the σ estimator,
  draws, seed, ...) are recorded in the catalogue header and metrics.json.
  ``calibration_mode='auto'`` scales the σ by ``meta['calibration']`` when present
  (``calibrate``), 'none' keeps the raw σ.
  ``shard``: None predicts everything, or under ``jax.distributed`` this process's shard, and
  process 0 writes the whole catalogue; a ``Shard`` of several writes only this shard's part
  file into ``output_dir`` (``merge`` writes the catalogue from all parts).
  Returns a dict with the output paths ('catalog_fits', 'catalog_csv', 'metrics_json',
  'skipped_csv': None when not written; 'figures'; 'part'), 'n_stars', 'n_skipped', 'sigma',
  'calibrated', 'metrics', 'table' and 'seconds'.
  """
  _check_request(splits, data_dir, apstar_files, skipped_files, batch_size, output_dir)
  distributed = shard is None and jax.process_count() > 1
  if shard is not None and jax.process_count() > 1:
    raise EvaluationError('--shard_index/--num_shards are for separate runs, not for a '
                          'jax.distributed job (it shards by process by itself)')
  shard = process_shard() if shard is None else shard
  t0 = time.perf_counter()
  cal = _calibration_in_use(meta, calibration_mode, settings)
  batch_size = _even_batch_size(batch_size)
  sources = list(_sources(splits, data_dir, apstar_files))
  header = _run_header(meta, settings, cal, sources=sources, splits=splits,
                       apstar=bool(apstar_files or skipped_files), batch_size=batch_size,
                       shard=shard)
  part = _predict_inputs(params, meta, settings, batch_size, sources, shard)
  if shard.index == 0:  # Files left out before reading are reported once, by shard 0.
    listed = np.asarray([dataclasses.astuple(p) for p in skipped_files], str).reshape(-1, 3)
    part['problems'] = np.concatenate([listed, part['problems']])
  output_dir = epath.Path(output_dir)
  if shard.count == 1:
    out = _write_outputs(*_merge_parts([(part, header)]), output_dir, make_figures)
  elif distributed:
    everything = _gather_parts(_part_bytes(part, header))
    out = (_not_written(part) if everything is None else _write_outputs(
        *_merge_parts([_read_part(d, f'process {k}') for k, d in enumerate(everything)]),
        output_dir, make_figures))
  else:
    out = _not_written(part)
    out['part'] = str(output_dir / shard.path_name)
    output_dir.mkdir(parents=True, exist_ok=True)
    with file_io.atomic_path(out['part']) as tmp:
      epath.Path(tmp).write_bytes(_part_bytes(part, header))
    logging.info('Wrote part %s (%d stars); merge all parts with evaluate.py --merge.',
                 out['part'], out['n_stars'])
  out['seconds'] = time.perf_counter() - t0
  return out


def _not_written(part: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The result of a run that predicted a shard and wrote no catalogue."""
  return {'catalog_fits': None, 'catalog_csv': None, 'metrics_json': None, 'skipped_csv': None,
          'figures': [], 'metrics': None, 'part': None, 'table': None, 'calibrated': None,
          'n_stars': len(part['pred']), 'n_skipped': len(part['problems']), 'sigma': None}


def merge(parts: Sequence[str | epath.PathLike], output_dir: str | epath.PathLike, *,
          make_figures: bool = True) -> dict[str, Any]:
  """Writes the catalogue, metrics and figures of a sharded run from its part files.

  ``parts``: part files or folders holding them (``PART_GLOB``). The result equals the one-run
  catalogue bit for bit; the metrics are computed on the merged catalogue.
  """
  if problem := output_dir_problem(output_dir):
    raise EvaluationError(f'--output_dir: {problem}')
  t0 = time.perf_counter()
  paths = _find_parts(parts)
  out = _write_outputs(*_merge_parts([_read_part(p.read_bytes(), str(p)) for p in paths]),
                       epath.Path(output_dir), make_figures)
  out['seconds'] = time.perf_counter() - t0
  return out
