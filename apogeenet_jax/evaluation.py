"""Inference with Monte Carlo uncertainties → catalogue, metrics (Tables 2–3) and figures.

``evaluate(...)`` is what ``evaluate.py`` calls and what a notebook or test can call directly:
it streams spectra (a split of the built TFDS data set, or apStar files) through the jitted MC
function of ``uncertainty`` batch by batch — device memory is bounded by the batch and draw chunk,
host memory by a few numbers per star — and writes into ``output_dir``:

  catalog.fits, catalog.csv   the catalogue (``catalog``), written atomically
  metrics.json                Table 2 (standardised MSE), Table 3 (scatter) and the coverage
                              of the σ (calibrated and raw), when labelled
  figures/*.png               ``figures``
  skipped.csv                 apStar files that could not be read, and why (apStar mode)
"""

import concurrent.futures
import csv
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
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
from apogeenet_jax.constants import DATA_TYPES, LABEL_NAMES, LABEL_UNITS, N_PIXELS
from apogeenet_jax.normalization import Standardizer
from apogeenet_jax.sharding import DATA_AXIS, make_mesh

CATALOG_FITS = 'catalog.fits'
CATALOG_CSV = 'catalog.csv'
METRICS_JSON = 'metrics.json'
SKIPPED_CSV = 'skipped.csv'
FIGURES_DIR = 'figures'
DEFAULT_BATCH_SIZE = 16
DEFAULT_DRAW_CHUNK = 25
CALIBRATION_MODES = ('auto', 'none')  # auto: apply the checkpoint's calibration when it has one
CALIBRATION_SPLIT = 'dev'

# Table 2 (standardised MSE, train/dev/test) and Table 3 (test scatter) of the paper, to print
# beside ours. 'Full' is every data type together.
PAPER_TABLE2 = {'Full': (0.044, 0.049, 0.063), 'MStar': (0.08, 0.098, 0.196),
                'YSO': (0.153, 0.168, 0.217)}
PAPER_TABLE3 = {'Full': (0.216, 183.74, 0.0914), 'MStar': (0.346, 273.7, 0.18),
                'YSO': (0.4, 490.99, 0.0879)}


_STREAMS = {'train': 0, 'dev': 1, 'test': 2, 'apstar': 3}


class EvaluationError(RuntimeError):
  """Evaluation cannot run: bad arguments, no checkpoint, no spectra."""


