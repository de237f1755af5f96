"""The train state and how it is made: the model from the config, fresh parameters (PyTorch's
default initialisation, He, or Flax's) for one network or a deep ensemble, and the optimiser state.

``TrainState`` is one pytree holding everything a resume needs (early-stopping and adaptation
counters included); ``checkpoint`` saves and restores it.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from apogeenet_jax import models


class TrainingError(RuntimeError):
  """Training cannot go on: non-finite loss, bad configuration or unusable workdir."""


@flax.struct.dataclass
class TrainState:
  """Everything a resume needs, as one pytree of arrays (saved whole by ``checkpoint``)."""

  params: Any  # an ensemble's carry a leading member axis (K, …), as do opt_state and rng
  opt_state: Any
  step: jax.Array  # optimiser steps taken, all epochs
  epoch: jax.Array  # completed epochs, all rounds
  epoch_step: jax.Array  # batches done in the current epoch (non-zero only after an interrupt)
  rng: jax.Array  # raw uint32 PRNG key; dropout keys are folded from it and the step
  # The lowest early-stopping loss so far: dev_loss, or during adaptation the MStar+YSO
  # dev_adapt_loss (saved under its first name, best_dev_loss: ``_SAVED_NAMES``).
  best_stop_loss: jax.Array
  evals_without_improvement: jax.Array
  adapt_round: jax.Array  # 0 while training on everything; 1, 2, … during adaptation (§3.4)
  best_adapt_loss: jax.Array  # best MStar+YSO dev loss when the current round began
  adapt_rounds_without_improvement: jax.Array
  # The model's other variable collections, e.g. {'batch_stats': …} of APOGEE Net III's batch
  # norm (an ensemble's with the member axis); {} for a family without state.
  model_state: Any = flax.struct.field(default_factory=dict)


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The module of the family ``config.model.name`` built from ``config.model`` (``models``).

  ``input_scale`` 0 means "from the training data" (``train_inputs.resolve_input_scale``): the
  module is built with 1.0 and training clones it with the resolved value.
  """
  cfg = config.model.to_dict()
  if cfg.get('input_scale') == 0:
    cfg['input_scale'] = 1.0
  try:
    return models.create(cfg)
  except models.ModelError as e:
    raise TrainingError(str(e)) from e


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       init: str = 'torch', zero_last_layer: bool = False) -> TrainState:
  """Fresh parameters (``init_params``) and counters; rng is a raw PRNG key."""
  init_rng, state_rng = jax.random.split(rng)
  params, model_state = _init_fn(model, init, zero_last_layer)(init_rng)
  return TrainState(
      params=params, opt_state=tx.init(params), step=jnp.int32(0), epoch=jnp.int32(0),
      epoch_step=jnp.int32(0), rng=state_rng, best_stop_loss=jnp.float32(jnp.inf),
      evals_without_improvement=jnp.int32(0), adapt_round=jnp.int32(0),
      best_adapt_loss=jnp.float32(jnp.inf), adapt_rounds_without_improvement=jnp.int32(0),
      model_state=model_state)


def create_ensemble_state(seed: int, model: nn.Module, tx: optax.GradientTransformation,
                          init: str = 'torch', ensemble_size: int = 1,
                          zero_last_layer: bool = False) -> TrainState:
  """``create_train_state`` for K members: member k from ``PRNGKey(seed + k)``, stacked.

  K = 1 returns the unstacked single state of ``PRNGKey(seed)``, unchanged. Optimiser state is
  each member's own ``tx.init`` stacked, so step counts of schedules carry the member axis too.
  """
  if ensemble_size < 1:
    raise TrainingError(f'ensemble_size must be >= 1, got {ensemble_size}')
  members = [create_train_state(jax.random.PRNGKey(seed + k), model, tx, init, zero_last_layer)
             for k in range(ensemble_size)]
  if ensemble_size == 1:
    return members[0]
  stack = lambda *xs: jnp.stack(xs)  # noqa: E731
  return members[0].replace(params=jax.tree.map(stack, *[m.params for m in members]),
                            opt_state=jax.tree.map(stack, *[m.opt_state for m in members]),
                            rng=jnp.stack([m.rng for m in members]),
                            model_state=jax.tree.map(stack, *[m.model_state for m in members]))


def init_opt_state(tx: optax.GradientTransformation, params: Any, ensemble_size: int = 1) -> Any:
  """``tx.init`` of one network, or of each member of stacked params."""
  return tx.init(params) if ensemble_size == 1 else jax.vmap(tx.init)(params)


def _layers(params: Any) -> dict[tuple[str, ...], dict[str, Any]]:
  """The layers of a parameter tree that have a 'kernel' (Conv and Dense, at any depth), by
  their path, sorted: what the initialisers redraw. Other leaves (batch norm's scale and bias)
  keep Flax's initial values."""
  flat = flax.traverse_util.flatten_dict(params)
  layers: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, leaf in flat.items():
    layers.setdefault(path[:-1], {})[path[-1]] = leaf
  return {path: layer for path, layer in sorted(layers.items()) if 'kernel' in layer}


