"""Whether a run may resume a workdir: the saved config against the new one.

Every config field defines the run — the data, the whole ``config.model`` (the family and all
its constructor arguments) and ``config.optim``, the recipe, and any field added later — except
the execution fields of ``_RESUMABLE``, which may change between the runs of one training. Runs
saved by earlier versions are read in today's layout first (``_SAVED_DEFAULTS``,
``_MOVED_TO_MODEL``).
"""

from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath

from apogeenet_jax.models.apogee_net import PAPER_CHANNELS, PAPER_HIDDEN
from apogeenet_jax.train_state import TrainingError


class ResumeMismatchError(TrainingError):
  """A workdir holds checkpoints of another run (other data, model or optimiser)."""


# Config fields a resume may change: how the run is executed (threads, input path, devices,
# logging) and when it stops (max_epochs only while it does not set the length of a cosine
# schedule to the end of the run, optim.decay_steps = 0: the refusal then says so). Every other field defines the run — the data, the whole
# ``config.model`` and ``config.optim``, the recipe — and a resume refuses a change of it, so a
# field added later is protected without being listed anywhere.
_RESUMABLE = frozenset({
    'num_threads', 'prefetch_batches', 'input_mode', 'memory_budget_gb', 'memory_dtype',
    'data_on_device', 'device_memory_budget_gb', 'steps_per_call', 'eval_batch_size',
    'max_epochs', 'patience', 'min_delta', 'early_stopping_from_epoch', 'adapt_patience',
    'max_adapt_rounds', 'num_devices', 'multihost', 'log_every_steps'})
# Fields that runs saved by earlier versions lack, and the value they trained with: before
# config.model listed the paper's architecture it was empty; before config.loss_weights the loss
# was the plain MSE (and the square until config.huber_delta); before config.noise_augmentation
# the spectra were used as stored; before the
# model registry every run was an APOGEE Net I.
_SAVED_DEFAULTS = {'model.name': 'apogee_net', 'model.channels': list(PAPER_CHANNELS),
                   'model.hidden': list(PAPER_HIDDEN), 'loss_weights': [1.0, 1.0, 1.0],
                   'noise_augmentation': 0.0, 'huber_delta': 0.0}
# Fields that moved into config.model with the registry: their old top-level names.
_MOVED_TO_MODEL = ('flux_scaling', 'input_scale', 'dropout_rate')


def _flat(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out


def _upgraded(saved: dict[str, Any]) -> dict[str, Any]:
  """A flat saved config in today's layout (``_MOVED_TO_MODEL``)."""
  for key in _MOVED_TO_MODEL:
    if key in saved:
      saved.setdefault(f'model.{key}', saved.pop(key))
  return saved


def check_same_run(saved_meta: Mapping[str, Any], config_json: Mapping[str, Any],
                    workdir: epath.Path) -> None:
  """Refuses a resume with another data set, model or optimiser; warns on other changes."""
  if 'config' not in saved_meta:
    return  # Checkpoints without a config (converted weights): nothing to compare.
  old = {**_SAVED_DEFAULTS, **_upgraded(_flat(saved_meta['config']))}
  new = {**_SAVED_DEFAULTS, **_flat(config_json)}
  changed = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
  refused = [k for k in changed if k not in _RESUMABLE]
  if refused:
    listing = ', '.join(f'{k}: {old.get(k)!r} → {new.get(k)!r}' for k in refused)
    if 'optim.decay_steps' in refused and 'max_epochs' in changed:  # resolve_decay_steps
      listing += (f' (set by max_epochs {old.get("max_epochs")!r} → {new.get("max_epochs")!r}: '
                  f'the cosine runs to the end of the run; to change max_epochs, keep '
                  f'--config.optim.decay_steps={old.get("optim.decay_steps")!r})')
    raise ResumeMismatchError(
        f'{workdir} holds checkpoints of another run: {listing}. Resume it with its own config, '
        f'or give this run a new --workdir (nothing was changed).')
  for k in changed:
    logging.warning('Resuming %s with %s changed: %r → %r (does not change the run).', workdir,
                    k, old.get(k), new.get(k))
