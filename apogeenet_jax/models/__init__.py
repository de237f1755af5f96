"""The model registry: each network family in one file of this package, chosen by name.

A family (``Family``) declares everything the rest of the package needs to train, checkpoint,
predict and import it, so that the trainer, the steps, the σ estimators and the checkpoint code
never name a model class (big_vision's ``models/<name>.py`` + ``config.model_name`` layout):

  module        its Flax module, built as ``module(**config.model without 'name')``;
  inputs        its NAMED inputs and their per-example shapes, e.g. {'flux': (8575,)}: batches
                carry an ``inputs`` dict with these keys and the model is applied as
                ``module.apply(variables, **inputs, train=…)``;
  noisy_inputs  the inputs that carry per-pixel noise (their errors travel beside them): what the
                Monte Carlo draws, the first-order σ and noise augmentation perturb;
  label_space   what the network predicts before standardisation, and the map to the
                catalogue's units (Teff in K always): a ``normalization.LabelSpace``, which the
                Standardizer of a checkpoint carries.

Adding a family: one file here that defines its module and calls ``register``, one import line
at the bottom of this file, and a config whose ``config.model.name`` names it
(docs/architecture.md, "Adding a family").

The checkpoint meta records the module's constructor arguments with the family's name
(``model_config``); ``from_meta`` rebuilds the module from them. A meta written before the
registry has no name: it is an APOGEE Net I, ``DEFAULT_FAMILY``.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from apogeenet_jax.normalization import LabelSpace

# The family of a checkpoint whose meta names none (written before the registry).
DEFAULT_FAMILY = 'apogee_net'


class ModelError(ValueError):
  """An unknown family, or a model config that does not fit it."""


@dataclasses.dataclass(frozen=True)
class Family:
  """One network family: its module and its input and label contract (module docstring)."""
  name: str
  module: type[nn.Module]
  inputs: Mapping[str, tuple[int, ...]]
  noisy_inputs: tuple[str, ...]
  label_space: LabelSpace
  description: str = ''
  # Importing the authors' PyTorch weights (``convert_torch``), where they are public:
  # torch_keys: state-dict keys that only this family's networks have (detection);
  # from_torch(arrays {key: float32 ndarray}) → (module, Flax variables {'params': …, and any
  #   other collection such as 'batch_stats'}), raising ModelError naming every bad key;
  # authors_labels: the authors' label (μ, σ) in this family's label space, which their
  #   weights were trained with.
  torch_keys: frozenset[str] = frozenset()
  from_torch: Any = None
  authors_labels: tuple[tuple[float, ...], tuple[float, ...]] | None = None
  # fit_inputs(module, vectors {name: (n, …) of the training split}) → the module with the
  # input statistics it fits on the training split (as the label standardiser does), where
  # its config leaves them to the data; None: nothing to fit.
  fit_inputs: Any = None

  def __post_init__(self):
    missing = set(self.noisy_inputs) - set(self.inputs)
    if missing:
      raise ModelError(f'family {self.name!r}: noisy inputs {sorted(missing)} are not inputs')

  def input_shapes(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The per-example input shapes of this instance: ``inputs``, or the module's own
    ``input_shapes`` where its size is an argument (a shorter spectrum in tests)."""
    return dict(getattr(model, 'input_shapes', self.inputs))

  def dummy_inputs(self, model: nn.Module, batch: int = 1, dtype=jnp.float32
                   ) -> dict[str, jnp.ndarray]:
    """Zeros of every input of ``model``, (batch, *shape): what ``model.init`` traces."""
    return {k: jnp.zeros((batch, *shape), dtype) for k, shape in self.input_shapes(model).items()}


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
  if family.name in _REGISTRY and _REGISTRY[family.name] != family:
    raise ModelError(f'family {family.name!r} is registered twice')
  _REGISTRY[family.name] = family
  return family


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Family:
  if name not in _REGISTRY:
    raise ModelError(f'unknown model family {name!r}: expected one of {sorted(_REGISTRY)}')
  return _REGISTRY[name]


def family_of(model: nn.Module) -> Family:
  """The family whose module ``model`` is."""
  for family in _REGISTRY.values():
    if type(model) is family.module:
      return family
  raise ModelError(f'{type(model).__name__} is not the module of a registered family')


def module_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Constructor arguments from a config or a checkpoint meta's 'model' (its 'name' dropped):
  sequences (JSON lists) become tuples, as flax modules must be hashable."""
  return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in dict(cfg).items()
          if k != 'name'}


def create(model_config: Mapping[str, Any]) -> nn.Module:
  """The module of family ``model_config['name']`` (default ``DEFAULT_FAMILY``) built from the
  rest of ``model_config``: a config's ``config.model`` or a checkpoint meta's 'model'."""
  family = get(dict(model_config).get('name', DEFAULT_FAMILY))
  kwargs = module_kwargs(model_config)
  fields = {f.name for f in dataclasses.fields(family.module)} - {'parent', 'name'}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ModelError(f'config.model: {", ".join(unknown)} not arguments of family '
                     f'{family.name!r} (its arguments: {", ".join(sorted(fields))})')
  return family.module(**kwargs)


def model_config(model: nn.Module) -> dict[str, Any]:
  """The family name and constructor arguments of ``model`` as JSON-able values (the checkpoint
  meta's 'model'; ``create`` inverts it)."""
  out = {'name': family_of(model).name}
  for f in dataclasses.fields(model):
    if f.name not in ('parent', 'name'):
      value = getattr(model, f.name)
      out[f.name] = list(value) if isinstance(value, tuple | list) else value
  return out


def from_meta(meta: Mapping[str, Any]) -> nn.Module:
  """The module a checkpoint's meta describes (no name: ``DEFAULT_FAMILY``, or the YSO network
  for the meta of ``kind`` 'yso_photometric' written before the registry)."""
  cfg = dict(meta['model'])
  if 'name' not in cfg and meta.get('kind') in _LEGACY_KINDS:
    cfg['name'] = _LEGACY_KINDS[meta['kind']]
  return create(cfg)


def family_from_meta(meta: Mapping[str, Any]) -> Family:
  return family_of(from_meta(meta))


def family_of_state_dict(keys) -> Family:
  """The family whose ``torch_keys`` a PyTorch state dict holds (the most specific one when
  several match: Net II holds every key of Net I)."""
  keys = set(keys)
  matches = [f for f in _REGISTRY.values()
             if f.from_torch is not None and f.torch_keys and f.torch_keys <= keys]
  if not matches:
    importable = sorted(f.name for f in _REGISTRY.values() if f.from_torch is not None)
    raise ModelError(f'the state dict matches no family that imports PyTorch weights '
                     f'({", ".join(importable)}); its keys begin {sorted(keys)[:6]}')
  return max(matches, key=lambda f: len(f.torch_keys))


# Checkpoints of networks that rode along before the registry, by their meta's 'kind'.
_LEGACY_KINDS = {'yso_photometric': 'yso_photometric'}

# The families. Each module registers itself on import.
from apogeenet_jax.models import apogee_net, apogee_net_2, apogee_net_3, yso_photometric  # noqa: E402, F401
