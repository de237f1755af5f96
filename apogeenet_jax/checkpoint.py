"""Orbax checkpoints that carry everything needed to predict: the one owner of their format.

Layout: an orbax ``CheckpointManager`` directory; each step holds two items,
  ``state``: a pytree with a ``params`` entry (a whole TrainState during training, ``to_saved``;
             just the parameters for converted weights and the YSO network, ``params_only``), and
  ``meta``:  JSON (``make_meta``) with the label order, the target normalisation, the model's
             constructor arguments, ``ensemble_size`` K (params of K > 1 carry a leading member
             axis of length K) and the run's config,
so that a checkpoint alone — from training, ``convert_torch`` or ``yso_photometric`` — is enough
to predict. Nothing outside this module builds a meta or names the saved items.
A ``calibration.json`` beside the steps (``calibration``) is read into ``meta['calibration']``.
A training run keeps its steps in WORKDIR/checkpoints (``CHECKPOINT_DIR``, ``workdir_checkpoints``).
Directories are ``etils.epath`` paths: local, or object storage such as ``gs://…`` (orbax writes
the arrays there through TensorStore's GCS driver).
"""

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from apogeenet_jax import calibration, file_io, models
from apogeenet_jax.constants import LABEL_NAMES
from apogeenet_jax.normalization import Standardizer
from apogeenet_jax.train_state import TrainState


