"""Every training config field with a domain, checked once before anything is built or written.

``validate(config)`` is called at the top of ``training.train_and_evaluate`` (and by train.py
before it), so a config that cannot describe a run — loss weights (1, 1, −1) that would maximise
the [Fe/H] error, ``patience=0`` that ends the run before its first epoch, a flux scaling that
does not exist — stops with one ``ConfigError`` naming every bad field and its domain, before a
workdir, a checkpoint folder or a data set is touched.

``FIELDS`` is the one table: dotted field name → (domain in words, check). The tests enumerate
it (a bad value for every field is refused). A field absent from the config is skipped, so older
and smaller configs pass; the model fields are looked up where they exist, at the top level
(``flux_scaling``, ``input_scale``, ``dropout_rate``) or under ``config.model``.
Misspelled fields on the command line (``--config.noise_augmentaton=1``) are refused by
ml_collections' flag parser before the config reaches here; train.py makes that one line.
Standard library + NumPy only.
"""

import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

from apogeenet_jax.constants import LABEL_NAMES, METADATA_TRANSFORMS


class ConfigError(ValueError):
  """Config fields outside their domains. The message lists each field, its value and domain."""


def _real(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int_at_least(low: int) -> tuple[str, Callable[[Any], bool]]:
  return f'an integer >= {low}', lambda v: _int(v) and v >= low


def _real_at_least(low: float, *, above: bool = False) -> tuple[str, Callable[[Any], bool]]:
  if above:
    return f'a finite number > {low:g}', lambda v: _real(v) and v > low
  return f'a finite number >= {low:g}', lambda v: _real(v) and v >= low


def _fraction(*, closed_top: bool, open_bottom: bool = False) -> tuple[str, Callable[[Any], bool]]:
  low, high = ('(' if open_bottom else '['), (']' if closed_top else ')')
  return (f'a number in {low}0, 1{high}',
          lambda v: _real(v) and (v > 0 if open_bottom else v >= 0)
          and (v <= 1 if closed_top else v < 1))


def _one_of(*choices: Any) -> tuple[str, Callable[[Any], bool]]:
  words = ', '.join(repr(c) for c in choices[:-1]) + f' or {choices[-1]!r}'
  return words, lambda v: isinstance(v, str) and v in choices


def _loss_weights(v: Any) -> bool:
  """Finite, >= 0, one per label, not all 0."""
  if isinstance(v, str) or not hasattr(v, '__len__') or len(v) != len(LABEL_NAMES):
    return False
  return all(_real(w) and w >= 0 for w in v) and any(w > 0 for w in v)


def _positive_ints(v: Any) -> bool:
  return (not isinstance(v, str) and hasattr(v, '__len__') and len(v) > 0
          and all(_int(x) and x >= 1 for x in v))


def _string(v: Any) -> bool:
  return isinstance(v, str)


_BOOL = ('True or False', lambda v: isinstance(v, bool))

# Field → (domain in words, check). The one place a field's domain is written down.
FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    'data_dir': ('a path (text)', _string),
    'dataset_name': ('a non-empty name', lambda v: isinstance(v, str) and bool(v)),
    'num_threads': _int_at_least(1),
    'prefetch_batches': _int_at_least(0),
    'input_mode': _one_of('auto', 'memory', 'stream'),
    'memory_budget_gb': _real_at_least(0, above=True),
    'memory_dtype': _one_of('float32', 'bfloat16', 'float16'),
    'data_on_device': _one_of('auto', 'true', 'false'),
    'device_memory_budget_gb': _real_at_least(0),
    'steps_per_call': _int_at_least(1),
    'batch_size': _int_at_least(1),
    'eval_batch_size': _int_at_least(1),
    'optim.optimizer': _one_of('sgd', 'adam', 'adamw'),
    'optim.learning_rate': _real_at_least(0, above=True),
    'optim.momentum': _fraction(closed_top=False),
    'optim.weight_decay': _real_at_least(0),
    'optim.lr_schedule': _one_of('constant', 'cosine'),
    'optim.warmup_steps': _int_at_least(0),
    'optim.decay_steps': _int_at_least(0),
    'optim.lr_final_fraction': _fraction(closed_top=True),
    'optim.grad_clip_norm': _real_at_least(0),
    'optim.lr_batch_scaling': _one_of('none', 'linear', 'sqrt'),
    'optim.lr_reference_batch': _int_at_least(1),
    'loss_weights': (f'{len(LABEL_NAMES)} finite numbers >= 0 ({", ".join(LABEL_NAMES)}), not '
                     'all 0', _loss_weights),
    'noise_augmentation': _real_at_least(0),
    'huber_delta': _real_at_least(0),
    'dropout_rate': _fraction(closed_top=False),
    'init': _one_of('he', 'torch', 'flax'),
    'zero_last_layer': _BOOL,
    'flux_scaling': _one_of('none', 'median', 'log_median'),
    'input_scale': _real_at_least(0),
    'seed': _int_at_least(0),
    'ensemble_size': _int_at_least(1),
    'patience': ('an integer >= 1 (evaluations without improvement before stopping; '
                 'max_epochs alone ends a run without early stopping)',
                 lambda v: _int(v) and v >= 1),
    'min_delta': _real_at_least(0),
    'early_stopping_from_epoch': _int_at_least(0),
    'max_epochs': _int_at_least(1),
    'standardizer': _one_of('fit', 'paper'),
    'model.channels': ('a non-empty list of integers >= 1', _positive_ints),
    'model.hidden': ('a non-empty list of integers >= 1', _positive_ints),
    'model.metadata_transform': _one_of(*METADATA_TRANSFORMS),
    'adapt': _BOOL,
    'init_from': ('a path (text)', _string),
    'payne_fraction': _fraction(closed_top=True, open_bottom=True),
    'adapt_patience': _int_at_least(1),
    'max_adapt_rounds': _int_at_least(1),
    'num_devices': _int_at_least(0),
    'multihost': _BOOL,
    'log_every_steps': _int_at_least(0),
}
# Fields that live at the top level in one config layout and under config.model in another.
_MODEL_FIELDS = ('flux_scaling', 'input_scale', 'dropout_rate')
_MISSING = object()


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    if not isinstance(node, Mapping) and not hasattr(node, 'keys'):
      return _MISSING
    if part not in node:
      return _MISSING
    node = node[part]
  return node


