"""Training: the loop of paper §3.3–3.4 — epochs, early stopping, adaptation rounds, resume.

``train_and_evaluate(config, workdir)`` only orchestrates; each concern has its own module:
  ``train_state``  the model, fresh parameters (one network or a deep ensemble) and TrainState;
  ``optimizer``    the optax optimiser and learning-rate schedule of the config;
  ``steps``        the jitted data-parallel SGD and evaluation steps (``jax.shard_map``);
  ``train_inputs`` streamed, in-memory or device-resident inputs and each epoch's batches;
  ``epochs``       one epoch, one dev evaluation, metrics, early stopping, adaptation subsets;
  ``preemption``   stopping at a step boundary on SIGTERM/SIGINT;
  ``checkpoint``   saving and restoring the TrainState with its meta.

Here: ``_setup`` (data, model, restore), ``_train_one_epoch`` (steps, dev evaluation, metrics row,
checkpoint) and ``_next_adaptation_round`` (§3.4: restart from the best checkpoint with a fresh
Payne subset).

Deep ensembles (``config.ensemble_size`` K > 1): K networks that differ by initialisation and
dropout keys (member k is initialised exactly as a single run with seed ``config.seed + k``) and
see the same batches train in ONE jitted step (``steps``). Early stopping watches the MEAN of the
members' dev losses: all members train the same epochs and the best checkpoint holds all K at one
step, so no member is ever stopped, frozen or restored on its own. K = 1 keeps unstacked arrays.

Everything a resume needs lives in one pytree, ``TrainState``, saved by orbax every epoch
(and on SIGTERM/SIGINT, at a step boundary that every process agrees on: ``StopRequest``) in
WORKDIR/checkpoints; a run on an existing workdir (local or gs://…) resumes from the latest
checkpoint and ends with the same parameters as an uninterrupted run.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from apogeenet_jax import (
  checkpoint,
  config_validation,
  epochs,
  file_io,
  input_pipeline,
  memory_data,
  models,
  optimizer,
  resume,
  steps,
  train_inputs,
  workdir_lock,
)
from apogeenet_jax.constants import DATA_TYPES
from apogeenet_jax.metric_writer import MetricWriter
from apogeenet_jax.normalization import Standardizer
from apogeenet_jax.preemption import StopRequest
from apogeenet_jax.resume import ResumeMismatchError  # noqa: F401  (raised through training)
from apogeenet_jax.sharding import make_mesh, replicate
from apogeenet_jax.train_state import (
  TrainingError,
  TrainState,
  create_ensemble_state,
  create_model,
  inference_params,
  init_opt_state,
)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: file_io.PathLike, *,
                       sources: Mapping[str, Sequence] | None = None) -> TrainState:
  """Trains (and, with ``config.adapt``, adapts) until early stopping; returns the best state.

  Args:
    config: see configs/default.py.
    workdir: a local path or a URL (gs://…): WORKDIR/checkpoints (orbax: latest two + best),
      WORKDIR/metrics.jsonl, WORKDIR/tensorboard/. An existing workdir is resumed from its newest
      checkpoint that restores. One run at a time: the run holds WORKDIR/.lock (``workdir_lock``).
    sources: optional {'train': …, 'dev': …} random-access sources (tests); default
      ``open_split(config.data_dir, …)``.

  Returns:
    The final TrainState with the best parameters (lowest early-stopping loss) restored; after an
    interrupt (``StopRequest``), the state that was saved.

  Raises:
    workdir_lock.WorkdirLockedError: another run is using ``workdir``.
    config_validation.ConfigError: a config field outside its domain (nothing is written).
  """
  config_validation.validate(config)  # Before the workdir or anything else is made.
  workdir = file_io.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
    run, state, resumed = _setup(config, workdir, sources)
    try:
      if config.adapt and not resumed:
        state = _start_adaptation(run, state)
      with StopRequest(run.manager).installed() as stop:
        while not _finished(run, state):
          if epochs.should_stop_early(state, config.patience):  # The end of an adaptation round.
            state = _next_adaptation_round(run, state)
            continue
          state, interrupted = _train_one_epoch(run, state, stop)
          if interrupted:
            return state
    finally:
      run.writer.close()
    return _restore_best(run, state)


@dataclasses.dataclass(frozen=True)
class _Run:
  """What stays fixed during one run of ``train_and_evaluate``."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: Mesh
  manager: Any  # orbax CheckpointManager of WORKDIR/checkpoints
  abstract_state: TrainState
  meta: dict[str, Any]  # the checkpoint's JSON item
  standardizer: Standardizer
  writer: MetricWriter
  train_data: dict[str, Any]  # {'source'}, {'arrays'} or {'resident'}: see ``train_inputs.epoch_inputs``
  input_names: tuple[str, ...]  # the model's named inputs (``models.Family.inputs``)
  train_data_type: np.ndarray  # (n_train,) DATA_TYPES index of each training spectrum
  local_batch: int  # this process's share of config.batch_size
  train_steps: Callable
  evaluate: Callable[[Any], dict[str, float]]  # params → dev metrics (``evaluate_split``)

  @property
  def stop_loss_key(self) -> str:
    """The dev metric that early stopping watches: the MStar+YSO loss during adaptation."""
    return 'dev_adapt_loss' if self.config.adapt else 'dev_loss'

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def _standardizer(config, train_labels: np.ndarray, init_meta: Mapping | None) -> Standardizer:
  """The label normalisation, in the label space of the config's family (log10 Teff for Nets
  II and III): 'fit' on the training split (§3.1) or the family's authors' values ('paper')."""
  if init_meta is not None:  # Adaptation keeps the normalisation the model was trained with.
    return checkpoint.standardizer_from_meta(init_meta)
  family = models.get(config.model.get('name', models.DEFAULT_FAMILY))
  if config.standardizer == 'paper':
    if family.authors_labels is None:
      raise TrainingError(f"config.standardizer='paper': family {family.name!r} has no "
                          f"published label normalisation; use 'fit'")
    mean, std = family.authors_labels
    return Standardizer(mean=np.asarray(mean), std=np.asarray(std), space=family.label_space)
  if config.standardizer == 'fit':
    return Standardizer.fit(train_labels, family.label_space)
  raise TrainingError(f"config.standardizer must be 'fit' or 'paper', got "
                      f'{config.standardizer!r}')


def _batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[int, int]:
  """(this process's training batch, its evaluation batch); the global evaluation batch is
  rounded up to a multiple of the device count."""
  n_dev, processes = mesh.devices.size, jax.process_count()
  if config.batch_size % n_dev or config.batch_size % processes:
    raise TrainingError(f'batch_size {config.batch_size} is not divisible by {n_dev} devices')
  eval_batch = -(-config.eval_batch_size // n_dev) * n_dev
  return config.batch_size // processes, eval_batch // processes


def _same_place(a: file_io.PathLike, b: file_io.PathLike) -> bool:
  a, b = file_io.as_path(a), file_io.as_path(b)
  if file_io.is_remote(a) or file_io.is_remote(b):
    return str(a).rstrip('/') == str(b).rstrip('/')
  return os.path.realpath(a) == os.path.realpath(b)


def _initial_model(config: ml_collections.ConfigDict, train_source: Sequence,
                   train_vectors: Mapping[str, np.ndarray]
                   ) -> tuple[nn.Module, Any, dict[str, Any] | None]:
  """(model, params to start from or None, their checkpoint meta or None).

  Adaptation continues the init_from model: its architecture and normalisation, this config's
  dropout and optimiser.
  """
  if not config.adapt:
    model = create_model(config)
    if 'input_scale' in config.model:  # A family that scales its flux by one constant.
      model = model.clone(input_scale=train_inputs.resolve_input_scale(config, train_source))
    family = models.family_of(model)
    if family.fit_inputs is not None:  # Input statistics fitted on the training split.
      try:
        model = family.fit_inputs(model, train_vectors)
      except models.ModelError as e:
        raise TrainingError(f'{config.data_dir or "the training split"}: {e}') from e
    return model, None, None
  if not config.init_from:
    raise TrainingError('config.adapt needs config.init_from (the workdir of a default run)')
  init_dir = checkpoint.workdir_checkpoints(config.init_from)
  init_params, init_meta = checkpoint.load_params(init_dir, best=True)
  ensemble_size = int(config.get('ensemble_size', 1))
  if checkpoint.ensemble_size(init_meta) != ensemble_size:
    raise TrainingError(f'{init_dir}: an ensemble of {checkpoint.ensemble_size(init_meta)}, '
                        f'but config.ensemble_size is {ensemble_size}')
  logging.info('Adaptation starts from %s step %d.', init_dir, init_meta['step'])
  model = checkpoint.model_from_meta(init_meta).clone(dropout_rate=config.model.dropout_rate)
  return model, init_params, init_meta


def _setup(config: ml_collections.ConfigDict, workdir: epath.Path,
           sources: Mapping[str, Sequence] | None) -> tuple[_Run, TrainState, bool]:
  """Reads the data, builds or restores the state; returns (run, state, resumed)."""
  if config.adapt and config.init_from and _same_place(config.init_from, workdir):
    raise TrainingError(f'config.init_from={config.init_from} is this run\'s own workdir: '
                        f'adaptation starts from another run (configs/default.py); give it '
                        f'that run\'s workdir')
  mesh = make_mesh(config.get('num_devices', 0))
  local_batch, local_eval_batch = _batch_sizes(config, mesh)
  train_source, dev_source = train_inputs.open_sources(config, sources)
  mode, on_device = train_inputs.choose_input(config, len(train_source), len(dev_source), mesh)
  dev_indices = np.arange(len(dev_source))[jax.process_index()::jax.process_count()]
  train_data, train_meta, dev_arrays = train_inputs.read_splits(config, train_source, dev_source, mesh,
                                                    memory=mode == 'memory', on_device=on_device,
                                                    dev_indices=dev_indices)
  counts = {t: int(np.sum(train_meta['data_type'] == i)) for i, t in enumerate(DATA_TYPES)}
  logging.info('Training spectra per data type: %s; dev: %d', counts, len(dev_source))

  config = optimizer.resolve_decay_steps(config, input_pipeline.num_train_batches(
      len(train_source), local_batch, jax.process_count()))
  # Two latest (plus the best): a damaged newest step still leaves one to resume from.
  manager = checkpoint.make_manager(checkpoint.workdir_checkpoints(workdir), keep_latest=2)
  saved_meta = checkpoint.newest_meta(manager)
  if saved_meta is not None:  # Before anything is built from this config or init_from.
    resume.check_same_run(saved_meta, json.loads(config.to_json_best_effort()), workdir)
  model, init_params, init_meta = _initial_model(config, train_source, train_meta['vectors'])
  ensemble_size = int(config.get('ensemble_size', 1))
  tx = optimizer.create_optimizer(config.optim, config.batch_size)
  state = replicate(create_ensemble_state(config.seed, model, tx, config.init, ensemble_size,
                                          config.get('zero_last_layer', False)), mesh)
  if init_params is not None:  # Adaptation: the init_from network (with its batch-norm state).
    model_state = {k: v for k, v in init_params.items() if k != 'params'} if (
        'params' in init_params) else {}
    init_params = init_params.get('params', init_params)
    state = replicate(state.replace(params=init_params, model_state=model_state,
                                    opt_state=init_opt_state(tx, init_params, ensemble_size)),
                      mesh)
  abstract_state = checkpoint.abstract_state(state, mesh)
  restored = checkpoint.restore_newest(manager, checkpoint.to_saved(abstract_state),
                                       set_aside=jax.process_index() == 0)
  if restored is not None:
    latest, saved, saved_meta = restored
    state, standardizer = checkpoint.from_saved(saved), checkpoint.standardizer_from_meta(saved_meta)
    logging.info('Resumed %s at step %d (epoch %d, round %d).', workdir, latest,
                 int(state.epoch), int(state.adapt_round))
  else:
    latest, standardizer = None, _standardizer(config, train_meta['labels'], init_meta)

  meta = checkpoint.make_meta(
      model, standardizer, ensemble_size=ensemble_size, config=config,
      dataset={'data_dir': config.data_dir, 'name': config.dataset_name,
               'train_counts': counts, 'num_dev': len(dev_source)},
      init_from=config.init_from if config.adapt else '')
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.discard_after(latest)  # Rows of epochs after the checkpoint are done again.
  eval_step = steps.compiled_eval_step(model, mesh, ensemble_size)
  input_names = tuple(models.family_of(model).input_shapes(model))
  if on_device:  # The host copy of the flux goes once the devices hold theirs.
    train_data = {'resident': train_inputs.place_split(train_data.pop('arrays'), standardizer,
                                                       mesh, input_names)}
  evaluate = _dev_evaluator(config, dev_source, dev_arrays, dev_indices, local_eval_batch,
                            eval_step, input_names, standardizer, mesh)
  run = _Run(config=config, workdir=workdir, mesh=mesh, manager=manager,
             abstract_state=abstract_state, meta=meta, standardizer=standardizer, writer=writer,
             train_data=train_data, input_names=input_names,
             train_data_type=np.asarray(train_meta['data_type']),
             local_batch=local_batch, evaluate=evaluate,
             train_steps=steps.compiled_train_steps(model, optimizer.optimizer_key(config), mesh,
                                                     on_device, ensemble_size,
                                                     tuple(config.loss_weights),
                                                     train_inputs.noise_augmentation(config),
                                                     float(config.huber_delta)))
  return run, state, restored is not None


def _dev_evaluator(config: ml_collections.ConfigDict, dev_source: Sequence, dev_arrays: Any,
                   dev_indices: np.ndarray, local_eval_batch: int, eval_step: Callable,
                   input_names: Sequence[str], standardizer: Standardizer, mesh: Mesh
                   ) -> Callable[[Any], dict[str, float]]:
  """params → dev metrics, from memory (``dev_arrays``) or streamed from ``dev_source``."""
  process_count = jax.process_count()
  # Every process must run the same number of eval steps: pad to the largest shard.
  largest_shard = -(-len(dev_source) // process_count)
  num_batches = -(-largest_shard // local_eval_batch) if process_count > 1 else None

  def evaluate(params) -> dict[str, float]:
    if dev_arrays is not None:
      batches = memory_data.eval_batches(dev_arrays, local_eval_batch, indices=dev_indices,
                                         num_batches=num_batches)
    else:
      batches = input_pipeline.eval_batches(
          dev_source, local_eval_batch, indices=dev_indices, num_batches=num_batches,
          num_threads=config.num_threads)
    return epochs.evaluate_split(params, eval_step, batches, input_names, standardizer, mesh,
                                 'dev')

  return evaluate


def _save(run: _Run, state: TrainState, stop_loss: float | None = None) -> None:
  """Saves ``state`` at its step; ``stop_loss`` (None for an interrupt) ranks it for "best"."""
  step = int(state.step)
  if step in run.manager.all_steps():
    if stop_loss is None:
      return
    # An interrupt after the epoch's last step saved this step before the dev evaluation;
    # the epoch's end replaces it, else its dev loss would never count for "best".
    run.manager.delete(step)
  checkpoint.save(run.manager, step, checkpoint.to_saved(state), run.meta,
                  None if stop_loss is None else {checkpoint.BEST_METRIC: stop_loss})


def _start_adaptation(run: _Run, state: TrainState) -> TrainState:
  """Round 1 of §3.4 must beat the model it starts from: its MStar+YSO dev loss is the first
  ``best_stop_loss``, saved as step 0's checkpoint."""
  dev = run.evaluate(inference_params(state))
  loss0 = dev[run.stop_loss_key]
  if not np.isfinite(loss0):
    raise TrainingError('adaptation needs MStar or YSO stars in the dev split')
  state = replicate(state.replace(best_stop_loss=jnp.float32(loss0),
                                  best_adapt_loss=jnp.float32(loss0),
                                  adapt_round=jnp.int32(1)), run.mesh)
  run.writer.write_scalars(0, {**dev, 'epoch': 0, 'adapt_round': 0})
  _save(run, state, loss0)
  logging.info('Initial MStar+YSO dev loss %.5f', loss0)
  return state


def _finished(run: _Run, state: TrainState) -> bool:
  """Early stopping without adaptation, the last adaptation round, or max_epochs."""
  config = run.config
  if epochs.should_stop_early(state, config.patience):
    if not config.adapt:
      logging.info('Early stopping: %d evaluations without improvement.', config.patience)
      return True
    improved = float(state.best_stop_loss) < float(state.best_adapt_loss)
    without = 0 if improved else int(state.adapt_rounds_without_improvement) + 1
    if without >= config.adapt_patience or int(state.adapt_round) >= config.max_adapt_rounds:
      _log_round_end(state, improved)
      return True
    return False
  if int(state.epoch) >= config.max_epochs:
    logging.info('Reached max_epochs=%d.', config.max_epochs)
    return True
  return False


def _log_round_end(state: TrainState, improved: bool) -> None:
  logging.info('Adaptation round %d ended: best MStar+YSO dev loss %.5f (%s).',
               int(state.adapt_round), float(state.best_stop_loss),
               'improved' if improved else 'no improvement')


def _next_adaptation_round(run: _Run, state: TrainState) -> TrainState:
  """The end of an adaptation round that is not the last (§3.4): the next one starts from the
  best checkpoint, with the early-stopping counter reset."""
  improved = float(state.best_stop_loss) < float(state.best_adapt_loss)
  without = 0 if improved else int(state.adapt_rounds_without_improvement) + 1
  _log_round_end(state, improved)
  best = checkpoint.restore_train_state(run.manager, run.manager.best_step(), run.abstract_state)
  return replicate(state.replace(
      params=best.params, opt_state=best.opt_state, model_state=best.model_state,
      evals_without_improvement=jnp.int32(0), adapt_round=state.adapt_round + 1,
      # A fresh array: the same buffer twice in one donated pytree is an XLA error.
      best_adapt_loss=jnp.float32(float(state.best_stop_loss)),
      adapt_rounds_without_improvement=jnp.int32(without)), run.mesh)


def _epoch_indices(run: _Run, state: TrainState) -> np.ndarray:
  """The training rows of this epoch: all, or this adaptation round's (§3.4)."""
  if not run.config.adapt:
    return np.arange(len(run.train_data_type))
  return epochs.adaptation_indices(run.train_data_type, fraction=run.config.payne_fraction,
                            seed=run.config.seed, adapt_round=int(state.adapt_round))


def _train_one_epoch(run: _Run, state: TrainState, stop: StopRequest
                     ) -> tuple[TrainState, bool]:
  """One epoch (or its rest after a resume), then the dev evaluation, the metrics row and the
  checkpoint; an interrupt saves at the step reached instead. Returns (state, interrupted)."""
  config, epoch = run.config, int(state.epoch)
  indices = _epoch_indices(run, state)
  num_batches = input_pipeline.num_train_batches(len(indices), run.local_batch,
                                                 jax.process_count())
  if num_batches == 0:
    raise TrainingError(f'{len(indices)} training spectra make no batch of {config.batch_size}')
  inputs = train_inputs.epoch_inputs(config, run.train_data, run.standardizer, run.mesh,
                         input_names=run.input_names,
                         local_batch=run.local_batch, epoch=epoch, indices=indices,
                         start_batch=int(state.epoch_step))
  t0 = time.perf_counter()
  state, sums, interrupted = epochs.train_epoch(
      state, run.train_steps, inputs, batch_size=run.local_batch, num_batches=num_batches,
      stop_requested=stop, progress=run.is_main, log_every_steps=config.log_every_steps)
  if interrupted:
    _save(run, state)
    logging.warning('Interrupted: saved step %d of epoch %d in %s; rerun the same command to '
                    'resume.', int(state.step), epoch + 1, run.workdir)
    return state, True
  dev = run.evaluate(inference_params(state))
  state = state.replace(epoch=state.epoch + 1, epoch_step=jnp.int32(0))
  state, improved = epochs.update_early_stopping(
      state, dev[run.stop_loss_key], config.min_delta,
      counts=config.adapt or epoch + 1 >= config.early_stopping_from_epoch)
  state = replicate(state, run.mesh)
  scalars = {'epoch': epoch + 1, 'adapt_round': int(state.adapt_round),
             'epoch_seconds': time.perf_counter() - t0,
             'train_spectra_per_s': float(sums['spectra_per_s']) if sums else 0.0,
             **(epochs.summarize(sums, 'train') if sums else {}), **dev,
             'best_stop_loss': float(state.best_stop_loss)}
  # The row first, then the checkpoint: a kill in between costs a redone epoch (its row is
  # dropped on resume), never a lost row.
  run.writer.write_scalars(int(state.step), scalars)
  # "Best" for orbax (and so for evaluate.py) is the checkpoint early stopping chose: an epoch
  # that did not improve by min_delta is never best.
  _save(run, state, dev[run.stop_loss_key] if improved else float('inf'))
  logging.info(
      'epoch %d%s: train %.5f dev %.5f (Payne %.4f MStar %.4f YSO %.4f)%s, %.0f spectra/s',
      epoch + 1, f' round {int(state.adapt_round)}' if config.adapt else '',
      scalars.get('train_loss', float('nan')), dev['dev_loss'], dev['dev_loss_Payne'],
      dev['dev_loss_MStar'], dev['dev_loss_YSO'], ' *' if improved else '',
      scalars['train_spectra_per_s'])
  return state, False


def _restore_best(run: _Run, state: TrainState) -> TrainState:
  """``state`` with the params of the best checkpoint (lowest early-stopping loss)."""
  best = run.manager.best_step()
  if best is not None:
    best_state = checkpoint.restore_train_state(run.manager, best, run.abstract_state)
    state = state.replace(params=best_state.params, model_state=best_state.model_state)
    logging.info('Best checkpoint: step %d, %s %.5f.', best, run.stop_loss_key,
                 float(best_state.best_stop_loss))
  run.manager.close()
  return state
