"""The optimiser and its learning-rate schedule (paper §3.3: plain SGD at 0.001; Adam, AdamW,
warm-up, cosine decay and gradient clipping as the configs choose).

Every optimiser setting lives in ONE sub-config, ``config.optim`` (its fields and defaults:
configs/default.py, the only place they are defaulted); the global ``config.batch_size`` scales
its rate. ``create_optimizer(optim, batch_size)`` is the one place an
``optax.GradientTransformation`` is built, and ``optimizer_key(config)`` — the whole sub-config
as JSON, plus the batch size — is what the compiled train steps are cached on (``steps``), so a
new field reaches the jitted step without being listed anywhere.
"""

import json

import ml_collections
import optax
from absl import logging

from apogeenet_jax.train_state import TrainingError


def learning_rate_schedule(optim: ml_collections.ConfigDict, batch_size: int) -> optax.Schedule:
  """The learning rate per step: linear warm-up, then constant or cosine decay.

  ``optim.learning_rate`` is the rate at ``optim.lr_reference_batch``; a larger global batch
  (many devices) scales it by ``optim.lr_batch_scaling``: 'linear' (SGD's rule), 'sqrt' (Adam's)
  or 'none'.
  """
  factor = batch_size / optim.lr_reference_batch
  if optim.lr_batch_scaling not in _LR_BATCH_SCALINGS:
    raise TrainingError(f'lr_batch_scaling must be one of {sorted(_LR_BATCH_SCALINGS)}, '
                        f'got {optim.lr_batch_scaling!r}')
  peak = optim.learning_rate * _LR_BATCH_SCALINGS[optim.lr_batch_scaling](factor)
  warmup = int(optim.warmup_steps)
  if optim.lr_schedule == 'constant':
    after = optax.constant_schedule(peak)
  elif optim.lr_schedule == 'cosine':
    decay = int(optim.decay_steps)
    if decay <= 0:
      raise TrainingError("lr_schedule='cosine' needs decay_steps > 0 (train_and_evaluate sets "
                          'decay_steps=0 to the end of the run: resolve_decay_steps)')
    after = optax.cosine_decay_schedule(peak, decay, alpha=optim.lr_final_fraction)
  else:
    raise TrainingError(f"lr_schedule must be 'constant' or 'cosine', got {optim.lr_schedule!r}")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def resolve_decay_steps(config: ml_collections.ConfigDict, batches_per_epoch: int
                        ) -> ml_collections.ConfigDict:
  """``optim.lr_schedule='cosine'`` with ``optim.decay_steps=0``: a copy of ``config`` whose
  cosine ends with the run, at ``max_epochs`` × ``batches_per_epoch`` steps (warm-up included),
  so a fixed-length run (configs/demo.py) decays whatever the size of its data set; else
  ``config``. The resolved value is saved in the checkpoint meta's config."""
  optim = config.optim
  if optim.lr_schedule != 'cosine' or optim.decay_steps > 0:
    return config
  total = int(config.max_epochs) * int(batches_per_epoch)
  decay = total - int(optim.warmup_steps)
  if decay <= 0:
    # A run shorter than its warm-up (a smoke test): the cosine is never reached.
    logging.warning('max_epochs %d × %d batches end within the %d warm-up steps: no decay.',
                    config.max_epochs, batches_per_epoch, optim.warmup_steps)
    decay = 1
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.optim.decay_steps = decay
  logging.info('Cosine learning-rate decay over the run: %d steps after %d of warm-up.',
               decay, int(optim.warmup_steps))
  return resolved


_LR_BATCH_SCALINGS = {'none': lambda f: 1.0, 'linear': lambda f: f, 'sqrt': lambda f: f ** 0.5}


def create_optimizer(optim: ml_collections.ConfigDict, batch_size: int
                     ) -> optax.GradientTransformation:
  """The optimiser of ``optim`` (``config.optim``) for a global batch of ``batch_size``: 'sgd'
  (paper §3.3: plain SGD, momentum optional), 'adam' or 'adamw', with
  ``learning_rate_schedule`` and optional global-norm gradient clipping."""
  lr = learning_rate_schedule(optim, batch_size)
  if optim.optimizer == 'sgd':
    tx = optax.sgd(lr, momentum=optim.momentum or None)
  elif optim.optimizer == 'adam':
    tx = optax.adam(lr)
  elif optim.optimizer == 'adamw':
    tx = optax.adamw(lr, weight_decay=optim.weight_decay)
  else:
    raise TrainingError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optim.optimizer!r}")
  clip = optim.grad_clip_norm
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def optimizer_key(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """What defines the optimiser of ``config``, hashable: the WHOLE ``config.optim`` as sorted
  JSON and the global batch size (the rate scales with it). ``from_key`` rebuilds it."""
  return json.dumps(config.optim.to_dict(), sort_keys=True), int(config.batch_size)


def from_key(key: tuple[str, int]) -> optax.GradientTransformation:
  """``create_optimizer`` of an ``optimizer_key``."""
  optim_json, batch_size = key
  return create_optimizer(ml_collections.ConfigDict(json.loads(optim_json)), batch_size)