class _QuietOrbaxInfo(logging.Filter):
  """Drops orbax's INFO lines (a dozen per save, through absl's logger); keeps its warnings."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


logging.getLogger('absl').addFilter(_QuietOrbaxInfo())


class _QuietFailedWrites(logging.Filter):
  """Drops the ERROR lines of a failed checkpoint write: orbax's writer threads each log the
  whole traceback (naming the step's temporary folder), some after ``save`` has raised, and
  asyncio logs the sibling writes' futures as 'never retrieved' when they are collected at
  exit. ``save`` reports the failure as one CheckpointError."""

  MARKS = ('.orbax-checkpoint-tmp', 'No space left on device')

  def __init__(self, source: str = ''):
    super().__init__()
    self.source = source  # a part of the logging file's path, '' for any

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or self.source not in record.pathname:
      return True
    text = record.getMessage()
    return not any(mark in text for mark in self.MARKS)


logging.getLogger('absl').addFilter(_QuietFailedWrites(f'{os.sep}orbax{os.sep}'))
logging.getLogger('asyncio').addFilter(_QuietFailedWrites())


def _drop_closed_loop_callbacks(previous):
  """After a failed write, TensorStore's completion callbacks still arrive for the event loop
  that orbax made for the save and has closed; each prints 'Event loop is closed' through
  ``sys.unraisablehook``. Nothing waits for them, so they are dropped; all else goes on."""

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
      previous(unraisable)

  return hook


sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)

# The folder of a workdir that holds the orbax steps: defined here only.
CHECKPOINT_DIR = 'checkpoints'
STATE_ITEM = 'state'
META_ITEM = 'meta'
BEST_METRIC = 'dev_loss'


# A damaged step makes orbax and tensorstore raise many types: ValueError (OUT_OF_RANGE, bad
# JSON), KeyError (a deleted item), FileNotFoundError, and a bare Exception for a truncated
# array data file. All of them mean "this step cannot be restored".
_RESTORE_ERRORS = (Exception,)


class CheckpointError(RuntimeError):
  """A checkpoint directory is missing, empty, incomplete or damaged."""


def make_meta(model: nn.Module, standardizer: Standardizer, *, ensemble_size: int = 1,
              label_names: Sequence[str] = LABEL_NAMES,
              config: ml_collections.ConfigDict | None = None, **extra: Any) -> dict[str, Any]:
  """The JSON saved beside the arrays, for every network of this package: the output order
  ``label_names`` and their normalisation, the module's constructor arguments, K, the run's
  ``config`` (as JSON) and any ``extra`` entries."""
  meta = {'label_names': list(label_names),
          'normalization': {**standardizer.to_dict(), 'label_names': list(label_names)},
          'model': models.model_config(model), 'ensemble_size': int(ensemble_size), **extra}
  if config is not None:
    meta['config'] = json.loads(config.to_json_best_effort())
  return meta


def ensemble_size(meta: Mapping[str, Any]) -> int:
  """K of a checkpoint; checkpoints written before ensembles existed hold one network."""
  return int(meta.get('ensemble_size', 1))


def model_from_meta(meta: Mapping[str, Any]) -> nn.Module:
  """The module of a checkpoint: its family (meta['model']['name']; none: APOGEE Net I, as
  written before the model registry) built from the recorded constructor arguments."""
  try:
    return models.from_meta(meta)
  except models.ModelError as e:
    raise CheckpointError(f'checkpoint meta: {e}') from e


def standardizer_from_meta(meta: Mapping[str, Any]) -> Standardizer:
  return Standardizer.from_dict(meta['normalization'])


def workdir_checkpoints(workdir: file_io.PathLike) -> epath.Path:
  """WORKDIR/checkpoints, absolute (orbax refuses relative directories)."""
  return file_io.as_path(workdir) / CHECKPOINT_DIR


def make_manager(directory: file_io.PathLike, *, keep_latest: int = 1, create: bool = True
                 ) -> ocp.CheckpointManager:
  """A manager that keeps the latest ``keep_latest`` steps and the best one.

  "Best" is the lowest ``metrics['dev_loss']`` passed to ``save``; steps saved without metrics
  (converted weights) count as latest only.
  """
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(keep_latest),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True,
                                    n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=lambda m: m[BEST_METRIC], best_mode='min',
      create=create, enable_async_checkpointing=False)
  return ocp.CheckpointManager(file_io.as_path(directory), options=options,
                               item_names=(STATE_ITEM, META_ITEM))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any],
         metrics: Mapping[str, float] | None = None, *, force: bool = False) -> None:
  """Writes one step: ``state`` (a saved TrainState, ``to_saved``, or ``params_only``) and
  ``meta`` (``make_meta``); ``metrics`` with ``BEST_METRIC`` make it a candidate for best.

  A failure (disk full, permissions) is one CheckpointError, and orbax's
  temporary folder of the step is removed: the earlier steps stay as they were."""
  try:
    manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(dict(meta))}),
                 metrics=dict(metrics) if metrics is not None else None, force=force)
    manager.wait_until_finished()
  except Exception as e:  # OSError, or tensorstore's and orbax's own wrappers of it.
    directory = epath.Path(manager.directory)
    if jax.process_index() == 0 and directory.is_dir():
      for tmp in directory.iterdir():
        if tmp.name.startswith(f'{step}.orbax-checkpoint-tmp'):
          tmp.rmtree(missing_ok=True)
    raise CheckpointError(
        f'{directory}: cannot save step {step}: {_reason(e)}. The earlier steps are intact: '
        f'free space (or fix the folder) and rerun the same command to resume from the '
        f'newest one.') from e


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any
                  ) -> tuple[Any, dict[str, Any]]:
  """Restores the full ``state`` pytree of ``step`` into the structure of ``abstract_state``."""
  out = manager.restore(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardRestore(abstract_state), META_ITEM: ocp.args.JsonRestore()}))
  return out[STATE_ITEM], dict(out[META_ITEM])


# On disk the early-stopping best keeps its first name, so checkpoints written before the field
# was renamed still restore (orbax matches the tree by key).
_SAVED_NAMES = {'best_stop_loss': 'best_dev_loss'}


# Saved only when not empty (a family with batch norm): a stateless network's checkpoint keeps
# the layout it had before the field existed, and those checkpoints restore as they are.
_OPTIONAL = ('model_state',)


def to_saved(state: TrainState) -> dict[str, Any]:
  """A TrainState as the ``state`` item is saved: a dict of its fields under their saved names."""
  return {_SAVED_NAMES.get(f.name, f.name): getattr(state, f.name)
          for f in dataclasses.fields(state)
          if not (f.name in _OPTIONAL and not jax.tree.leaves(getattr(state, f.name)))}


def from_saved(saved: Mapping[str, Any]) -> TrainState:
  """The inverse of ``to_saved``."""
  return TrainState(**{f.name: saved[_SAVED_NAMES.get(f.name, f.name)]
                       for f in dataclasses.fields(TrainState)
                       if _SAVED_NAMES.get(f.name, f.name) in saved})


def params_only(params: Any, model_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The ``state`` item of a network saved without its training state (converted weights, the
  YSO photometric network); ``load_params`` reads it like a TrainState's. ``model_state``: the
  network's other variable collections (batch norm's statistics), saved when not empty."""
  out = {'params': params}
  if model_state and jax.tree.leaves(model_state):
    out['model_state'] = dict(model_state)
  return out


def abstract_state(state: TrainState, mesh: Mesh) -> TrainState:
  """The shapes, dtypes and (replicated) shardings a restore of ``state`` fills in."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract: TrainState
                        ) -> TrainState:
  """The TrainState saved at ``step``, shaped and placed like ``abstract``."""
  saved, _ = restore_state(manager, step, to_saved(abstract))
  return from_saved(saved)


def step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """The folder of ``step`` (orbax names it by the bare step number)."""
  return epath.Path(manager.directory) / str(step)


def restore_newest(manager: ocp.CheckpointManager, abstract_state: Any, *,
                   set_aside: bool = True) -> tuple[int, Any, dict[str, Any]] | None:
  """(step, state, meta) of the newest step that restores; None when there is no step.

  A step that fails to restore (a disk filled up or a copy was cut short) is logged with the
  reason and skipped. Once an older step restores, the broken newer ones are moved to
  ``<directory>.corrupt/`` when ``set_aside`` (pass it on one process only): orbax would
  otherwise refuse to save those step numbers again, and the evidence is kept, not deleted.

  Raises:
    CheckpointError: steps exist but none restores; names each step folder and its error.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = restore_state(manager, step, abstract_state)
    except _RESTORE_ERRORS as e:
      reason = _reason(e)
      absl_logging.warning('Checkpoint step %d (%s) cannot be restored, skipped: %s', step,
                           step_dir(manager, step), reason)
      failures.append((step, reason))
      continue
    if failures:
      if set_aside:
        directory = epath.Path(manager.directory)
        aside = directory.parent / f'{directory.name}.corrupt'
        aside.mkdir(parents=True, exist_ok=True)
        for bad, _ in failures:
          target = aside / f'{bad}-{time.strftime("%Y%m%dT%H%M%S")}'
          step_dir(manager, bad).rename(target)
          absl_logging.warning('Moved the broken step %d to %s.', bad, target)
      # Every process must forget the moved steps, or a later save of that step number would
      # be skipped on some processes and entered on others.
      ocp.multihost.sync_global_processes('apogeenet_set_aside_broken_steps')
      manager.reload()
      absl_logging.warning('Resuming from step %d, the newest checkpoint that restores.', step)
    return step, state, meta
  if not failures:
    return None
  listing = '; '.join(f'{step_dir(manager, s)}: {r}' for s, r in failures)
  raise CheckpointError(
      f'{manager.directory}: no step restores ({listing}). If this run\'s config differs from '
      f'the one that saved them (model, ensemble_size), the steps may be intact: rerun with that '
      f'config. Otherwise restore the folder from a backup, or start afresh in a new workdir '
      f'(or move {manager.directory} away).')


def newest_meta(manager: ocp.CheckpointManager) -> dict[str, Any] | None:
  """The ``meta`` item of the newest step whose meta reads (no arrays restored), or None.

  A resume compares it with the new run's before restoring the state: a state saved by another
  model shape cannot restore, and that must not read as a damaged checkpoint.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      out = manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
    except _RESTORE_ERRORS:
      continue
    return dict(out[META_ITEM])
  return None


def _reason(e: BaseException) -> str:
  """One line: tensorstore's messages run over many lines of JSON spec."""
  text = str(e)
  if 'No space left on device' in text or "os_error_code='28'" in text:
    return 'No space left on device'
  lines = text.strip().splitlines()
  return f'{type(e).__name__}: {lines[0][:200] if lines else ""}'


def load_params(directory: file_io.PathLike, *, step: int | None = None, best: bool = True
                ) -> tuple[Any, dict[str, Any]]:
  """Params and meta from any checkpoint directory of this package (local or gs://…).

  Takes the best step (lowest dev loss) when ``best`` and one exists, else the latest, unless
  ``step`` names one. Only the ``params`` subtree is returned; optimiser state is ignored.
  """
  directory = file_io.as_path(directory)
  if not directory.is_dir():
    raise CheckpointError(f'{directory}: no such checkpoint directory')
  manager = make_manager(directory, create=False)
  if step is None:
    step = manager.best_step() if best else manager.latest_step()
    step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'{directory}: holds no checkpoint steps')
  try:
    out = manager.restore(step, args=ocp.args.Composite(**{
        # Saved on other device ids (process 0 of one run; another process of this one): onto ours.
        STATE_ITEM: ocp.args.StandardRestore(
            fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])),
        META_ITEM: ocp.args.JsonRestore()}))
  except _RESTORE_ERRORS as e:
    raise CheckpointError(f'{directory}: step {step} cannot be restored (step folder '
                          f'{directory / str(step)}): {_reason(e)}') from e
  where = f'{directory}: step {step}'
  meta = _checked_meta(dict(out[META_ITEM]), where)
  meta['step'] = int(step)
  params = _checked_params(out[STATE_ITEM], ensemble_size(meta), where)
  meta['params_digest'] = params_digest(params)
  _attach_calibration(meta, directory, step)
  return params, meta