def output_dir_problem(path: str) -> str | None:
  """Why ``path`` cannot receive the outputs (an existing file, an unwritable place), or None.

  Checked before any work: otherwise a raw FileExistsError would come after minutes of MC.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    return f'{path} exists and is not a directory'
  # The nearest existing ancestor is where the folder would be created.
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return f'{path} cannot be created: {existing} is a file'
  if not os.access(existing, os.W_OK | os.X_OK):
    return f'{path} is not writable (no write permission on {existing})'
  return None


# ------------------------------------------------------------------------------------------------
# Checkpoints.


def load_checkpoint(*, workdir: str | None = None, checkpoint_dir: str | None = None
                    ) -> tuple[Any, dict[str, Any]]:
  """Params and meta: the best step of a training ``workdir`` or any ``checkpoint_dir``."""
  if (workdir is None) == (checkpoint_dir is None):
    raise EvaluationError('give exactly one of --workdir (a training run) or --checkpoint')
  directory = (os.path.join(workdir, checkpoint.CHECKPOINT_DIR) if workdir is not None else checkpoint_dir)
  params, meta = checkpoint.load_params(directory)
  meta['checkpoint_dir'] = os.path.abspath(directory)
  return params, meta


# ------------------------------------------------------------------------------------------------
# Batches: every source yields the ``input_pipeline`` batch dicts (preprocessed flux and errors).


def _pad_batch(rows: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, np.ndarray]:
  """Unlabelled apStar rows → one batch of fixed size, padded with masked copies of row 0."""
  n = len(rows)
  examples = [{**r, 'labels': np.full(len(LABEL_NAMES), np.nan, np.float32), 'data_type': -1}
              for r in (*rows, *[rows[0]] * (batch_size - n))]
  return input_pipeline.collate(examples, mask=np.arange(batch_size) < n)


def apstar_batches(paths: Sequence[str], batch_size: int, *, skipped: list[tuple[str, str]],
                   num_threads: int = 4, lookahead: int = 64) -> Iterator[dict[str, np.ndarray]]:
  """Padded batches of apStar spectra read by background threads, in file order.

  Unreadable files are logged, appended to ``skipped`` as (path, reason) and left out.
  At most ``lookahead`` files are in flight, so memory does not grow with the file count.
  """

  def read(path):
    try:
      s = apstar.read_apstar(path)
    except apstar.ApStarError as e:
      return path, None, str(e)
    return path, {'flux': s.flux, 'flux_err': s.flux_err, 'apogee_id': s.apogee_id,
                  'snr': s.snr, 'ra': s.ra, 'dec': s.dec, 'file': path}, ''

  rows = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
    pending = []
    it = iter(paths)
    for path in it:
      pending.append(pool.submit(read, path))
      if len(pending) < lookahead:
        continue
      while len(pending) >= lookahead:
        yield from _collect(pending.pop(0).result(), rows, batch_size, skipped)
    for fut in pending:
      yield from _collect(fut.result(), rows, batch_size, skipped)
  if rows:
    yield _pad_batch(rows, batch_size)


def _collect(result, rows: list, batch_size: int, skipped: list):
  path, row, reason = result
  if row is None:
    logging.warning('Skipping %s', reason)
    skipped.append((path, reason))
    return
  rows.append(row)
  if len(rows) == batch_size:
    yield _pad_batch(rows, batch_size)
    rows.clear()


def apstar_inputs(apstar_dir: str | None = None, apstar_list: str | None = None
                  ) -> tuple[list[str], list[tuple[str, str]]]:
  """(apStar files to read, (path, reason) of files left out) from a folder and/or a list file.

  Each real file is read once, however many links or list lines lead to it; files named like
  apStar files that the file name pattern does not match are left out with a reason, not
  silently ignored.
  """
  candidates, skipped = [], []
  if apstar_dir:
    found, near_misses = apstar.scan_apstar_files(apstar_dir)
    candidates += found
    skipped += [(p, f'{p}: named like an apStar file but not apStar-<reduction>-<APOGEE_ID>'
                 '.fits[.gz] (nor asStar-…); rename it or give it in --apstar_list')
                for p in near_misses]
  if apstar_list:
    with open(apstar_list) as f:
      candidates += [line.strip() for line in f if line.strip() and not line.startswith('#')]
  files, first = [], {}
  for path in candidates:
    real = os.path.realpath(path)
    if real in first:
      skipped.append((path, f'{path}: the same file as {first[real]}, read once'))
      continue
    first[real] = path
    files.append(path)
  return files, skipped


def split_batches(data_dir: str, split: str, batch_size: int
                  ) -> tuple[Iterator[dict[str, np.ndarray]], int]:
  """(batches, number of stars) of one split of the built data set."""
  source = input_pipeline.open_split(data_dir, split)
  return input_pipeline.eval_batches(source, batch_size), len(source)


# ------------------------------------------------------------------------------------------------
# Prediction.


def predict_batches(params: Any, model, standardizer: Standardizer,
                    batches: Iterable[Mapping[str, np.ndarray]], *, mc: int = 100,
                    error_cap: str = 'median', seed: int = 0, estimator: str = 'mc',
                    draw_chunk: int = DEFAULT_DRAW_CHUNK, total: int | None = None,
                    stream: int = 0, desc: str = 'stars', devices: Sequence[Any] | None = None,
                    ensemble_size: int = 1) -> dict[str, np.ndarray]:
  """Streams batches through the MC function; returns per-star arrays of the valid rows.

  ``estimator='linear'`` replaces the ``mc`` draws by first-order propagation of the same capped
  errors (``uncertainty.make_linear_fn``; pred = the noiseless forward pass); ``mc == 0`` gives
  noiseless predictions without σ whatever the estimator.
  Returns a dict with 'pred' (n, 3) native units, the raw σ (n, 3) native units
  'pred_err_noise' (MC or linear spread, averaged over members; NaN when mc == 0),
  'pred_err_model' (spread of the members' means; NaN for one network) and 'pred_err' (their
  quadrature sum, σ_model counted 0 for one network), 'labels', 'data_type', 'apogee_id', 'snr',
  'ra', 'dec'. ``ensemble_size`` K > 1: ``params`` carry a leading member axis (``uncertainty``).
  Star i (in stream order) draws its noise from ``fold_in(fold_in(PRNGKey(seed), stream), i)``,
  so results do not depend on the batch size; ``stream`` separates the noise of different inputs
  (splits, apStar files) under one seed.
  With several ``devices`` (default: all local ones) each batch is split over them (data
  parallel, params replicated) whenever the batch size is a multiple of their number.
  """
  apply_fn = uncertainty.model_apply_fn(model)
  if estimator not in uncertainty.ESTIMATORS:
    raise EvaluationError(f'--uncertainty must be one of {uncertainty.ESTIMATORS}, '
                          f'got {estimator!r}')
  if mc > 0 and estimator == 'linear':
    fn = uncertainty.make_linear_fn(apply_fn)
  elif mc > 0:
    fn = uncertainty.make_mc_fn(apply_fn, num_draws=mc, draw_chunk=draw_chunk,
                                noiseless_first=(error_cap == 'median'))
  elif mc == 0:
    fn = uncertainty.make_predict_fn(apply_fn)
  else:
    raise EvaluationError(f'--mc must be >= 0, got {mc}')
  if ensemble_size > 1:
    fn = uncertainty.make_ensemble_fn(fn)
  if error_cap not in uncertainty.ERROR_CAP_MODES:
    raise EvaluationError(f'--error_cap must be one of {uncertainty.ERROR_CAP_MODES}, '
                          f'got {error_cap!r}')
  key = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = make_mesh(devices=devices)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  row_sharding = NamedSharding(mesh, P(DATA_AXIS))
  single = NamedSharding(mesh, P())
  keep = {k: [] for k in ('labels', 'data_type', 'apogee_id', 'snr', 'ra', 'dec', 'file')}
  means, noises, models = [], [], []
  start = 0
  pending = None  # one batch in flight: the host prepares batch k+1 while the device runs k

  def finish(p):
    *out, valid = p
    mean_z, noise_z = out[0], out[1]
    means.append(np.asarray(mean_z)[valid])
    noises.append(np.asarray(noise_z)[valid])
    models.append(np.asarray(out[2])[valid] if len(out) > 2
                  else np.full_like(means[-1], np.nan))

  with tqdm(total=total, desc=desc, unit='star', mininterval=2.0) as bar:
    for batch in batches:
      valid = np.asarray(batch['mask'], bool)
      flux = np.asarray(batch['flux'], np.float32)
      if flux.shape[1:] != (N_PIXELS,):
        raise EvaluationError(f'flux batch of shape {flux.shape}, expected (B, {N_PIXELS})')
      scale = (uncertainty.prepare_errors(batch['flux_err'], error_cap) if mc > 0
               else np.zeros_like(flux))
      index = np.arange(start, start + len(flux), dtype=np.uint32)
      # Rows split over the devices when they divide evenly; otherwise all rows on every device.
      where = row_sharding if len(flux) % len(devices) == 0 else single
      out = fn(params, *jax.device_put((flux, scale, index), where), key)
      if pending is not None:
        finish(pending)
      pending = (*out, valid)
      for k in keep:
        column = batch[k] if k in batch else np.full(len(valid), '')  # 'file' is optional
        keep[k].append(np.asarray(column)[valid])
      start += int(valid.sum())
      bar.update(int(valid.sum()))
    if pending is not None:
      finish(pending)
  n_labels = len(LABEL_NAMES)
  empty = {'labels': np.zeros((0, n_labels)), 'apogee_id': np.zeros((0,), str),
           'file': np.zeros((0,), str)}
  result = {k: (np.concatenate(v) if v else empty.get(k, np.zeros((0,)))) for k, v in keep.items()}
  cat = lambda parts: np.concatenate(parts) if parts else np.zeros((0, n_labels))  # noqa: E731
  mean_z = cat(means)
  result['pred'] = standardizer.inverse(mean_z)
  result['pred_err_noise'] = standardizer.inverse_scale(cat(noises))
  result['pred_err_model'] = standardizer.inverse_scale(cat(models))
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
    col = {'train': 0, 'dev': 1, 'test': 2}.get(split)
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


def _write_json_atomic(obj: Any, path: str) -> None:
  with file_io.atomic_path(path) as tmp, open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, allow_nan=True)


def _remove_stale_outputs(output_dir: str, out: Mapping[str, Any]) -> None:
  """Deletes outputs an earlier run (of another mode) left that this run did not rewrite.

  A skipped.csv from an apStar run beside a split run's catalogue, or last week's figures,
  would describe another run than the catalogue beside them. Runs after the new outputs are
  written, so a failed run leaves the previous run's outputs whole.
  """
  written = {os.path.abspath(p) for p in (out['catalog_fits'], out['catalog_csv'],
                                          out['metrics_json'], out['skipped_csv'],
                                          *out['figures']) if p}
  figures_dir = os.path.join(output_dir, FIGURES_DIR)
  ours = [os.path.join(output_dir, name) for name in (CATALOG_FITS, CATALOG_CSV, METRICS_JSON,
                                                      SKIPPED_CSV)]
  if os.path.isdir(figures_dir):
    ours += [os.path.join(figures_dir, n) for n in os.listdir(figures_dir) if n.endswith('.png')]
  for path in ours:
    if os.path.isfile(path) and os.path.abspath(path) not in written:
      logging.info('Removing %s: left by an earlier run, not written by this one.', path)
      os.remove(path)


# ------------------------------------------------------------------------------------------------
# The whole job.


def _even_batch_size(batch_size: int) -> int:
  """Whole batches split evenly over the local devices (results do not change)."""
  n_dev = jax.local_device_count()
  return batch_size + (n_dev - batch_size % n_dev) % n_dev


def calibrate(*, params: Any, meta: Mapping[str, Any], data_dir: str,
              mc: int = uncertainty.PAPER_NUM_DRAWS, error_cap: str = 'median', seed: int = 0,
              batch_size: int = DEFAULT_BATCH_SIZE, draw_chunk: int = DEFAULT_DRAW_CHUNK,
              save: bool = True, estimator: str = 'mc') -> dict[str, Any]:
  """Fits σ_cal² = (a σ)² + b² per label on the dev split (``calibration``); returns the record.

  ``estimator`` is the σ_noise estimator the fit is made for ('mc' or 'linear': the linear σ is
  ~1.2× the MC's on the demo network, so a fit carries over only to the estimator it was made
  with; ``evaluate`` warns on a mismatch).

  The dev stars are predicted exactly as ``evaluate(splits=['dev'])`` would (same noise stream).
  With ``save`` the record goes to ``meta['checkpoint_dir']/calibration.json``, tied to
  ``meta['step']``, where every later ``load_checkpoint`` of that step finds it.
  """
  if mc < 1:
    raise EvaluationError('--calibrate needs Monte Carlo draws (--mc >= 1): σ_noise is part of '
                          'the fitted total')
  if not data_dir:
    raise EvaluationError('--calibrate needs --data_dir (it fits on the dev split)')
  standardizer = checkpoint.standardizer_from_meta(meta)
  batches, n = split_batches(data_dir, CALIBRATION_SPLIT, _even_batch_size(batch_size))
  logging.info('Calibrating on %d %s stars (mc=%d).', n, CALIBRATION_SPLIT, mc)
  part = predict_batches(params, checkpoint.model_from_meta(meta), standardizer, batches, mc=mc,
                         error_cap=error_cap, seed=seed, draw_chunk=draw_chunk, total=n,
                         desc=f'calibrate on {CALIBRATION_SPLIT}',
                         stream=_STREAMS[CALIBRATION_SPLIT],
                         ensemble_size=checkpoint.ensemble_size(meta), estimator=estimator)
  try:
    record = calibration.fit(part['pred'], part['labels'], part['pred_err'], standardizer.std,
                             step=meta.get('step'), split=CALIBRATION_SPLIT, mc=int(mc),
                             error_cap=error_cap, seed=int(seed), estimator=estimator,
                             ensemble_size=checkpoint.ensemble_size(meta))
  except calibration.CalibrationError as e:
    raise EvaluationError(f'{data_dir} {CALIBRATION_SPLIT} split: {e}') from e
  logging.info('Calibration a=%s b=%s', record['a'], record['b'])
  if save:
    if not meta.get('checkpoint_dir') or meta.get('step') is None:
      raise EvaluationError('cannot store a calibration: meta has no checkpoint_dir/step '
                            '(load it with load_checkpoint)')
    record['path'] = calibration.save(meta['checkpoint_dir'], record)
  return record


def _calibration_in_use(meta: Mapping[str, Any], mode: str, mc: int, error_cap: str,
                        estimator: str = 'mc') -> dict[str, Any] | None:
  if mode not in CALIBRATION_MODES:
    raise EvaluationError(f'--calibration must be one of {CALIBRATION_MODES}, got {mode!r}')
  record = meta.get('calibration') if mode == 'auto' else None
  if record is not None and record.get('estimator', 'mc') != estimator:
    logging.warning('The calibration was fitted for the %r σ estimator, this run uses %r: '
                    'rerun evaluate.py --calibrate --uncertainty=%s for a matching fit.',
                    record.get('estimator', 'mc'), estimator, estimator)
  if record is not None and (record.get('mc'), record.get('error_cap')) != (mc, error_cap):
    logging.warning('The calibration was fitted with mc=%s error_cap=%s, this run uses mc=%d '
                    'error_cap=%s: the σ it scales differ somewhat.', record.get('mc'),
                    record.get('error_cap'), mc, error_cap)
  return record


def evaluate(*, params: Any, meta: Mapping[str, Any], output_dir: str,
             splits: Sequence[str] = (), data_dir: str | None = None,
             apstar_files: Sequence[str] = (), mc: int = uncertainty.PAPER_NUM_DRAWS,
             error_cap: str = 'median', seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
             draw_chunk: int = DEFAULT_DRAW_CHUNK, make_figures: bool = True,
             num_threads: int = 4, calibration_mode: str = 'auto',
             estimator: str = 'mc', skipped_files: Sequence[tuple[str, str]] = ()
             ) -> dict[str, Any]:
  """Predicts every star, writes the catalogue, metrics and figures; returns what it wrote.

  ``estimator`` ('mc' or 'linear', see ``predict_batches``) is recorded, with the other run
  settings, in the catalogue header and metrics.json: ``sigma`` is 'mc', 'linear' or 'none'.

  Give ``splits`` (with ``data_dir``) for labelled stars of the built data set, or
  ``apstar_files`` for unlabelled apStar spectra (or both); ``skipped_files`` (path, reason),
  e.g. from ``apstar_inputs``, go into skipped.csv with the unreadable ones.
  ``calibration_mode='auto'`` scales the σ by ``meta['calibration']`` when present
  (``calibrate``), 'none' keeps the raw σ. ``estimator``: 'mc' (the paper's draws) or 'linear'
  (first-order propagation).
  Returns a dict with the output paths ('catalog_fits', 'catalog_csv', 'metrics_json' or None,
  'figures', 'skipped_csv' or None), 'n_stars', 'n_skipped', 'sigma', 'metrics' and 'seconds'.
  """
  if not splits and not apstar_files and not skipped_files:
    raise EvaluationError('nothing to evaluate: give --split (with --data_dir) or --apstar_dir')
  if splits and not data_dir:
    raise EvaluationError('--split needs --data_dir (the tfds data dir of the built data set)')
  for name, value, least in (('batch_size', batch_size, 1), ('mc', mc, 0),
                             ('draw_chunk', draw_chunk, 1)):
    if value < least:
      raise EvaluationError(f'--{name} must be >= {least}, got {value}')
  problem = output_dir_problem(output_dir)
  if problem:
    raise EvaluationError(f'--output_dir: {problem}')
  t0 = time.perf_counter()
  model = checkpoint.model_from_meta(meta)
  standardizer = checkpoint.standardizer_from_meta(meta)
  cal = _calibration_in_use(meta, calibration_mode, mc, error_cap, estimator)
  os.makedirs(output_dir, exist_ok=True)
  batch_size = _even_batch_size(batch_size)
  kwargs = dict(mc=mc, error_cap=error_cap, seed=seed, draw_chunk=draw_chunk,
                ensemble_size=checkpoint.ensemble_size(meta), estimator=estimator)
  sigma_source = 'none' if mc == 0 else estimator
  parts, data_sets = [], []
  for split in splits:
    batches, n = split_batches(data_dir, split, batch_size)
    logging.info('Predicting %d stars of split %r (σ: %s, mc=%d, error_cap=%s).', n, split,
                 sigma_source, mc, error_cap)
    # One noise stream per split: star 0 of dev and of test get different noise, and a split's
    # result does not depend on which other splits run with it.
    part = predict_batches(params, model, standardizer, batches, total=n, desc=split,
                           stream=_STREAMS[split], **kwargs)
    parts.append(part)
    data_sets.append(np.full(len(part['pred']), split))
  skipped: list[tuple[str, str]] = list(skipped_files)
  if apstar_files:
    logging.info('Predicting %d apStar files (σ: %s, mc=%d, error_cap=%s).', len(apstar_files),
                 sigma_source, mc, error_cap)
    part = predict_batches(
        params, model, standardizer,
        apstar_batches(apstar_files, batch_size, skipped=skipped, num_threads=num_threads),
        total=len(apstar_files), desc='apStar', stream=_STREAMS['apstar'], **kwargs)
    parts.append(part)
    data_sets.append(np.full(len(part['pred']), ''))
  skipped_csv = None
  if apstar_files or skipped_files:
    # Written before anything can fail: when no file at all is readable, this says why.
    skipped_csv = os.path.join(output_dir, SKIPPED_CSV)
    with file_io.atomic_path(skipped_csv) as tmp, open(tmp, 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['path', 'reason'])
      writer.writerows(skipped)
  if not parts or sum(len(p['pred']) for p in parts) == 0:
    raise EvaluationError(f'no star could be read ({len(skipped)} files skipped, listed in '
                          f'{skipped_csv})')
  merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  data_set = np.concatenate(data_sets)
  dtype_names = np.asarray([DATA_TYPES[i] if 0 <= i < len(DATA_TYPES) else ''
                            for i in merged['data_type'].astype(int)], dtype=str)
  sigma = calibration.apply(merged['pred_err'], cal)
  table = catalog.build_catalog(
      apogee_id=merged['apogee_id'], ra=merged['ra'], dec=merged['dec'], pred=merged['pred'],
      pred_err=sigma, pred_err_noise=merged['pred_err_noise'],
      pred_err_model=merged['pred_err_model'], snr=merged['snr'], labels=merged['labels'],
      data_set=data_set, data_type=dtype_names, calibrated=cal is not None, sigma=sigma_source,
      file=merged['file'])
  # 'mc' counts the draws actually made: none in linear mode.
  run_info = {'checkpoint': str(meta.get('checkpoint_dir', '')), 'step': meta.get('step'),
              'sigma': sigma_source, 'mc': int(mc) if sigma_source == 'mc' else 0,
              'error_cap': error_cap, 'seed': int(seed),
              'ensemble': checkpoint.ensemble_size(meta)}
  for k, v in run_info.items():
    table.meta[k.upper()[:8]] = '' if v is None else v
  table.meta['CALIB'] = 'dev' if cal is not None else 'none'
  run_info['calibration'] = ({k: cal[k] for k in ('a', 'b', 'n', 'step', 'split', 'mc')
                              if k in cal} if cal is not None else None)
  out = {'catalog_fits': os.path.join(output_dir, CATALOG_FITS),
         'catalog_csv': os.path.join(output_dir, CATALOG_CSV),
         'metrics_json': None, 'skipped_csv': skipped_csv, 'figures': [], 'metrics': None}
  catalog.write_fits(table, out['catalog_fits'])
  catalog.write_csv(table, out['catalog_csv'])
  labelled = bool(splits)
  if labelled:
    metrics = {'run': run_info, 'splits': {}}
    for split in splits:
      sel = data_set == split
      metrics['splits'][split] = compute_metrics(
          merged['pred'][sel], merged['labels'][sel], merged['data_type'][sel], standardizer,
          sigma=sigma[sel], raw_sigma=merged['pred_err'][sel])
    metrics['paper'] = {'table2_train_dev_test': PAPER_TABLE2, 'table3_test': PAPER_TABLE3}
    out['metrics_json'] = os.path.join(output_dir, METRICS_JSON)
    _write_json_atomic(metrics, out['metrics_json'])
    out['metrics'] = metrics
  if make_figures:
    out['figures'] = figures.make_figures(table, os.path.join(output_dir, FIGURES_DIR),
                                          with_labels=labelled)
  _remove_stale_outputs(output_dir, out)
  out['n_stars'] = len(table)
  out['sigma'] = sigma_source
  out['n_skipped'] = len(skipped)
  out['seconds'] = time.perf_counter() - t0
  out['table'] = table
  out['calibrated'] = cal is not None
  logging.info('Wrote %d stars to %s in %.1f s.', len(table), output_dir, out['seconds'])
  return out
