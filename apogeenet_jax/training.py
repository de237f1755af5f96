"""Training: the data-parallel SGD step, early stopping, adaptation rounds (paper §3.3–3.4).

One jitted step over every device of a 1-D ('data',) mesh: ``jax.shard_map`` runs per-device code
on each device's slice of the global batch and averages the loss — and so the gradient — over the
named axis (pmap semantics). The same code runs on 1 CPU, 8 GPUs, a TPU slice or several hosts
after ``jax.distributed.initialize()``: each process then reads its own shard of the data and
``jax.make_array_from_process_local_data`` assembles the global batch.

Deep ensembles (``config.ensemble_size`` K > 1): K networks that differ by initialisation and
dropout keys (member k is initialised exactly as a single run with seed ``config.seed + k``) and
see the same batches train in ONE jitted step over a leading member axis of ``params``,
``opt_state`` and ``rng`` inside the per-device function (``jax.vmap`` on GPU/TPU, K straight-line
copies on a CPU: ``members_unrolled``), so they are still data parallel and cost one compiled
program. Early stopping watches the MEAN of the members' dev
losses: all members train the same epochs and the best checkpoint holds all K at one step, so no
member is ever stopped, frozen or restored on its own (nothing one member does can touch another's
slice of the stacked arrays). K = 1 keeps unstacked arrays and today's exact computation.

Everything a resume needs lives in one pytree, ``TrainState``, saved by orbax every epoch
(and on SIGTERM/SIGINT, at a step boundary that every process agrees on: ``StopRequest``) in
WORKDIR/checkpoints; a run on an existing workdir (local or gs://…) resumes from the latest
checkpoint and ends with the same parameters as an uninterrupted run.

The loop, ``train_and_evaluate``, only orchestrates: ``_setup`` (data, model, restore),
``_train_one_epoch`` (steps, dev evaluation, metrics row, checkpoint) and
``_next_adaptation_round`` (§3.4: restart from the best checkpoint with a fresh Payne subset).
"""

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from etils import epath
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from apogeenet_jax import checkpoint, file_io, input_pipeline, memory_data, workdir_lock
from apogeenet_jax.constants import DATA_TYPES, N_PIXELS
from apogeenet_jax.metric_writer import MetricWriter
from apogeenet_jax.model import APOGEENet
from apogeenet_jax.normalization import PAPER_STANDARDIZER, Standardizer
from apogeenet_jax.sharding import DATA_AXIS, make_mesh

# The data types whose dev loss drives adaptation (§3.4: "until MStar and YSO dev performance
# stops improving").
ADAPT_TYPES = ('MStar', 'YSO')
PAYNE = DATA_TYPES.index('Payne')
# Keys of a batch that go to the devices (strings and catalogue columns stay on the host).
DEVICE_KEYS = ('flux', 'targets', 'data_type', 'mask')
# A split resident on the devices: flux rows in one block per device, the small arrays on all.
RESIDENT_SPECS = {'flux': P(DATA_AXIS), 'targets': P(), 'data_type': P()}


class TrainingError(RuntimeError):
  """Training cannot go on: non-finite loss, bad configuration or unusable workdir."""


@flax.struct.dataclass
class TrainState:
  """Everything a resume needs, as one pytree of arrays (STYLE §4)."""

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


# ------------------------------------------------------------------------------------------------
# Construction.


def create_model(config: ml_collections.ConfigDict) -> APOGEENet:
  """APOGEENet with the config's dropout and optional reduced architecture (``config.model``)."""
  kwargs = dict(config.get('model', {}))
  for key in ('channels', 'hidden'):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])
  return APOGEENet(dropout_rate=config.dropout_rate, **kwargs)


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


def create_train_state(rng: jax.Array, model: APOGEENet, tx: optax.GradientTransformation,
                       init: str = 'torch', zero_last_layer: bool = False) -> TrainState:
  """Fresh parameters (``init_params``) and counters; rng is a raw PRNG key."""
  init_rng, state_rng = jax.random.split(rng)
  params = _init_fn(model, init, zero_last_layer)(init_rng)
  return TrainState(
      params=params, opt_state=tx.init(params), step=jnp.int32(0), epoch=jnp.int32(0),
      epoch_step=jnp.int32(0), rng=state_rng, best_stop_loss=jnp.float32(jnp.inf),
      evals_without_improvement=jnp.int32(0), adapt_round=jnp.int32(0),
      best_adapt_loss=jnp.float32(jnp.inf), adapt_rounds_without_improvement=jnp.int32(0))


def create_ensemble_state(seed: int, model: APOGEENet, tx: optax.GradientTransformation,
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
                            rng=jnp.stack([m.rng for m in members]))


def init_opt_state(tx: optax.GradientTransformation, params: Any, ensemble_size: int = 1) -> Any:
  """``tx.init`` of one network, or of each member of stacked params."""
  return tx.init(params) if ensemble_size == 1 else jax.vmap(tx.init)(params)


def torch_default_params(rng: jax.Array, params: Any) -> Any:
  """Redraws every 'kernel' and 'bias' from U(±1/√fan_in), fan_in of the layer's kernel.

  PyTorch's Conv1d/Linear defaults (kaiming_uniform with a=√5 gives exactly this bound).
  Kernels: conv (k, C_in, C_out) → fan_in k·C_in; dense (in, out) → fan_in in.
  """
  layers = sorted(params)
  keys = jax.random.split(rng, len(layers))
  out = {}
  for key, name in zip(keys, layers, strict=True):
    layer = params[name]
    kernel = layer['kernel']
    bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
    k_key, b_key = jax.random.split(key)
    out[name] = {'kernel': jax.random.uniform(k_key, kernel.shape, kernel.dtype, -bound, bound),
                 'bias': jax.random.uniform(b_key, layer['bias'].shape, layer['bias'].dtype,
                                            -bound, bound)}
  return out


def he_params(rng: jax.Array, params: Any) -> Any:
  """He (Kaiming) normal kernels, N(0, 2/fan_in) truncated at 2σ, and zero biases.

  The variance that keeps the activations' scale through ReLU layers (He et al. 2015): through
  the 12 ReLU convolutions of Appendix B, U(±1/√fan_in) ('torch', variance 1/(3·fan_in)) shrinks
  the signal ~1.5× per layer, so the output hardly depends on the spectrum (measured in
  tests/test_training.py::test_default_init_features_differ_between_spectra).
  """
  init = jax.nn.initializers.he_normal()
  layers = sorted(params)
  keys = jax.random.split(rng, len(layers))
  return {name: {'kernel': init(key, params[name]['kernel'].shape, params[name]['kernel'].dtype),
                 'bias': jnp.zeros_like(params[name]['bias'])}
          for key, name in zip(keys, layers, strict=True)}