def params_digest(params: Any) -> str:
  """sha256 (16 hex digits) of the parameters' names, shapes, dtypes and bytes: the identity
  of a checkpoint's weights, which a step number is not (a retrained run reuses the numbers)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    array = np.asarray(leaf)
    h.update(f'{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype}'.encode())
    h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()[:16]


def _checked_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
  for key in ('normalization', 'model'):
    if key not in meta:
      raise CheckpointError(f'{where} meta lacks {key!r}')
  return meta


def _checked_params(state: Any, k: int, where: str) -> Any:
  """The params of a restored ``state`` item — for a network with state (batch norm) its Flax
  variables {'params': …, 'batch_stats': …}, which ``uncertainty.model_apply_fn`` takes alike;
  for K > 1 every leaf must lead with K members."""
  params = state['params'] if isinstance(state, Mapping) else getattr(state, 'params', None)
  if params is None:
    raise CheckpointError(f'{where} has no params in its state')
  if 'params' in params and len(params) == 1:  # a linen variables dict {'params': {...}}
    params = params['params']
  model_state = state.get('model_state') if isinstance(state, Mapping) else None
  if model_state and jax.tree.leaves(model_state):
    params = {'params': params, **model_state}
  leading = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(params)}
  if k > 1 and leading != {k}:
    raise CheckpointError(f'{where} meta says ensemble_size {k} but the params have leading '
                          f'axes {sorted(map(str, leading))}')
  return params


def _attach_calibration(meta: dict[str, Any], directory: epath.Path, step: int) -> None:
  """meta['calibration'] = the directory's calibration.json when it was fitted for ``step``
  and these very parameters (``params_digest``).

  A file that cannot be used goes to meta['calibration_problem'] instead of raising: loading
  the weights must still work for ``--calibration=none`` and for ``--calibrate``, which
  replaces it; ``evaluation`` refuses to run with the calibration on (``auto``) and says why.
  """
  log = logging.getLogger('absl')
  try:
    record = calibration.load(directory)
  except calibration.CalibrationError as e:
    meta['calibration_problem'] = str(e)
    log.warning('%s', e)
    return
  if record is None:
    return
  path = calibration.path_in(directory)
  if int(record['step']) != int(step):
    log.warning('%s: calibration fitted for step %s, not for the restored step %d: ignored (run '
                'evaluate.py --calibrate again).', path, record['step'], step)
  elif record.get('params_digest') != meta['params_digest']:
    log.warning('%s: calibration fitted for other weights at step %d (parameter digest %s, these '
                'are %s; a retrained model?): ignored (run evaluate.py --calibrate again).',
                path, step, record.get('params_digest', 'not recorded'), meta['params_digest'])
  else:
    meta['calibration'] = record
