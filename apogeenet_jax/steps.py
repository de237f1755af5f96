"""The jitted steps: the data-parallel SGD step (one or k fused per call) and the evaluation step.

One jitted step over every device of a 1-D ('data',) mesh: ``jax.shard_map`` runs per-device code
on each device's slice of the global batch and averages the loss — and so the gradient — over the
named axis (pmap semantics). Deep ensembles (K > 1) carry a leading member axis in params,
opt_state and rng; the members run in one ``vmap`` on GPU/TPU and as K straight-line copies on a
CPU (``members_unrolled``). The steps are pure, (state, batch) → (state, metrics), and compiled
once per (model, optimiser, mesh, layout): ``compiled_train_steps``, ``compiled_eval_step``.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from apogeenet_jax import optimizer
from apogeenet_jax.constants import DATA_TYPES
from apogeenet_jax.sharding import DATA_AXIS, INPUTS_KEY, NOISE_KEY, resident_specs
from apogeenet_jax.train_state import TrainState


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
  --ensemble_sizes=1,2,4``): see docs/uncertainties.md, "The cost of K members".
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


def _label_mse(pred: jax.Array, targets: jax.Array, loss_weights: tuple[float, ...] | None,
               huber_delta: float = 0.0) -> jax.Array:
  """Per-example mean over the labels of the squared standardised residual (§3.3), each label
  weighted by ``loss_weights`` scaled to mean 1 (None or all equal: the paper's MSE exactly).

  ``huber_delta`` δ > 0: twice optax's Huber loss instead of the square — the square itself for
  |residual| ≤ δ (standardised units), 2δ·|residual| − δ² beyond, so a label the spectrum does
  not determine (a hot star's [Fe/H]) pushes the gradient by at most δ. 0: the square (bit for
  bit as before the option)."""
  if huber_delta:
    square = 2.0 * optax.losses.huber_loss(pred, targets, delta=huber_delta)
  else:
    square = jnp.square(pred - targets)
  if loss_weights is not None and len(set(loss_weights)) > 1:
    w = np.asarray(loss_weights, np.float64)
    square = square * jnp.asarray(w / w.mean(), square.dtype)
  return jnp.mean(square, axis=-1)


def add_training_noise(inputs: Mapping[str, jax.Array], noise_scale: Mapping[str, jax.Array],
                       rng: jax.Array, noise_augmentation: float) -> dict[str, jax.Array]:
  """A fresh noisy copy of the batch's inputs: x + a · N(0, 1) · noise_scale per value, for each
  input that has a noise scale (the others pass unchanged).

  ``noise_scale`` of the flux is the Monte Carlo's (``uncertainty.prepare_errors``: errors capped
  at 5× the spectrum's median, no noise where the error is BAD_PIXEL_ERROR), so with a = 1 every
  step sees spectra drawn like the MC draws of evaluation, and a network cannot learn the one
  noise realisation of each training spectrum by heart. The first noisy input (in name order)
  draws from ``rng`` itself, input j > 0 from ``fold_in(rng, j)``.
  """
  out = dict(inputs)
  for j, name in enumerate(sorted(noise_scale)):
    x = inputs[name]
    key = rng if j == 0 else jax.random.fold_in(rng, j)
    eps = jax.random.normal(key, x.shape, x.dtype)
    out[name] = x + jnp.asarray(noise_augmentation, x.dtype) * eps * noise_scale[name].astype(x.dtype)
  return out


# fold_in of the per-step dropout key that gives the training noise its own stream.
_NOISE_STREAM = 1


def _local_train_step(model: nn.Module, tx: optax.GradientTransformation, ensemble_size: int = 1,
                      unroll_members: bool = False, loss_weights: tuple[float, ...] | None = None,
                      noise_augmentation: float = 0.0, huber_delta: float = 0.0
                      ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The per-device SGD step, to run under ``shard_map`` over the 'data' axis.

  ``loss_weights``: one weight per label on the training loss (``_label_mse``), which the
  train-loss metrics report; the dev loss (early stopping, Table 2) stays the paper's MSE.
  ``noise_augmentation`` a > 0: the batch carries 'noise' (its MC noise scale) and the step trains
  on ``add_training_noise`` of it, fresh noise every step, reproducible from (rng, step, device);
  0 trains on the spectra as stored (the paper), bit for bit as before this option.

  ``ensemble_size`` K > 1: the state's params, opt_state, rng and model_state carry a leading
  member axis; every member takes its step on the same batch (vmap inside the per-device
  function, or K straight-line copies with ``unroll_members``: ``members_unrolled``); the metrics
  are the members' mean, with 'member_loss_sum' (K,) beside them.

  A network with state (``TrainState.model_state``: APOGEE Net III's batch norm) normalises with
  each device's own batch statistics in the forward pass, and the running averages it updates
  are then averaged over the devices (``lax.pmean``), so every device keeps the same state: the
  running mean is exactly that of the global batch, the running variance the mean of the
  devices' variances. On one device the step is the module's own.
  """

  def member_step(params, opt_state, rng, model_state, step, batch):
    # Different dropout masks per device, reproducible from (rng, step).
    dropout_rng = jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(DATA_AXIS))
    w = batch['mask'].astype(jnp.float32)
    inputs = batch[INPUTS_KEY]
    if noise_augmentation:
      if NOISE_KEY not in batch:
        raise ValueError(f'noise_augmentation > 0 needs the batch\'s noise scale ({NOISE_KEY!r})')
      inputs = add_training_noise(inputs, batch[NOISE_KEY],
                                  jax.random.fold_in(dropout_rng, _NOISE_STREAM), noise_augmentation)

    def loss_fn(params):
      variables = {'params': params, **model_state}
      if model_state:  # Batch norm: the batch's statistics, and the updated running averages.
        pred, new_state = model.apply(variables, **inputs, train=True,
                                      rngs={'dropout': dropout_rng}, mutable=list(model_state))
      else:
        pred, new_state = model.apply(variables, **inputs, train=True,
                                      rngs={'dropout': dropout_rng}), model_state
      per_example = _label_mse(pred, batch['targets'], loss_weights, huber_delta)  # §3.3
      # The GLOBAL mean, reduced over the axis INSIDE the differentiated function: the gradient of
      # a replicated input already carries the psum, so pmean-ing gradients afterwards would give
      # N× the true gradient (docs/jax_stack_notes.md, "The shard_map gradient trap").
      loss = lax.psum(jnp.sum(per_example * w), DATA_AXIS) / lax.psum(jnp.sum(w), DATA_AXIS)
      return loss, (per_example, new_state)

    (loss, (per_example, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    model_state = jax.tree.map(lambda x: lax.pmean(x, DATA_AXIS), lax.stop_gradient(new_state))
    # An overflowing norm (absurd but finite flux) makes clipping scale every update to zero
    # while the loss stays finite: a silent no-op. It is returned, and the host stops on it.
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = _masked_sums(lax.stop_gradient(per_example), batch['data_type'], batch['mask'])
    metrics['loss'] = loss
    metrics['grad_norm'] = grad_norm
    return params, opt_state, model_state, metrics

  def local_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    if ensemble_size == 1:
      params, opt_state, model_state, metrics = member_step(
          state.params, state.opt_state, state.rng, state.model_state, state.step, batch)
    else:
      # Collectives inside (the loss's psum over 'data') are per member, batched by vmap or
      # one per unrolled copy, so each member's gradient is its own global-batch mean gradient.
      params, opt_state, model_state, metrics = _over_members(
          member_step, unroll_members, (0, 0, 0, 0, None, None))(
          state.params, state.opt_state, state.rng, state.model_state, state.step, batch)
      metrics = _member_mean(metrics)
    new_state = state.replace(params=params, opt_state=opt_state, model_state=model_state,
                              step=state.step + 1, epoch_step=state.epoch_step + 1)
    return new_state, metrics

  return local_step


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    ensemble_size: int = 1, unroll_members: bool | None = None,
                    loss_weights: tuple[float, ...] | None = None, noise_augmentation: float = 0.0,
                    huber_delta: float = 0.0
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The jitted data-parallel SGD step: (state, global batch) → (state, summed metrics); for
  ``ensemble_size``, ``loss_weights`` and ``noise_augmentation`` see ``_local_train_step``;
  ``unroll_members`` None: ``members_unrolled``."""
  if unroll_members is None:
    unroll_members = members_unrolled(mesh)
  local_step = _local_train_step(model, tx, ensemble_size, unroll_members, loss_weights,
                                 noise_augmentation, huber_delta)
  step = jax.shard_map(local_step, mesh=mesh,
                       in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=0)


def gather_resident(data: Mapping[str, jax.Array], idx: jax.Array, n_dev: int
                     ) -> dict[str, jax.Array]:
  """This device's slice of the global batch ``idx`` (B,) from a split placed by ``place_split``.

  Runs under ``shard_map``. Each device holds one block of rows of every input, so it gathers the rows of
  the global batch that fall in its block (zeros elsewhere) and a reduce-scatter hands every
  device the sum for its own slice: exactly its rows, as every other device contributed zeros.
  The traffic is one global batch of inputs per step (4.4 MB of flux at batch 128), whatever the split
  size, and each process only ever holds its own block.
  """
  local_batch = idx.shape[0] // n_dev
  device = lax.axis_index(DATA_AXIS)
  mine = lax.dynamic_slice_in_dim(idx, device * local_batch, local_batch)

  def rows_of(blocked):  # this device's rows of a (rows, …) array held in blocks
    if n_dev == 1:
      return jnp.take(blocked, mine, axis=0).astype(jnp.float32)
    block = blocked.shape[0]
    local = idx - device * block
    owned = (local >= 0) & (local < block)
    rows = jnp.take(blocked, jnp.where(owned, local, 0), axis=0)
    rows = jnp.where(owned.reshape(-1, *(1,) * (rows.ndim - 1)), rows, jnp.zeros((), rows.dtype))
    return lax.psum_scatter(rows, DATA_AXIS, scatter_dimension=0, tiled=True).astype(jnp.float32)

  # The noise scales of noise augmentation, when the split carries them, travel like the inputs.
  return {**{k: jax.tree.map(rows_of, data[k]) for k in (INPUTS_KEY, NOISE_KEY) if k in data},
          'targets': jnp.take(data['targets'], mine, axis=0),
          'data_type': jnp.take(data['data_type'], mine, axis=0),
          'mask': jnp.ones(local_batch, bool)}


def make_train_steps(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, *,
                     resident: bool = False, ensemble_size: int = 1,
                     loss_weights: tuple[float, ...] | None = None,
                     noise_augmentation: float = 0.0, huber_delta: float = 0.0
                     ) -> Callable[[TrainState, Any], tuple]:
  """k SGD steps in one jitted ``lax.scan``: (state, xs) → (state, metrics summed over the k
  steps, {'loss': (k,), 'grad_norm': (k,)} of each step).

  ``resident=False``: xs is k stacked global batches, {'inputs': {'flux': (k, B, 8575), …}, 'targets' (k, B, 3),
  'data_type', 'mask'} sharded over the 'data' axis on dimension 1 (``put_chunk``).
  ``resident=True``: xs = (split, idx): a split placed on the devices by ``place_split`` and
  idx (k, B) int32 global rows, replicated; each step gathers its batch on the device.
  With ``noise_augmentation`` > 0 the batches (or the resident split, ``resident_specs``) also
  carry 'noise', the MC noise scale of each spectrum.
  k comes from the input's shape (a shorter last chunk compiles once more). One scan step is the
  same computation as ``make_train_step`` (``ensemble_size`` likewise, ``loss_weights`` and
  ``noise_augmentation`` see ``_local_train_step``); fusing k of them saves k − 1 host round
  trips.
  """
  # The CPU's two straight-line rules (convolutions are slow inside loops and grouped): the
  # scan over steps and the ensemble's members are both unrolled there.
  unroll = members_unrolled(mesh)
  local_step = _local_train_step(model, tx, ensemble_size, unroll, loss_weights,
                                 noise_augmentation, huber_delta)
  n_dev = mesh.shape[DATA_AXIS]

  def run(state, xs):
    if resident:
      split, seq = xs
      batch_of = functools.partial(gather_resident, split, n_dev=n_dev)
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
    losses = {'loss': per_step.pop('loss'), 'grad_norm': per_step.pop('grad_norm')}
    return state, jax.tree.map(lambda m: jnp.sum(m, axis=0), per_step), losses

  xs_spec = ((resident_specs(noise_augmentation > 0), P()) if resident else P(None, DATA_AXIS))
  return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), xs_spec),
                               out_specs=(P(), P(), P())), donate_argnums=0)


def make_eval_step(model: nn.Module, mesh: Mesh, ensemble_size: int = 1
                   ) -> Callable[[Any, dict], dict]:
  """The jitted data-parallel evaluation: (params, padded global batch) → summed metrics
  (for K > 1 the members' mean, with 'member_loss_sum' (K,))."""

  def member_eval(params: Any, batch: dict) -> dict:
    # ``params``: the parameter tree, or a network's Flax variables with its running statistics.
    variables = params if 'params' in params else {'params': params}
    pred = model.apply(variables, **batch[INPUTS_KEY], train=False)
    per_example = _label_mse(pred, batch['targets'], None)  # the dev loss: unweighted
    return _masked_sums(per_example, batch['data_type'], batch['mask'])

  def local_eval(params: Any, batch: dict) -> dict:
    if ensemble_size == 1:
      return member_eval(params, batch)
    return _member_mean(_over_members(member_eval, members_unrolled(mesh), (0, None))(
        params, batch))

  return jax.jit(jax.shard_map(local_eval, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                               out_specs=P()))


@functools.lru_cache(maxsize=4)
def compiled_eval_step(model: nn.Module, mesh: Mesh, ensemble_size: int = 1):
  """``make_eval_step``, cached so repeated runs in one process (tests, notebooks, resumes)
  reuse the compiled executable."""
  return make_eval_step(model, mesh, ensemble_size)


@functools.lru_cache(maxsize=8)
def compiled_train_steps(model: nn.Module, optimizer_key: tuple, mesh: Mesh, resident: bool,
                         ensemble_size: int = 1, loss_weights: tuple[float, ...] | None = None,
                         noise_augmentation: float = 0.0, huber_delta: float = 0.0):
  """``make_train_steps`` with the optimiser of ``optimizer.optimizer_key`` (the whole
  ``config.optim`` and the batch size), cached the same way."""
  tx = optimizer.from_key(optimizer_key)
  return make_train_steps(model, tx, mesh, resident=resident, ensemble_size=ensemble_size,
                          loss_weights=loss_weights, noise_augmentation=noise_augmentation,
                          huber_delta=huber_delta)