_INITS = {'torch': torch_default_params, 'he': he_params, 'flax': lambda rng, params: params}


def last_layer_name(params: Any) -> str:
  """The output Dense layer: 'fc<N>' with the highest N."""
  return max((name for name in params if name.startswith('fc')), key=lambda n: int(n[2:]))


@functools.lru_cache(maxsize=8)
def _init_fn(model: APOGEENet, init: str = 'torch', zero_last_layer: bool = False
             ) -> Callable[[jax.Array], Any]:
  """The jitted parameter initialiser of ``model``, compiled once per architecture (un-jitted
  init takes seconds, STACK.md; compiling it takes seconds too).

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
    params = model.init(flax_key, jnp.zeros((1, model.input_length), jnp.float32))['params']
    params = _INITS[init](init_key, params)
    if zero_last_layer:
      last = last_layer_name(params)
      params = {**params, last: jax.tree.map(jnp.zeros_like, params[last])}
    return params

  return jax.jit(fn)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree fully replicated on the mesh (a no-op for arrays already there).

  Host-side values (NumPy, Python scalars, single-device arrays from host bookkeeping) go through
  NumPy: every process holds the same value, which is what a replicated global array needs
  across hosts.
  """
  sharding = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array):
      if x.sharding == sharding:
        return x
      if x.is_fully_addressable and jax.process_count() > 1:
        x = np.asarray(x)
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows → one global array per key, split over the 'data' axis."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in DEVICE_KEYS}


def device_batch(batch: Mapping[str, np.ndarray], standardizer: Standardizer, mesh: Mesh
                 ) -> dict[str, jax.Array]:
  """Adds standardised 'targets' (z = (x − μ)/σ, §3.1) and a mask, then shards to the mesh."""
  batch = dict(batch)
  batch['targets'] = standardizer.transform(batch['labels'])
  if 'mask' not in batch:
    batch['mask'] = np.ones(len(batch['labels']), bool)
  return shard_batch(batch, mesh)


def put_chunk(chunk: Mapping[str, np.ndarray], standardizer: Standardizer, mesh: Mesh
              ) -> dict[str, jax.Array]:
  """k stacked host batches (k, B_local, …) → standardised, sharded over 'data' on axis 1."""
  chunk = dict(chunk)
  chunk['targets'] = standardizer.transform(chunk['labels'])
  if 'mask' not in chunk:
    chunk['mask'] = np.ones(chunk['labels'].shape[:2], bool)
  sharding = NamedSharding(mesh, P(None, DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(chunk[k]))
          for k in DEVICE_KEYS}


