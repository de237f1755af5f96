"""The optimiser and its learning-rate schedule (paper §3.3: plain SGD at 0.001; Adam, AdamW,
warm-up, cosine decay and gradient clipping as the configs choose).

``create_optimizer(config)`` is the one place an ``optax.GradientTransformation`` is built;
``optimizer_key(config)`` is what the compiled train steps are cached on (``steps``).
"""


import ml_collections
import optax
from absl import logging

from apogeenet_jax.train_state import TrainingError


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate per step: linear warm-up, then constant or cosine decay.

  ``config.learning_rate`` is the rate at ``config.lr_reference_batch``; a larger global batch
  (many devices) scales it by ``config.lr_batch_scaling``: 'linear' (SGD's rule), 'sqrt' (Adam's)
  or 'none'.
  """
  factor = config.batch_size / config.get('lr_reference_batch', config.batch_size)
  scaling = config.get('lr_batch_scaling', 'none')
  if scaling not in _LR_BATCH_SCALINGS:
    raise TrainingError(f'lr_batch_scaling must be one of {sorted(_LR_BATCH_SCALINGS)}, '
                        f'got {scaling!r}')
  peak = config.learning_rate * _LR_BATCH_SCALINGS[scaling](factor)
  warmup = int(config.get('warmup_steps', 0))
  kind = config.get('lr_schedule', 'constant')
  if kind == 'constant':
    after = optax.constant_schedule(peak)
  elif kind == 'cosine':
    decay = int(config.get('decay_steps', 0))
    if decay <= 0:
      raise TrainingError("lr_schedule='cosine' needs decay_steps > 0 (train_and_evaluate sets "
                          'decay_steps=0 to the end of the run: resolve_decay_steps)')
    after = optax.cosine_decay_schedule(peak, decay, alpha=config.get('lr_final_fraction', 0.0))
  else:
    raise TrainingError(f"lr_schedule must be 'constant' or 'cosine', got {kind!r}")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def resolve_decay_steps(config: ml_collections.ConfigDict, batches_per_epoch: int
                        ) -> ml_collections.ConfigDict:
  """``lr_schedule='cosine'`` with ``decay_steps=0``: a copy of ``config`` whose cosine ends
  with the run, at ``max_epochs`` × ``batches_per_epoch`` steps (warm-up included), so a
  fixed-length run (configs/demo.py) decays whatever the size of its data set; else ``config``.
  The resolved value is saved in the checkpoint meta's config and reused on resume."""
  if config.get('lr_schedule', 'constant') != 'cosine' or config.get('decay_steps', 0) > 0:
    return config
  total = int(config.max_epochs) * int(batches_per_epoch)
  decay = total - int(config.get('warmup_steps', 0))
  if decay <= 0:
    # A run shorter than its warm-up (a smoke test): the cosine is never reached.
    logging.warning('max_epochs %d × %d batches end within the %d warm-up steps: no decay.',
                    config.max_epochs, batches_per_epoch, config.get('warmup_steps', 0))
    decay = 1
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.decay_steps = decay
  logging.info('Cosine learning-rate decay over the run: %d steps after %d of warm-up.',
               decay, int(config.get('warmup_steps', 0)))
  return resolved


_LR_BATCH_SCALINGS = {'none': lambda f: 1.0, 'linear': lambda f: f, 'sqrt': lambda f: f ** 0.5}


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimiser of ``config``: 'sgd' (paper §3.3: plain SGD, momentum optional), 'adam' or
  'adamw', with ``learning_rate_schedule`` and optional global-norm gradient clipping."""
  lr = learning_rate_schedule(config)
  name = config.get('optimizer', 'sgd')
  if name == 'sgd':
    tx = optax.sgd(lr, momentum=config.get('momentum', 0.0) or None)
  elif name == 'adam':
    tx = optax.adam(lr)
  elif name == 'adamw':
    tx = optax.adamw(lr, weight_decay=config.get('weight_decay', 0.0))
  else:
    raise TrainingError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {name!r}")
  clip = config.get('grad_clip_norm', 0.0)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


# The config fields that define the optimiser (create_optimizer); the compiled steps are cached
# on their values.
_OPTIMIZER_FIELDS = ('optimizer', 'learning_rate', 'momentum', 'weight_decay', 'lr_schedule',
                     'warmup_steps', 'decay_steps', 'lr_final_fraction', 'grad_clip_norm',
                     'lr_batch_scaling', 'lr_reference_batch', 'batch_size')


def optimizer_key(config: ml_collections.ConfigDict) -> tuple:
  return tuple((k, config[k]) for k in _OPTIMIZER_FIELDS if k in config)
