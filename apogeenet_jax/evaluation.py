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

All of them are written to a staging folder and moved into ``output_dir`` only when every one is
written (``file_io.staged_outputs``): a failed run leaves the previous run's outputs whole.

The pieces: ``prediction`` (MC settings, streaming batches through the jitted function, shards of
the inputs), ``metrics`` (Tables 2–3, coverage), ``shards`` (part files and their merge),
``calibration`` (the σ calibration on dev), ``catalog`` and ``figures``. A shard predicts its stars
exactly as one run would, provided every shard has the same number of local devices as that run
(the per-device batch then has the same shape: XLA's float32 rounding depends on it); the
metrics are those of the whole catalogue, and the files are bit-identical to a one-shard run.
"""

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from apogeenet_jax import (
  apstar,
  calibration,
  catalog,
  checkpoint,
  figures,
  file_io,
  metrics,
  prediction,
  shards,
)
from apogeenet_jax.constants import DATA_TYPES
from apogeenet_jax.labels import Problem, write_problems
from apogeenet_jax.prediction import DEFAULT_BATCH_SIZE, EvaluationError, Shard
from apogeenet_jax.uncertainty import NO_SIGMA, MCSettings

CATALOG_FITS = 'catalog.fits'


CATALOG_CSV = 'catalog.csv'


METRICS_JSON = 'metrics.json'


SKIPPED_CSV = 'skipped.csv'


FIGURES_DIR = 'figures'


# A run that read no star writes its report here when an earlier run's catalogue is in the folder.
FAILED_SKIPPED_CSV = 'skipped-failed-run.csv'


CALIBRATION_MODES = ('auto', 'none')  # auto: apply the checkpoint's calibration when it has one


CALIBRATION_SPLIT = 'dev'


# An --apstar_list of a whole survey (~650k paths) is ~60 MB.
_MAX_LIST_BYTES = 1 << 30


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
  for name in (CATALOG_FITS, CATALOG_CSV, METRICS_JSON, SKIPPED_CSV):
    if (path / name).is_dir():
      return f'{path / name} is a directory; the run writes a file there (move it away)'
  if (path / FIGURES_DIR).exists() and not (path / FIGURES_DIR).is_dir():
    return f'{path / FIGURES_DIR} is a file; the run writes its figures into a folder there'
  if owner := _owned_by_another_program(path):
    return f'{path} is {owner}; the run would write (and replace files) there: give a folder of its own'
  # The nearest existing ancestor is where the folder would be created.
  existing = path.resolve()
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    return f'{path} cannot be created: {existing} is a file'
  if not os.access(str(existing), os.W_OK | os.X_OK):
    return f'{path} is not writable (no write permission on {existing})'
  return None


# Files that mark a folder as a built TFDS data set (its version folder) or a checkpoint folder.
_DATASET_MARKERS = ('dataset_info.json', 'features.json')
_CHECKPOINT_MARKERS = ('_CHECKPOINT_METADATA', 'calibration.json')


def _owned_by_another_program(path: epath.Path) -> str | None:
  """'a built data set', 'a checkpoint folder' or 'a training workdir' when ``path`` is one
  (its skipped.csv or calibration.json are not the evaluation's to replace), else None."""
  if not path.is_dir():
    return None
  if any((path / m).exists() for m in _DATASET_MARKERS):
    return 'a built data set'
  if any((path / m).exists() for m in _CHECKPOINT_MARKERS) or any(
      p.is_dir() and p.name.isdigit() and (p / '_CHECKPOINT_METADATA').exists()
      for p in path.iterdir()):
    return 'a checkpoint folder'
  if (path / checkpoint.CHECKPOINT_DIR).is_dir():
    return 'a training workdir (evaluate.py writes to WORKDIR/eval by default)'
  return None


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
    try:
      found, near_misses = apstar.scan_apstar_files(apstar_dir)
    except apstar.ApStarError as e:
      raise EvaluationError(f'--apstar_dir {e}') from None
    candidates += found
    skipped += [_problem(p, f'{p}: named like an apStar file but not apStar-<reduction>-'
                         '<APOGEE_ID>.fits[.gz] (nor asStar-…); rename it or give it in '
                         '--apstar_list') for p in near_misses]
  if apstar_list:
    if problem := file_io.regular_file_problem(apstar_list, _MAX_LIST_BYTES):
      raise EvaluationError(f'--apstar_list {apstar_list}: {problem}')
    try:
      lines = epath.Path(apstar_list).read_text().splitlines()
    except (OSError, UnicodeError) as e:
      raise EvaluationError(f'--apstar_list {apstar_list}: cannot read it ({e})') from None
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
  # Only names this program writes: a user's figures/my_plot.png is not ours to delete.
  ours = [output_dir / name for name in (CATALOG_FITS, CATALOG_CSV, METRICS_JSON, SKIPPED_CSV)]
  ours += [output_dir / FIGURES_DIR / name for name in figures.FIGURE_NAMES]
  for path in ours:
    if path.is_file() and str(path) not in written:
      logging.info('Removing %s: left by an earlier run, not written by this one.', path)
      path.unlink()


def _write_outputs(merged: Mapping[str, np.ndarray], header: Mapping[str, Any],
                   output_dir: epath.Path, make_figures: bool) -> dict[str, Any]:
  """Writes skipped.csv, the catalogue, metrics.json and the figures; returns what it wrote.

  All of them go to a staging folder first and move into ``output_dir`` only when every one is
  written (``file_io.staged_outputs``): a failure (disk full, a folder in the way) leaves the
  previous run's outputs whole and adds nothing of this one.
  """
  out = {'catalog_fits': None, 'catalog_csv': None, 'metrics_json': None, 'skipped_csv': None,
         'figures': [], 'metrics': None, 'part': None, 'n_skipped': len(merged['problems'])}
  merged = _without_unsupported(merged, header['run']['sigma'])
  problems = [Problem(*row) for row in merged['problems'].tolist()]
  if len(merged['pred']) == 0:
    # A failed run: the report says why, beside (never over) an earlier run's catalogue.
    out['skipped_csv'] = (output_dir / (SKIPPED_CSV if not (output_dir / CATALOG_FITS).exists()
                                        else FAILED_SKIPPED_CSV))
    if header['apstar'] or problems:
      write_problems(problems, out['skipped_csv'])
    raise EvaluationError(f'no star could be read ({out["n_skipped"]} files skipped, listed in '
                          f'{out["skipped_csv"]})')
  table = _build_table(merged, header)
  try:
    with file_io.staged_outputs(output_dir) as stage:
      # A split's stars that fail the spectrum rules are listed too: nothing is lost silently.
      if header['apstar'] or problems:
        out['skipped_csv'] = str(output_dir / SKIPPED_CSV)
        write_problems(problems, stage / SKIPPED_CSV)
      catalog.write_fits(table, stage / CATALOG_FITS)
      catalog.write_csv(table, stage / CATALOG_CSV)
      out['catalog_fits'] = str(output_dir / CATALOG_FITS)
      out['catalog_csv'] = str(output_dir / CATALOG_CSV)
      if header['splits']:
        out['metrics'] = metrics.catalog_metrics(merged, header)
        out['metrics_json'] = str(output_dir / METRICS_JSON)
        _write_json_atomic(out['metrics'], stage / METRICS_JSON)
      if make_figures:
        staged = figures.make_figures(table, str(stage / FIGURES_DIR),
                                      with_labels=bool(header['splits']))
        out['figures'] = [str(output_dir / FIGURES_DIR / os.path.basename(p)) for p in staged]
  except (OSError, catalog.CatalogError, UnicodeError) as e:
    raise EvaluationError(f'{output_dir}: the outputs of this run could not be written, the '
                          f'earlier ones are unchanged: {e}') from e
  _remove_stale_outputs(output_dir, out)
  out.update(n_stars=len(table), table=table, sigma=header['run']['sigma'],
             calibrated=header['calibration'] is not None)
  logging.info('Wrote %d stars to %s.', len(table), output_dir)
  return out


def _without_unsupported(merged: Mapping[str, np.ndarray], sigma: str) -> dict[str, np.ndarray]:
  """``merged`` without the stars whose prediction, or σ when one was asked for, is not finite
  (a float32 overflow in the network or its Jacobian): they go to the skip report with the
  reason, so no catalogue row carries a number the data cannot support."""
  n = len(merged['pred'])
  bad = ~np.all(np.isfinite(merged['pred']), axis=1)
  if sigma != NO_SIGMA:
    bad |= ~np.all(np.isfinite(merged['pred_err_noise']), axis=1)
  if not bad.any():
    return dict(merged)
  out = {k: (v[~bad] if k != 'problems' and len(v) == n else v) for k, v in merged.items()}
  reason = (f'the prediction or its σ ({sigma}) is not finite (float32 overflow in the network or '
            'its Jacobian): no catalogue row')
  rows = np.stack([merged['file'][bad], merged['apogee_id'][bad],
                   np.full(int(bad.sum()), reason)], 1).astype(str)
  out['problems'] = np.concatenate([np.asarray(merged['problems'], str).reshape(-1, 3), rows])
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
      file=merged['file'], no_photometry=merged.get('no_photometry'))
  for k, v in header['run'].items():
    table.meta[k.upper()[:8]] = '' if v is None else v
  table.meta['CALIB'] = 'dev' if cal is not None else 'none'
  return table


def calibrate(*, params: Any, meta: Mapping[str, Any], data_dir: str | epath.PathLike,
              settings: MCSettings = MCSettings(), batch_size: int = DEFAULT_BATCH_SIZE,
              save: bool = True, floor: str = 'auto') -> dict[str, Any]:
  """Fits σ_cal² = (a σ)² + b² per label on the dev split (``calibration``); returns the record.

  ``floor``: how b may vary, one of ``calibration.FLOOR_CHOICES`` ('auto': constant or a function
  of the star's predicted labels, chosen per label by cross-validation on the dev split;
  'constant': one b per label).

  ``settings`` (their ``record()``, stored as the record's 'settings') say which σ_noise the fit
  is made for: on the demo network the linear σ is ~0.9× the MC's with the default 2 draws and
  ~1.2× with 0, so a fit carries over only to the estimator it was made with; ``evaluate`` warns
  on a mismatch.

  The dev stars are predicted exactly as ``evaluate(splits=['dev'])`` would (same noise stream).
  With ``save`` the record goes to ``meta['checkpoint_dir']/calibration.json``, tied to
  ``meta['step']``, where every later ``load_checkpoint`` of that step finds it.
  """
  if settings.mc < 1:
    raise EvaluationError('--calibrate needs Monte Carlo draws (--mc >= 1): σ_noise is part of '
                          'the fitted total')
  if settings.estimator == 'mc' and settings.mc < calibration.MIN_CALIBRATION_DRAWS:
    raise EvaluationError(f'--calibrate needs at least --mc={calibration.MIN_CALIBRATION_DRAWS}'
                          f' draws, got {settings.mc}: σ of fewer draws is mostly noise itself, '
                          f'and the fit would replace a good one')
  if not data_dir:
    raise EvaluationError('--calibrate needs --data_dir (it fits on the dev split)')
  if save and (problem := _calibration_unwritable(meta)):
    raise EvaluationError(problem)  # Before minutes of prediction, not after.
  split = CALIBRATION_SPLIT
  part = prediction.predict_inputs(params, meta, settings, prediction.even_batch_size(batch_size),
                         prediction.input_sources([split], data_dir, ()), Shard())
  standardizer = checkpoint.standardizer_from_meta(meta)
  try:
    record = calibration.fit(part['pred'], part['labels'], part['pred_err'], standardizer.std,
                             floor=floor, space=standardizer.space, step=meta.get('step'),
                             split=split,
                             settings=settings.record(),
                             ensemble_size=checkpoint.ensemble_size(meta),
                             params_digest=meta.get('params_digest'))
  except calibration.CalibrationError as e:
    raise EvaluationError(f'{data_dir} {split} split: {e}') from e
  logging.info('Calibration: %s', calibration.describe(record))
  if save:
    if not meta.get('checkpoint_dir') or meta.get('step') is None:
      raise EvaluationError('cannot store a calibration: meta has no checkpoint_dir/step '
                            '(load it with load_checkpoint)')
    try:
      record['path'] = calibration.save(meta['checkpoint_dir'], record)
    except calibration.CalibrationError as e:
      raise EvaluationError(str(e)) from e
  return record


def _calibration_unwritable(meta: Mapping[str, Any]) -> str | None:
  """Why calibration.json cannot be written beside the checkpoint, or None (local folders only:
  object storage shows its permissions when writing)."""
  directory = meta.get('checkpoint_dir')
  if not directory or file_io.is_remote(directory):
    return None
  path = calibration.path_in(directory)
  if not os.access(directory, os.W_OK | os.X_OK) or (path.exists()
                                                      and not os.access(path, os.W_OK)):
    return (f'{path}: cannot store a calibration there (no write permission); copy the '
            f'checkpoint to a writable folder and calibrate that copy')
  return None


def _calibration_in_use(meta: Mapping[str, Any], mode: str, settings: MCSettings
                        ) -> dict[str, Any] | None:
  if mode not in CALIBRATION_MODES:
    raise EvaluationError(f'--calibration must be one of {CALIBRATION_MODES}, got {mode!r}')
  if mode == 'auto' and meta.get('calibration_problem') and 'calibration' not in meta:
    raise EvaluationError(f'{meta["calibration_problem"]}. Fix or delete that file, fit a new '
                          'one with evaluate.py --calibrate, or use --calibration=none for the '
                          'raw σ')
  record = meta.get('calibration') if mode == 'auto' else None
  if record is None or settings.sigma == NO_SIGMA:
    return record
  fitted, now = calibration.fitted_settings(record), settings.record()
  # The estimator and its own settings change σ a lot; the draws and the cap somewhat; the
  # seed not at all.
  common = ('mc', 'error_cap', 'seed')
  if {k: v for k, v in fitted.items() if k not in common} != {
      k: v for k, v in now.items() if k not in common}:
    logging.warning('The calibration was fitted for σ settings %s, this run uses %s: rerun '
                    'evaluate.py --calibrate with this run\'s --uncertainty (and its flags) for '
                    'a matching fit.', fitted, now)
  elif (fitted.get('mc'), fitted.get('error_cap')) != (now['mc'], now['error_cap']):
    logging.warning('The calibration was fitted with mc=%s error_cap=%s, this run uses mc=%d '
                    'error_cap=%s: the σ it scales differ somewhat.', fitted.get('mc'),
                    fitted.get('error_cap'), now['mc'], now['error_cap'])
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
             shard: Shard | None = None,
             photometry: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Predicts every star, writes the catalogue, metrics and figures; returns what it wrote.

  Give ``splits`` (with ``data_dir``) for labelled stars of the built data set, or
  ``apstar_files`` for unlabelled apStar spectra (or both); ``skipped_files`` (e.g. from
  ``apstar_inputs``) go into skipped.csv with the unreadable ones. ``photometry``
  ({APOGEE_ID: (values, errors)}, ``labels.read_photometry_table``): the photometry of the
  apStar files' stars, for a network that reads it (APOGEE Net II). ``settings`` (the σ estimator,
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
  shard = prediction.process_shard() if shard is None else shard
  t0 = time.perf_counter()
  cal = _calibration_in_use(meta, calibration_mode, settings)
  batch_size = prediction.even_batch_size(batch_size)
  sources = list(prediction.input_sources(splits, data_dir, apstar_files, photometry))
  header = shards.run_header(meta, settings, cal, sources=sources, splits=splits,
                       apstar=bool(apstar_files or skipped_files), batch_size=batch_size,
                       shard=shard)
  part = prediction.predict_inputs(params, meta, settings, batch_size, sources, shard)
  if shard.index == 0:  # Files left out before reading are reported once, by shard 0.
    listed = np.asarray([dataclasses.astuple(p) for p in skipped_files], str).reshape(-1, 3)
    part['problems'] = np.concatenate([listed, part['problems']])
  output_dir = epath.Path(output_dir)
  if shard.count == 1:
    out = _write_outputs(*shards.merge_parts([(part, header)]), output_dir, make_figures)
  elif distributed:
    everything = shards.gather_parts(shards.part_bytes(part, header))
    out = (_not_written(part) if everything is None else _write_outputs(
        *shards.merge_parts([shards.read_part(d, f'process {k}') for k, d in enumerate(everything)]),
        output_dir, make_figures))
  else:
    out = _not_written(part)
    out['part'] = str(output_dir / shards.part_name(shard))
    output_dir.mkdir(parents=True, exist_ok=True)
    with file_io.atomic_path(out['part']) as tmp:
      epath.Path(tmp).write_bytes(shards.part_bytes(part, header))
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
  paths = shards.find_parts(parts)
  out = _write_outputs(*shards.merge_parts([shards.read_part(p.read_bytes(), str(p)) for p in paths]),
                       epath.Path(output_dir), make_figures)
  out['seconds'] = time.perf_counter() - t0
  return out