def _flux_blocks(num_spectra: int, mesh: Mesh) -> tuple[tuple[int, int], NamedSharding]:
  """Global flux shape of a resident split (rows padded to a multiple of the device count) and
  its sharding: device i of the mesh holds rows [i·block, (i+1)·block)."""
  n_dev = mesh.shape[DATA_AXIS]
  return (-(-num_spectra // n_dev) * n_dev, N_PIXELS), NamedSharding(mesh, P(DATA_AXIS))


def resident_rows(num_spectra: int, mesh: Mesh) -> np.ndarray:
  """The split rows whose flux this process's devices hold: all it needs to load."""
  shape, sharding = _flux_blocks(num_spectra, mesh)
  rows = [np.arange(idx[0].start or 0, min(idx[0].stop or shape[0], num_spectra))
          for idx in sharding.addressable_devices_indices_map(shape).values()]
  return np.unique(np.concatenate(rows))


def place_split(arrays: memory_data.SplitArrays, standardizer: Standardizer, mesh: Mesh
                ) -> dict[str, jax.Array]:
  """A split in memory → device-resident arrays (``RESIDENT_SPECS``): flux in its storage dtype,
  one block of rows per device; standardised targets (n, 3) and data types on every device."""
  shape, sharding = _flux_blocks(len(arrays), mesh)
  n = len(arrays)

  def block(index):
    start, stop = index[0].start or 0, index[0].stop or shape[0]
    held = np.arange(start, min(stop, n))
    first = arrays.positions(held[:1])[0] if len(held) else 0
    rows = arrays.flux[first:first + len(held)]  # A view: rows are held in ascending order.
    if len(held) == stop - start:
      return rows
    return np.concatenate([rows, np.zeros((stop - start - len(held), N_PIXELS), rows.dtype)])

  flux = jax.make_array_from_callback(shape, sharding, block)
  return {'flux': flux,
          **replicate({'targets': standardizer.transform(arrays.labels),
                       'data_type': np.asarray(arrays.data_type, np.int32)}, mesh)}


# ------------------------------------------------------------------------------------------------
# The steps (pure, jitted once each).


def _masked_sums(per_example: jax.Array, data_type: jax.Array, mask: jax.Array
                 ) -> dict[str, jax.Array]:
  """Sums over the GLOBAL batch: total and per data type squared error and counts."""
  w = mask.astype(jnp.float32)
  one_hot = jax.nn.one_hot(data_type, len(DATA_TYPES), dtype=jnp.float32) * w[:, None]
  sums = {'loss_sum': jnp.sum(per_example * w), 'count': jnp.sum(w),
          'type_loss_sum': one_hot.T @ per_example, 'type_count': jnp.sum(one_hot, axis=0)}
  return jax.tree.map(lambda x: lax.psum(x, DATA_AXIS), sums)


def _member_mean(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-member sums (K, …) → their mean (the ensemble's early-stopping quantity) plus
  'member_loss_sum' (K,), from which ``summarize`` reports each member."""
  out = jax.tree.map(lambda x: jnp.mean(x, axis=0), sums)
  out['member_loss_sum'] = sums['loss_sum']
  return out


def members_unrolled(mesh: Mesh) -> bool:
  """Whether an ensemble's members run one after another in straight-line code (CPU) rather
  than in one ``vmap`` (GPU/TPU).

  Why: vmap turns every convolution after the first into a grouped convolution, which XLA:CPU
  runs far slower than K separate ones, and a ``lax.map`` loop is no cure there (convolutions
  inside a while loop: ~15× slower, see ``make_train_steps``). On an accelerator the vmapped
  step batches the K small networks into wider kernels. Both layouts compute the same numbers.
  Measured (paper network, batch 128, 2 CPU cores, ``benchmarks/train_benchmark.py
  --ensemble_sizes=1,2,4``): see README "The cost of K members".
  """
  return mesh.devices.flat[0].platform == 'cpu'


def _over_members(fn: Callable, unrolled: bool, in_axes: tuple) -> Callable:
  """``fn`` applied to each member (leading axis) of the arguments with in_axes 0: vmapped,
  or unrolled into K calls whose results are stacked."""
  if not unrolled:
    return jax.vmap(fn, in_axes=in_axes)

  def unrolled_fn(*args):
    k = next(jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, in_axes, strict=True)
             if ax == 0)
    outs = [fn(*(a if ax is None else jax.tree.map(lambda x, i=i: x[i], a)
                 for a, ax in zip(args, in_axes, strict=True))) for i in range(k)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return unrolled_fn


def _local_train_step(model: APOGEENet, tx: optax.GradientTransformation, ensemble_size: int = 1,
                      unroll_members: bool = False
                      ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The per-device SGD step, to run under ``shard_map`` over the 'data' axis.

  ``ensemble_size`` K > 1: the state's params, opt_state and rng carry a leading member axis;
  every member takes its step on the same batch (vmap inside the per-device function, or K
  straight-line copies with ``unroll_members``: ``members_unrolled``); the metrics are the
  members' mean, with 'member_loss_sum' (K,) beside them.
  """

  def member_step(params, opt_state, rng, step, batch):
    # Different dropout masks per device, reproducible from (rng, step).
    dropout_rng = jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(DATA_AXIS))
    w = batch['mask'].astype(jnp.float32)

    def loss_fn(params):
      pred = model.apply({'params': params}, batch['flux'], train=True,
                         rngs={'dropout': dropout_rng})
      per_example = jnp.mean(jnp.square(pred - batch['targets']), axis=-1)  # MSE, §3.3
      # The GLOBAL mean, reduced over the axis INSIDE the differentiated function: the gradient of
      # a replicated input already carries the psum, so pmean-ing gradients afterwards would give
      # N× the true gradient (STACK.md, "gradient trap").
      loss = lax.psum(jnp.sum(per_example * w), DATA_AXIS) / lax.psum(jnp.sum(w), DATA_AXIS)
      return loss, per_example

    (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = _masked_sums(lax.stop_gradient(per_example), batch['data_type'], batch['mask'])
    metrics['loss'] = loss
    return params, opt_state, metrics

  def local_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    if ensemble_size == 1:
      params, opt_state, metrics = member_step(state.params, state.opt_state, state.rng,
                                               state.step, batch)
    else:
      # Collectives inside (the loss's psum over 'data') are per member, batched by vmap or
      # one per unrolled copy, so each member's gradient is its own global-batch mean gradient.
      params, opt_state, metrics = _over_members(member_step, unroll_members,
                                                 (0, 0, 0, None, None))(
          state.params, state.opt_state, state.rng, state.step, batch)
      metrics = _member_mean(metrics)
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                              epoch_step=state.epoch_step + 1)
    return new_state, metrics

  return local_step


def make_train_step(model: APOGEENet, tx: optax.GradientTransformation, mesh: Mesh,
                    ensemble_size: int = 1, unroll_members: bool | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The jitted data-parallel SGD step: (state, global batch) → (state, summed metrics); for
  ``ensemble_size`` see ``_local_train_step``; ``unroll_members`` None: ``members_unrolled``."""
  if unroll_members is None:
    unroll_members = members_unrolled(mesh)
  step = jax.shard_map(_local_train_step(model, tx, ensemble_size, unroll_members), mesh=mesh,
                       in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=0)


def _gather_resident(data: Mapping[str, jax.Array], idx: jax.Array, n_dev: int
                     ) -> dict[str, jax.Array]:
  """This device's slice of the global batch ``idx`` (B,) from a split placed by ``place_split``.

  Runs under ``shard_map``. Each device holds one block of flux rows, so it gathers the rows of
  the global batch that fall in its block (zeros elsewhere) and a reduce-scatter hands every
  device the sum for its own slice: exactly its rows, as every other device contributed zeros.
  The traffic is one global batch of flux per step (4.4 MB at batch 128), whatever the split
  size, and each process only ever holds its own block.
  """
  local_batch = idx.shape[0] // n_dev
  device = lax.axis_index(DATA_AXIS)
  mine = lax.dynamic_slice_in_dim(idx, device * local_batch, local_batch)
  flux = data['flux']
  if n_dev == 1:
    flux = jnp.take(flux, mine, axis=0)
  else:
    block = flux.shape[0]
    local = idx - device * block
    owned = (local >= 0) & (local < block)
    rows = jnp.take(flux, jnp.where(owned, local, 0), axis=0)
    flux = jnp.where(owned[:, None], rows, jnp.zeros((), rows.dtype))
    flux = lax.psum_scatter(flux, DATA_AXIS, scatter_dimension=0, tiled=True)
  return {'flux': flux.astype(jnp.float32), 'targets': jnp.take(data['targets'], mine, axis=0),
          'data_type': jnp.take(data['data_type'], mine, axis=0),
          'mask': jnp.ones(local_batch, bool)}


def make_train_steps(model: APOGEENet, tx: optax.GradientTransformation, mesh: Mesh, *,
                     resident: bool = False, ensemble_size: int = 1
                     ) -> Callable[[TrainState, Any], tuple]:
  """k SGD steps in one jitted ``lax.scan``: (state, xs) → (state, metrics summed over the k
  steps, (k,) loss of each step).

  ``resident=False``: xs is k stacked global batches, {'flux': (k, B, 8575), 'targets' (k, B, 3),
  'data_type', 'mask'} sharded over the 'data' axis on dimension 1 (``put_chunk``).
  ``resident=True``: xs = (split, idx): a split placed on the devices by ``place_split`` and
  idx (k, B) int32 global rows, replicated; each step gathers its batch on the device.
  k comes from the input's shape (a shorter last chunk compiles once more). One scan step is the
  same computation as ``make_train_step`` (``ensemble_size`` likewise); fusing k of them saves
  k − 1 host round trips.
  """
  # The CPU's two straight-line rules (convolutions are slow inside loops and grouped): the
  # scan over steps and the ensemble's members are both unrolled there.
  unroll = members_unrolled(mesh)
  local_step = _local_train_step(model, tx, ensemble_size, unroll)
  n_dev = mesh.shape[DATA_AXIS]

  def run(state, xs):
    if resident:
      split, seq = xs
      batch_of = functools.partial(_gather_resident, split, n_dev=n_dev)
    else:
      seq, batch_of = xs, lambda batch: batch
    # XLA:CPU runs the convolutions inside a while loop ~15x slower than straight-line code
    # (paper model, batch 128: 4.3 s vs 0.27-0.37 s per step, measured), so on a CPU the k steps
    # are unrolled, and one step is never wrapped in a loop.
    k = jax.tree.leaves(seq)[0].shape[0]
    if k == 1:
      state, metrics = local_step(state, batch_of(jax.tree.map(lambda a: a[0], seq)))
      per_step = jax.tree.map(lambda m: m[None], metrics)
    else:
      state, per_step = lax.scan(lambda st, x: local_step(st, batch_of(x)), state, seq,
                                 unroll=unroll)
    losses = per_step.pop('loss')
    return state, jax.tree.map(lambda m: jnp.sum(m, axis=0), per_step), losses

  xs_spec = ((RESIDENT_SPECS, P()) if resident else P(None, DATA_AXIS))
  return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), xs_spec),
                               out_specs=(P(), P(), P())), donate_argnums=0)


def make_eval_step(model: APOGEENet, mesh: Mesh, ensemble_size: int = 1
                   ) -> Callable[[Any, dict], dict]:
  """The jitted data-parallel evaluation: (params, padded global batch) → summed metrics
  (for K > 1 the members' mean, with 'member_loss_sum' (K,))."""

  def member_eval(params: Any, batch: dict) -> dict:
    pred = model.apply({'params': params}, batch['flux'], train=False)
    per_example = jnp.mean(jnp.square(pred - batch['targets']), axis=-1)
    return _masked_sums(per_example, batch['data_type'], batch['mask'])

  def local_eval(params: Any, batch: dict) -> dict:
    if ensemble_size == 1:
      return member_eval(params, batch)
    return _member_mean(_over_members(member_eval, members_unrolled(mesh), (0, None))(
        params, batch))

  return jax.jit(jax.shard_map(local_eval, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                               out_specs=P()))


# ------------------------------------------------------------------------------------------------
# Metrics and early stopping (host side).


def summarize(sums: Mapping[str, Any], prefix: str) -> dict[str, float]:
  """Summed metrics → mean standardised MSE overall and per data type (Table 2's quantity).

  Also returns ``{prefix}_adapt_loss``: the MStar+YSO mean that drives adaptation. A data type
  absent from the split gives NaN.
  """
  sums = jax.device_get(sums)
  count = float(sums['count'])
  out = {f'{prefix}_loss': float(sums['loss_sum']) / count if count else float('nan'),
         f'{prefix}_count': count}
  type_sum = np.asarray(sums['type_loss_sum'], np.float64)
  type_count = np.asarray(sums['type_count'], np.float64)
  for i, name in enumerate(DATA_TYPES):
    out[f'{prefix}_loss_{name}'] = (type_sum[i] / type_count[i] if type_count[i]
                                    else float('nan'))
  idx = [DATA_TYPES.index(t) for t in ADAPT_TYPES]
  n = type_count[idx].sum()
  out[f'{prefix}_adapt_loss'] = float(type_sum[idx].sum() / n) if n else float('nan')
  for k, member_sum in enumerate(np.atleast_1d(sums.get('member_loss_sum', []))):
    out[f'{prefix}_loss_member{k}'] = float(member_sum) / count if count else float('nan')
  return out


def update_early_stopping(state: TrainState, stop_loss: float, min_delta: float = 0.0
                          ) -> tuple[TrainState, bool]:
  """Records one dev evaluation (§3.3): improved resets the counter, else it counts up."""
  best = float(state.best_stop_loss)
  improved = bool(stop_loss < best - min_delta)
  if improved:
    return state.replace(best_stop_loss=jnp.float32(stop_loss),
                         evals_without_improvement=jnp.int32(0)), True
  return state.replace(
      evals_without_improvement=jnp.int32(int(state.evals_without_improvement) + 1)), False


def should_stop_early(state: TrainState, patience: int) -> bool:
  """True once ``patience`` evaluations in a row have not improved ``best_stop_loss``."""
  return int(state.evals_without_improvement) >= patience


def adaptation_indices(data_type: np.ndarray, *, fraction: float, seed: int, adapt_round: int
                       ) -> np.ndarray:
  """Training indices of one adaptation round (§3.4), sorted.

  All MStar and all YSO stars, plus a fresh random ``fraction`` of the Payne stars drawn from
  (seed, round): every round differs, and a resumed run redraws the same subset.
  """
  data_type = np.asarray(data_type)
  payne = np.flatnonzero(data_type == PAYNE)
  others = np.flatnonzero(data_type != PAYNE)
  rng = np.random.default_rng([int(seed), 0xADA, int(adapt_round)])
  n = round(fraction * len(payne))
  chosen = rng.choice(payne, size=n, replace=False) if n else np.zeros(0, np.int64)
  return np.sort(np.concatenate([others, chosen]).astype(np.int64))


def _check_finite(losses: Any, first_step: int) -> float:
  """Raises at the first non-finite loss of a call that began after ``first_step`` steps;
  returns the call's last loss."""
  losses = np.asarray(losses).reshape(-1)
  bad = np.flatnonzero(~np.isfinite(losses))
  if len(bad):
    raise TrainingError(
        f'non-finite training loss {losses[bad[0]]} at step {first_step + bad[0] + 1}: stopping '
        f'(lower the learning rate, check the inputs for huge fluxes, or resume from the last '
        f'good checkpoint)')
  return float(losses[-1])


# ------------------------------------------------------------------------------------------------
# Epoch inputs: (xs, k) pairs for ``make_train_steps``, k ≤ steps_per_call steps per call.


def stream_inputs(batches: Iterable[Mapping[str, np.ndarray]], standardizer: Standardizer,
                  mesh: Mesh, steps_per_call: int = 1) -> Iterator[tuple[dict, int]]:
  """Host batches (``input_pipeline.train_batches``) stacked k at a time and sharded."""
  batches = iter(batches)
  while chunk := list(itertools.islice(batches, steps_per_call)):
    stacked = {k: np.stack([b[k] for b in chunk]) for k in ('flux', 'labels', 'data_type', 'mask')
               if k in chunk[0]}
    yield put_chunk(stacked, standardizer, mesh), len(chunk)


def memory_inputs(arrays: memory_data.SplitArrays, batch_indices: np.ndarray,
                  standardizer: Standardizer, mesh: Mesh, steps_per_call: int = 1
                  ) -> Iterator[tuple[dict, int]]:
  """k batches at a time gathered from host memory; ``batch_indices`` (batches, B_local)."""
  for start in range(0, len(batch_indices), steps_per_call):
    rows = batch_indices[start:start + steps_per_call]
    yield put_chunk(arrays.gather(rows), standardizer, mesh), len(rows)


def resident_inputs(split: Mapping[str, jax.Array], batch_indices: np.ndarray, mesh: Mesh,
                    steps_per_call: int = 1) -> Iterator[tuple[tuple, int]]:
  """k global batches of row indices at a time; the flux never leaves the devices.
  ``batch_indices`` (batches, B_global) from ``global_batch_indices``."""
  for start in range(0, len(batch_indices), steps_per_call):
    rows = np.asarray(batch_indices[start:start + steps_per_call], np.int32)
    yield (split, replicate(rows, mesh)), len(rows)


def global_batch_indices(indices: np.ndarray, local_batch: int, *, seed: int, epoch: int,
                         mesh: Mesh, start_batch: int = 0) -> np.ndarray:
  """(batches, B_global) rows of the global batches: each process's stream batch side by side in
  the mesh's process order, which is how ``shard_batch`` assembles the streamed batches."""
  processes = list(dict.fromkeys(d.process_index for d in mesh.devices.flat))
  return np.concatenate([
      input_pipeline.epoch_batch_indices(indices, local_batch, seed=seed, epoch=epoch,
                                         shard_index=p, shard_count=len(processes),
                                         start_batch=start_batch)
      for p in processes], axis=1)


# ------------------------------------------------------------------------------------------------
# Epoch loops.


def train_epoch(state: TrainState, train_steps: Callable, inputs: Iterable[tuple[Any, int]], *,
                batch_size: int, num_batches: int,
                stop_requested: Callable[[int], bool] = lambda step: False,
                progress: bool = True, log_every_steps: int = 0
                ) -> tuple[TrainState, dict[str, Any] | None, bool]:
  """Runs ``train_steps`` (``make_train_steps``) on each (xs, k) of ``inputs``.

  Returns (state, metrics summed over the steps, interrupted). ``batch_size`` is this process's
  batch. The losses are fetched one call late so the host keeps the device queue full; a
  non-finite loss raises ``TrainingError`` at most k steps after it occurred. ``stop_requested``
  (``StopRequest``) is asked after every call with the step reached, so an interrupt stops at a
  step boundary.
  """
  sums, pending = None, None
  last_loss = float('nan')
  interrupted = False
  start = time.perf_counter()
  seen = 0
  # Host-side copies of the counters: reading state.step would wait for the steps just queued.
  step, epoch_step, epoch = int(state.step), int(state.epoch_step), int(state.epoch) + 1
  bar = tqdm.tqdm(total=num_batches, initial=epoch_step, unit='batch', leave=False,
                  disable=not (progress and sys.stderr.isatty()))
  for xs, k in inputs:
    state, metrics, losses = train_steps(state, xs)
    if pending is not None:  # The previous call's losses: ready by now, or nearly.
      last_loss = _check_finite(*pending)
    pending = (losses, step)
    step, epoch_step = step + k, epoch_step + k
    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    seen += k * batch_size
    rate = seen * jax.process_count() / max(time.perf_counter() - start, 1e-9)
    bar.update(k)
    bar.set_postfix(loss=f'{last_loss:.4f}', spectra_per_s=f'{rate:.0f}', refresh=False)
    if (log_every_steps and bar.disable
        and epoch_step // log_every_steps > (epoch_step - k) // log_every_steps):
      logging.info('step %d (epoch %d, batch %d/%d): loss %.5f, %.0f spectra/s',
                   step, epoch, epoch_step, num_batches, last_loss, rate)
    if stop_requested(step):
      interrupted = True
      break
  bar.close()
  if pending is not None:
    _check_finite(*pending)
  if sums is not None:
    sums = dict(sums)
    sums['spectra_per_s'] = seen * jax.process_count() / max(time.perf_counter() - start, 1e-9)
  return state, sums, interrupted


def evaluate_split(params: Any, eval_step: Callable, batches: Iterable[dict],
                   standardizer: Standardizer, mesh: Mesh, prefix: str = 'dev') -> dict[str, float]:
  """Mean standardised MSE over a split, overall and per data type (padded rows masked out)."""
  sums = None
  for batch in batches:
    m = eval_step(params, device_batch(batch, standardizer, mesh))
    sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
  if sums is None:
    raise TrainingError(f'the {prefix} split is empty')
  return summarize(sums, prefix)


# ------------------------------------------------------------------------------------------------
# Signals.


class StopRequest:
  """Whether to stop at this step boundary, the same answer on every process.

  One process: SIGTERM or SIGINT sets a flag (a second signal raises KeyboardInterrupt: the user
  insists). Several processes (``jax.distributed``): a signal reaches one process, and a process
  that stopped on its own would leave the others waiting in the next collective, so the stop is
  agreed through orbax's ``CheckpointManager.reached_preemption(step)``. It is JAX's preemption
  service: ``jax.distributed.initialize`` installs a SIGTERM notifier that tells the coordination
  service, which picks one step (after every process's latest) at which every process's check
  returns True. This object therefore leaves SIGTERM to JAX and turns SIGINT into a SIGTERM to
  its own process. The check must run the same number of times on every process: once per call
  of the train steps.
  """

  def __init__(self, manager: Any = None):
    self.manager = manager
    self.coordinated = manager is not None and jax.process_count() > 1
    self.signum = None

  def __call__(self, step: int) -> bool:
    if self.coordinated:
      return self.manager.reached_preemption(step)
    return self.signum is not None

  def handler(self, signum, frame):
    del frame
    if self.coordinated:
      logging.warning('Received signal %d: passing it to JAX\'s preemption service as SIGTERM.',
                      signum)
      os.kill(os.getpid(), signal.SIGTERM)
      return
    if self.signum is not None:  # A second signal: the user insists.
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning('Received signal %d: saving a checkpoint after this step, then exiting.',
                    signum)

  @contextlib.contextmanager
  def installed(self) -> Iterator['StopRequest']:
    """Installs the handlers for the body (main thread only) and restores the old ones."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    signals = (signal.SIGINT,) if self.coordinated else (signal.SIGTERM, signal.SIGINT)
    old = {sig: signal.signal(sig, self.handler) for sig in signals}
    try:
      yield self
    finally:
      for sig, handler in old.items():
        signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------
# The whole procedure.


# The config fields that define the optimiser (create_optimizer); the compiled steps are cached
# on their values.
_OPTIMIZER_FIELDS = ('optimizer', 'learning_rate', 'momentum', 'weight_decay', 'lr_schedule',
                     'warmup_steps', 'decay_steps', 'lr_final_fraction', 'grad_clip_norm',
                     'lr_batch_scaling', 'lr_reference_batch', 'batch_size')


def _optimizer_key(config: ml_collections.ConfigDict) -> tuple:
  return tuple((k, config[k]) for k in _OPTIMIZER_FIELDS if k in config)


@functools.lru_cache(maxsize=4)
def _compiled_steps(model: APOGEENet, optimizer_key: tuple, mesh: Mesh,
                    ensemble_size: int = 1):
  """(train_step, eval_step), cached so repeated runs in one process (tests, notebooks,
  resumes) reuse the compiled executables."""
  tx = create_optimizer(ml_collections.ConfigDict(dict(optimizer_key)))
  return (make_train_step(model, tx, mesh, ensemble_size),
          make_eval_step(model, mesh, ensemble_size))


@functools.lru_cache(maxsize=8)
def _compiled_train_steps(model: APOGEENet, optimizer_key: tuple, mesh: Mesh, resident: bool,
                          ensemble_size: int = 1):
  """``make_train_steps`` with the optimiser of ``_compiled_steps``, cached the same way."""
  tx = create_optimizer(ml_collections.ConfigDict(dict(optimizer_key)))
  return make_train_steps(model, tx, mesh, resident=resident, ensemble_size=ensemble_size)


def _abstract(state: TrainState, mesh: Mesh) -> TrainState:
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _sources(config: ml_collections.ConfigDict, sources: Mapping[str, Sequence] | None
             ) -> tuple[Sequence, Sequence]:
  if sources is not None:
    return sources['train'], sources['dev']
  if not config.data_dir:
    raise TrainingError('config.data_dir is empty: point it at a built tfds data dir')
  return (input_pipeline.open_split(config.data_dir, 'train', config.dataset_name),
          input_pipeline.open_split(config.data_dir, 'dev', config.dataset_name))


def resolve_input_scale(config: ml_collections.ConfigDict, train_source: Sequence) -> float:
  """``config.input_scale`` if > 0, else the median flux of the training set (a fixed sample,
  so a resumed run computes the same value)."""
  scale = float(config.get('input_scale', 1.0))
  if scale > 0:
    return scale
  scale = input_pipeline.median_flux(train_source)
  logging.info('Input scale: median training flux %.6g (1e-17 erg/s/cm²/Å).', scale)
  return scale


def _standardizer(config, train_labels: np.ndarray, init_meta: Mapping | None) -> Standardizer:
  if init_meta is not None:  # Adaptation keeps the normalisation the model was trained with.
    return checkpoint.standardizer_from_meta(init_meta)
  if config.standardizer == 'paper':
    return PAPER_STANDARDIZER
  if config.standardizer == 'fit':
    return Standardizer.fit(train_labels)
  raise TrainingError(f"config.standardizer must be 'fit' or 'paper', got "
                      f'{config.standardizer!r}')


def _device_budget_bytes(config: ml_collections.ConfigDict) -> float:
  """config.device_memory_budget_gb, or half of what the device reports (the rest is for the
  model, its activations and XLA); a device that reports nothing (CPU) gets the host budget."""
  if config.device_memory_budget_gb:
    return config.device_memory_budget_gb * 1e9
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return 0.5 * stats['bytes_limit']
  return config.memory_budget_gb * 1e9


def choose_input(config: ml_collections.ConfigDict, num_train: int, num_dev: int, mesh: Mesh
                 ) -> tuple[str, bool]:
  """('memory' or 'stream', whether the training split sits on the devices) for this run.

  ``input_mode='auto'`` takes memory when the process's share of train + dev fits
  ``memory_budget_gb``; ``data_on_device='auto'`` puts the training flux on the devices when each
  device's block fits the device budget. Across processes, memory mode needs the device-resident
  layout (a process holds only its devices' rows, but its stream batches draw from every row).
  """
  mode = config.input_mode
  if mode not in ('auto', 'memory', 'stream'):
    raise TrainingError(f"config.input_mode must be 'auto', 'memory' or 'stream', got {mode!r}")
  on_device_option = str(config.data_on_device).lower()
  if on_device_option not in ('auto', 'true', 'false'):
    raise TrainingError(f"config.data_on_device must be 'auto', 'true' or 'false', got "
                        f'{config.data_on_device!r}')
  if config.steps_per_call < 1:
    raise TrainingError(f'config.steps_per_call must be ≥ 1, got {config.steps_per_call}')
  try:
    per_spectrum = memory_data.bytes_per_spectrum(config.memory_dtype)
  except ValueError as e:
    raise TrainingError(f'config.memory_dtype: {e}') from e
  if mode == 'stream':
    return 'stream', False
  processes = jax.process_count()
  host_bytes = (num_train + num_dev) * per_spectrum / processes
  if host_bytes > config.memory_budget_gb * 1e9:
    if mode == 'auto':
      logging.info('Streaming: the splits need %.1f GB, over memory_budget_gb=%g.',
                   host_bytes / 1e9, config.memory_budget_gb)
      return 'stream', False
    logging.warning('input_mode=memory: %.1f GB per process, over memory_budget_gb=%g.',
                    host_bytes / 1e9, config.memory_budget_gb)
  flux_bytes = N_PIXELS * memory_data.storage_dtype(config.memory_dtype).itemsize
  device_bytes = -(-num_train // mesh.devices.size) * flux_bytes + num_train * 16
  on_device = (on_device_option == 'true' or
               (on_device_option == 'auto' and device_bytes <= _device_budget_bytes(config)))
  if processes > 1 and not on_device:
    if mode == 'memory':
      raise TrainingError('input_mode=memory across processes needs the training split on the '
                          f'devices ({device_bytes / 1e9:.1f} GB per device): raise '
                          'device_memory_budget_gb, set data_on_device=true, or stream')
    return 'stream', False
  logging.info('Input: memory (%s), training flux %s (%.2f GB per device).', config.memory_dtype,
               'on the devices' if on_device else 'in host RAM', device_bytes / 1e9)
  return 'memory', on_device


def _read_splits(config: ml_collections.ConfigDict, train_source: Sequence, dev_source: Sequence,
                 mesh: Mesh, *, memory: bool, on_device: bool, dev_indices: np.ndarray
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray], Any]:
  """(training data for ``_epoch_inputs``, training metadata, dev split in memory or None).

  One pass over each split either way: the stream reads only the labels now; memory mode keeps
  the flux of the rows this process needs (its devices' blocks, or all) and its dev shard.
  """
  if not memory:
    logging.info('Reading labels of %d training spectra …', len(train_source))
    meta = input_pipeline.read_metadata(train_source, num_threads=config.num_threads)
    return {'source': train_source}, meta, None
  logging.info('Loading %d training and %d dev spectra into memory …', len(train_source),
               len(dev_source))
  load = functools.partial(memory_data.load_split, dtype=config.memory_dtype,
                           num_threads=config.num_threads)
  where = f' of {config.data_dir}' if config.data_dir else ''
  arrays = load(train_source, name=f'train split{where}',
                rows=resident_rows(len(train_source), mesh) if on_device else None)
  return ({'arrays': arrays}, arrays.metadata(),
          load(dev_source, rows=dev_indices, name=f'dev split{where}'))


def _epoch_inputs(config: ml_collections.ConfigDict, data: Mapping[str, Any],
                  standardizer: Standardizer, mesh: Mesh, *, local_batch: int, epoch: int,
                  indices: np.ndarray, start_batch: int) -> Iterator[tuple[Any, int]]:
  """One epoch's (xs, k) from ``data``: {'source'} streamed, {'arrays'} in host memory or
  {'resident'} on the devices. All three yield the batches of ``epoch_batch_indices``."""
  k = config.steps_per_call
  if 'resident' in data:
    rows = global_batch_indices(indices, local_batch, seed=config.seed, epoch=epoch, mesh=mesh,
                                start_batch=start_batch)
    return resident_inputs(data['resident'], rows, mesh, k)
  shard = {'shard_index': jax.process_index(), 'shard_count': jax.process_count()}
  if 'arrays' in data:
    rows = input_pipeline.epoch_batch_indices(indices, local_batch, seed=config.seed, epoch=epoch,
                                              start_batch=start_batch, **shard)
    return memory_inputs(data['arrays'], rows, standardizer, mesh, k)
  batches = input_pipeline.train_batches(
      data['source'], local_batch, seed=config.seed, epoch=epoch, indices=indices,
      start_batch=start_batch, num_threads=config.num_threads,
      prefetch_batches=config.prefetch_batches, **shard)
  return stream_inputs(batches, standardizer, mesh, k)


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
  """
  workdir = file_io.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
    run, state, resumed = _setup(config, workdir, sources)
    try:
      if config.adapt and not resumed:
        state = _start_adaptation(run, state)
      with StopRequest(run.manager).installed() as stop:
        while not _finished(run, state):
          if should_stop_early(state, config.patience):  # The end of an adaptation round.
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
  train_data: dict[str, Any]  # {'source'}, {'arrays'} or {'resident'}: see ``_epoch_inputs``
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


# On disk the early-stopping best keeps its first name, so checkpoints written before the field
# was renamed still restore (orbax matches the tree by key).
_SAVED_NAMES = {'best_stop_loss': 'best_dev_loss'}


def _to_saved(state: TrainState) -> dict[str, Any]:
  return {_SAVED_NAMES.get(f.name, f.name): getattr(state, f.name)
          for f in dataclasses.fields(state)}


def _from_saved(saved: Mapping[str, Any]) -> TrainState:
  return TrainState(**{f.name: saved[_SAVED_NAMES.get(f.name, f.name)]
                       for f in dataclasses.fields(TrainState)})


def _restore_state(manager: Any, step: int, abstract_state: TrainState) -> TrainState:
  saved, _ = checkpoint.restore_state(manager, step, _to_saved(abstract_state))
  return _from_saved(saved)


def _batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[int, int]:
  """(this process's training batch, its evaluation batch); the global evaluation batch is
  rounded up to a multiple of the device count."""
  n_dev, processes = mesh.devices.size, jax.process_count()
  if config.batch_size % n_dev or config.batch_size % processes:
    raise TrainingError(f'batch_size {config.batch_size} is not divisible by {n_dev} devices')
  eval_batch = -(-config.eval_batch_size // n_dev) * n_dev
  return config.batch_size // processes, eval_batch // processes


def _initial_model(config: ml_collections.ConfigDict, train_source: Sequence
                   ) -> tuple[APOGEENet, Any, dict[str, Any] | None]:
  """(model, params to start from or None, their checkpoint meta or None).

  Adaptation continues the init_from model: its architecture and normalisation, this config's
  dropout and optimiser.
  """
  if not config.adapt:
    model = create_model(config).clone(input_scale=resolve_input_scale(config, train_source))
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
  model = checkpoint.model_from_meta(init_meta).clone(dropout_rate=config.dropout_rate)
  return model, init_params, init_meta


def _setup(config: ml_collections.ConfigDict, workdir: epath.Path,
           sources: Mapping[str, Sequence] | None) -> tuple[_Run, TrainState, bool]:
  """Reads the data, builds or restores the state; returns (run, state, resumed)."""
  mesh = make_mesh(config.get('num_devices', 0))
  local_batch, local_eval_batch = _batch_sizes(config, mesh)
  train_source, dev_source = _sources(config, sources)
  mode, on_device = choose_input(config, len(train_source), len(dev_source), mesh)
  dev_indices = np.arange(len(dev_source))[jax.process_index()::jax.process_count()]
  train_data, train_meta, dev_arrays = _read_splits(config, train_source, dev_source, mesh,
                                                    memory=mode == 'memory', on_device=on_device,
                                                    dev_indices=dev_indices)
  counts = {t: int(np.sum(train_meta['data_type'] == i)) for i, t in enumerate(DATA_TYPES)}
  logging.info('Training spectra per data type: %s; dev: %d', counts, len(dev_source))

  config = resolve_decay_steps(config, input_pipeline.num_train_batches(
      len(train_source), local_batch, jax.process_count()))
  model, init_params, init_meta = _initial_model(config, train_source)
  ensemble_size = int(config.get('ensemble_size', 1))
  tx = create_optimizer(config)
  state = replicate(create_ensemble_state(config.seed, model, tx, config.init, ensemble_size,
                                          config.get('zero_last_layer', False)), mesh)
  if init_params is not None:
    state = replicate(state.replace(params=init_params, opt_state=init_opt_state(
        tx, init_params, ensemble_size)), mesh)
  abstract_state = _abstract(state, mesh)
  # Two latest (plus the best): a damaged newest step still leaves one to resume from.
  manager = checkpoint.make_manager(checkpoint.workdir_checkpoints(workdir), keep_latest=2)
  restored = checkpoint.restore_newest(manager, _to_saved(abstract_state),
                                       set_aside=jax.process_index() == 0)
  if restored is not None:
    latest, saved, saved_meta = restored
    state, standardizer = _from_saved(saved), checkpoint.standardizer_from_meta(saved_meta)
    logging.info('Resumed %s at step %d (epoch %d, round %d).', workdir, latest,
                 int(state.epoch), int(state.adapt_round))
  else:
    latest, standardizer = None, _standardizer(config, train_meta['labels'], init_meta)

  meta = checkpoint.make_meta(
      model, standardizer, ensemble_size=ensemble_size, config=_config_json(config),
      dataset={'data_dir': config.data_dir, 'name': config.dataset_name,
               'train_counts': counts, 'num_dev': len(dev_source)},
      init_from=config.init_from if config.adapt else '')
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.discard_after(latest)  # Rows of epochs after the checkpoint are done again.
  optimizer_key = _optimizer_key(config)
  _, eval_step = _compiled_steps(model, optimizer_key, mesh, ensemble_size)
  if on_device:  # The host copy of the flux goes once the devices hold theirs.
    train_data = {'resident': place_split(train_data.pop('arrays'), standardizer, mesh)}
  evaluate = _dev_evaluator(config, dev_source, dev_arrays, dev_indices, local_eval_batch,
                            eval_step, standardizer, mesh)
  run = _Run(config=config, workdir=workdir, mesh=mesh, manager=manager,
             abstract_state=abstract_state, meta=meta, standardizer=standardizer, writer=writer,
             train_data=train_data, train_data_type=np.asarray(train_meta['data_type']),
             local_batch=local_batch, evaluate=evaluate,
             train_steps=_compiled_train_steps(model, optimizer_key, mesh, on_device,
                                               ensemble_size))
  return run, state, restored is not None


def _dev_evaluator(config: ml_collections.ConfigDict, dev_source: Sequence, dev_arrays: Any,
                   dev_indices: np.ndarray, local_eval_batch: int, eval_step: Callable,
                   standardizer: Standardizer, mesh: Mesh) -> Callable[[Any], dict[str, float]]:
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
    return evaluate_split(params, eval_step, batches, standardizer, mesh, 'dev')

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
  checkpoint.save(run.manager, step, _to_saved(state), run.meta,
                  None if stop_loss is None else {checkpoint.BEST_METRIC: stop_loss})


def _start_adaptation(run: _Run, state: TrainState) -> TrainState:
  """Round 1 of §3.4 must beat the model it starts from: its MStar+YSO dev loss is the first
  ``best_stop_loss``, saved as step 0's checkpoint."""
  dev = run.evaluate(state.params)
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
  if should_stop_early(state, config.patience):
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
  best = _restore_state(run.manager, run.manager.best_step(), run.abstract_state)
  return replicate(state.replace(
      params=best.params, opt_state=best.opt_state,
      evals_without_improvement=jnp.int32(0), adapt_round=state.adapt_round + 1,
      # A fresh array: the same buffer twice in one donated pytree is an XLA error.
      best_adapt_loss=jnp.float32(float(state.best_stop_loss)),
      adapt_rounds_without_improvement=jnp.int32(without)), run.mesh)


def _epoch_indices(run: _Run, state: TrainState) -> np.ndarray:
  """The training rows of this epoch: all, or this adaptation round's (§3.4)."""
  if not run.config.adapt:
    return np.arange(len(run.train_data_type))
  return adaptation_indices(run.train_data_type, fraction=run.config.payne_fraction,
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
  inputs = _epoch_inputs(config, run.train_data, run.standardizer, run.mesh,
                         local_batch=run.local_batch, epoch=epoch, indices=indices,
                         start_batch=int(state.epoch_step))
  t0 = time.perf_counter()
  state, sums, interrupted = train_epoch(
      state, run.train_steps, inputs, batch_size=run.local_batch, num_batches=num_batches,
      stop_requested=stop, progress=run.is_main, log_every_steps=config.log_every_steps)
  if interrupted:
    _save(run, state)
    logging.warning('Interrupted: saved step %d of epoch %d in %s; rerun the same command to '
                    'resume.', int(state.step), epoch + 1, run.workdir)
    return state, True
  dev = run.evaluate(state.params)
  state = state.replace(epoch=state.epoch + 1, epoch_step=jnp.int32(0))
  state, improved = update_early_stopping(state, dev[run.stop_loss_key], config.min_delta)
  state = replicate(state, run.mesh)
  scalars = {'epoch': epoch + 1, 'adapt_round': int(state.adapt_round),
             'epoch_seconds': time.perf_counter() - t0,
             'train_spectra_per_s': float(sums['spectra_per_s']) if sums else 0.0,
             **(summarize(sums, 'train') if sums else {}), **dev,
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
    best_state = _restore_state(run.manager, best, run.abstract_state)
    state = state.replace(params=best_state.params)
    logging.info('Best checkpoint: step %d, %s %.5f.', best, run.stop_loss_key,
                 float(best_state.best_stop_loss))
  run.manager.close()
  return state


__all__ = [
  'StopRequest',
  'TrainState',
  'TrainingError',
  'adaptation_indices',
  'choose_input',
  'create_ensemble_state',
  'create_model',
  'create_optimizer',
  'create_train_state',
  'evaluate_split',
  'global_batch_indices',
  'init_opt_state',
  'make_eval_step',
  'make_train_step',
  'make_train_steps',
  'memory_inputs',
  'place_split',
  'put_chunk',
  'replicate',
  'resident_inputs',
  'resident_rows',
  'resolve_decay_steps',
  'should_stop_early',
  'stream_inputs',
  'summarize',
  'train_and_evaluate',
  'train_epoch',
  'update_early_stopping',
]