def problems(config: Mapping[str, Any]) -> list[str]:
  """'field must be domain, got value' for every field of ``config`` outside its domain."""
  found = []
  for field, (domain, check) in FIELDS.items():
    places = [field]
    if field in _MODEL_FIELDS:
      places.append(f'model.{field}')
    for place in places:
      value = _lookup(config, place)
      if value is _MISSING:
        continue
      try:
        ok = bool(check(value))
      except (TypeError, ValueError):
        ok = False
      if not ok:
        found.append(f'{place} must be {domain}, got {value!r}')
  return found


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser for train.py and evaluate.py (``app.run(main, flags_parser=…)``): a
  ``--config.X=…`` override that ml_collections cannot apply (a misspelled field, a value of the
  wrong type) is one FATAL line, not a traceback."""
  from absl import app  # Only the entry points parse flags.
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = ' '.join(str(e.args[0] if e.args else e).replace('\\n', ' ').split())
    if guess := re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', text):
      text = f'no field {guess.group(2)!r} (did you mean {guess.group(1)!r}?)'
    elif name := re.fullmatch(r"['\"\\]*([\w.]+)['\"\\]*", text):
      text = f'no field {name.group(1)!r}'
    raise SystemExit(f'FATAL a --config override cannot be applied: {text}') from None


def validate(config: Mapping[str, Any]) -> None:
  """Raises ConfigError listing every field outside its domain (``FIELDS``); else returns."""
  found = problems(config)
  if found:
    raise ConfigError('config: ' + '; '.join(found) + ' (nothing was built or written)')