def _redraw(params: Any, rng: jax.Array, draw: Callable) -> Any:
  """``params`` with each kernelled layer replaced by ``draw(key, layer)`` (one key per layer,
  in path order; for a flat tree of layers the order of their names, as before nesting)."""
  layers = _layers(params)
  keys = jax.random.split(rng, len(layers))
  flat = flax.traverse_util.flatten_dict(params)
  for key, (path, layer) in zip(keys, layers.items(), strict=True):
    for leaf, value in draw(key, layer).items():
      flat[(*path, leaf)] = value
  return flax.traverse_util.unflatten_dict(flat)


def torch_default_params(rng: jax.Array, params: Any) -> Any:
  """Redraws every 'kernel' and 'bias' from U(±1/√fan_in), fan_in of the layer's kernel.

  PyTorch's Conv1d/Linear defaults (kaiming_uniform with a=√5 gives exactly this bound).
  Kernels: conv (k, C_in, C_out) → fan_in k·C_in; dense (in, out) → fan_in in.
  """
  def draw(key, layer):
    kernel = layer['kernel']
    bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
    k_key, b_key = jax.random.split(key)
    out = {'kernel': jax.random.uniform(k_key, kernel.shape, kernel.dtype, -bound, bound)}
    if 'bias' in layer:
      out['bias'] = jax.random.uniform(b_key, layer['bias'].shape, layer['bias'].dtype,
                                       -bound, bound)
    return out

  return _redraw(params, rng, draw)


def he_params(rng: jax.Array, params: Any) -> Any:
  """He (Kaiming) normal kernels, N(0, 2/fan_in) truncated at 2σ, and zero biases.

  The variance that keeps the activations' scale through ReLU layers (He et al. 2015): through
  the 12 ReLU convolutions of Appendix B, U(±1/√fan_in) ('torch', variance 1/(3·fan_in)) shrinks
  the signal ~1.5× per layer, so the output hardly depends on the spectrum (measured in
  tests/test_training.py::test_default_init_features_differ_between_spectra).
  """
  init = jax.nn.initializers.he_normal()

  def draw(key, layer):
    out = {'kernel': init(key, layer['kernel'].shape, layer['kernel'].dtype)}
    if 'bias' in layer:
      out['bias'] = jnp.zeros_like(layer['bias'])
    return out

  return _redraw(params, rng, draw)


_INITS = {'torch': torch_default_params, 'he': he_params, 'flax': lambda rng, params: params}


def last_layer_name(params: Any) -> str:
  """The output Dense layer: 'fc<N>' with the highest N, else the last layer the module made
  (Flax keeps creation order: APOGEE Net III's 'linear_sequential_6')."""
  fc = [name for name in params if name.startswith('fc') and name[2:].isdigit()]
  return max(fc, key=lambda n: int(n[2:])) if fc else list(params)[-1]


def inference_params(state: TrainState) -> Any:
  """What evaluation applies: the params, or for a network with state (batch norm) its Flax
  variables {'params': …, **model_state} (``uncertainty.model_apply_fn`` takes both)."""
  if not jax.tree.leaves(state.model_state):
    return state.params
  return {'params': state.params, **state.model_state}


@functools.lru_cache(maxsize=8)
def _init_fn(model: nn.Module, init: str = 'torch', zero_last_layer: bool = False
             ) -> Callable[[jax.Array], Any]:
  """The jitted parameter initialiser of ``model``, compiled once per architecture (un-jitted
  init takes seconds, docs/jax_stack_notes.md; compiling it takes seconds too).

  ``init``: 'torch' = U(±1/√fan_in) for kernels and biases, PyTorch's default for Conv1d/Linear
  and so what the authors trained from (the paper names none); 'he' = ``he_params``; 'flax' =
  Flax's LeCun-normal kernels and zero biases. ``zero_last_layer`` zeroes the output layer, so
  training starts from predicting the training mean (z = 0) and the first steps only learn the
  readout of features that already differ between spectra.
  """
  if init not in _INITS:
    raise TrainingError(f'init must be one of {sorted(_INITS)}, got {init!r}')

  def fn(key):
    flax_key, init_key = jax.random.split(key)
    dummy = models.family_of(model).dummy_inputs(model)
    variables = dict(model.init(flax_key, **dummy))
    params = _INITS[init](init_key, variables.pop('params'))
    if zero_last_layer:
      last = last_layer_name(params)
      params = {**params, last: jax.tree.map(jnp.zeros_like, params[last])}
    return params, variables  # the other collections: batch norm's statistics

  return jax.jit(fn)
