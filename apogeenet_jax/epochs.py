"""One epoch of training, one evaluation of a split, and the host-side bookkeeping between epochs:
summed metrics → Table 2's standardised MSE per data type, early stopping (§3.3) and the
training rows of an adaptation round (§3.4).
"""

import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.sharding import Mesh

from apogeenet_jax.constants import DATA_TYPES
from apogeenet_jax.normalization import Standardizer
from apogeenet_jax.train_inputs import device_batch
from apogeenet_jax.train_state import TrainingError, TrainState

# The data types whose dev loss drives adaptation (§3.4: "until MStar and YSO dev performance
# stops improving").
ADAPT_TYPES = ('MStar', 'YSO')


PAYNE = DATA_TYPES.index('Payne')


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


def update_early_stopping(state: TrainState, stop_loss: float, min_delta: float = 0.0,
                          counts: bool = True) -> tuple[TrainState, bool]:
  """Records one dev evaluation (§3.3): improved resets the counter, else it counts up.

  ``counts`` False (an epoch before ``config.early_stopping_from_epoch``): the best loss is
  still tracked, but an evaluation without improvement does not count against the patience.
  """
  best = float(state.best_stop_loss)
  improved = bool(stop_loss < best - min_delta)
  if improved:
    return state.replace(best_stop_loss=jnp.float32(stop_loss),
                         evals_without_improvement=jnp.int32(0)), True
  without = int(state.evals_without_improvement) + 1 if counts else 0
  return state.replace(evals_without_improvement=jnp.int32(without)), False


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


def check_finite(losses: Any, first_step: int) -> float:
  """Raises at the first non-finite loss or gradient norm of a call that began after
  ``first_step`` steps; returns the call's last loss.

  ``losses``: {'loss': (k,), 'grad_norm': (k,)} (``steps.make_train_steps``) or a (k,) loss.
  """
  norms = None
  if isinstance(losses, Mapping):
    losses, norms = losses['loss'], np.asarray(losses['grad_norm']).reshape(-1)
  losses = np.asarray(losses).reshape(-1)
  bad = np.flatnonzero(~np.isfinite(losses))
  if len(bad):
    raise TrainingError(
        f'non-finite training loss {losses[bad[0]]} at step {first_step + bad[0] + 1}: stopping '
        f'(lower the learning rate, check the inputs for huge fluxes, or resume from the last '
        f'good checkpoint)')
  bad = np.flatnonzero(~np.isfinite(norms)) if norms is not None else ()
  if len(bad):
    # Clipping would scale this update, and every later one like it, to zero: no learning.
    raise TrainingError(
        f'non-finite gradient norm at step {first_step + bad[0] + 1} (loss {losses[bad[0]]:.4g}):'
        f' stopping, the update would be zero. A spectrum with absurd flux (e.g. 1e38) is the '
        f'usual cause: rebuild the data set, whose flux range check skips such files.')
  return float(losses[-1])


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
      last_loss = check_finite(*pending)
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
    check_finite(*pending)
  if sums is not None:
    sums = dict(sums)
    sums['spectra_per_s'] = seen * jax.process_count() / max(time.perf_counter() - start, 1e-9)
  return state, sums, interrupted


def evaluate_split(params: Any, eval_step: Callable, batches: Iterable[dict],
                   input_names: Sequence[str], standardizer: Standardizer, mesh: Mesh,
                   prefix: str = 'dev') -> dict[str, float]:
  """Mean standardised MSE over a split, overall and per data type (padded rows masked out);
  ``input_names``: the model's inputs (``models.Family.inputs``)."""
  sums = None
  for batch in batches:
    m = eval_step(params, device_batch(batch, input_names, standardizer, mesh))
    sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
  if sums is None:
    raise TrainingError(f'the {prefix} split is empty')
  return summarize(sums, prefix)
