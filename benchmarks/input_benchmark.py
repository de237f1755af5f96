r"""Input path throughput: streamed vs in-memory data, with no model and in the training loop.

    python benchmarks/input_benchmark.py [--data_dir=data/tfds] [--num_stars=1500] [--repeats=3]

Without --data_dir it writes a SYNTHETIC survey of --num_stars stars and builds the `apogee`
data set in a temporary directory first (about a minute). Then, all in one process:

1. spectra/s delivered to the device with no model: the grain stream (decode + preprocess +
   batch + device_put), memory in host RAM (gather + device_put), memory on the device (the
   gather inside a jitted scan, as the train step does it), float32 and bfloat16 storage;
2. the full training loop (``epochs.train_epoch``) with a tiny model (channels 4,4; hidden 8,8)
   for each input path and steps_per_call 1 and 8, and (2b) the same with no convolution at all
   (channels (); hidden 8,8): on a CPU, XLA's convolution at 1–4 channels costs ~70 ms per layer
   per batch of 128, so only the conv-free model leaves the input path in charge;
3. the same loop with the paper's Appendix-B model for --paper_steps steps per path.

Every figure is the median over --repeats rounds; within a round the paths run one after the
other, so all see the same background load. Prints figures; asserts nothing. The last line is
the memory/stream ratio of the tiny-model loop (best memory configuration over best stream one).
"""

import functools
import itertools
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax import lax
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ at the top

from apogeenet_jax import (
    epochs,
    input_pipeline,
    memory_data,
    optimizer,
    sharding,
    steps,
    synthetic,
    train_inputs,
    train_state,
)
from apogeenet_jax.normalization import Standardizer
from benchmarks.common import cpu_model
from configs import default

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'A built tfds data dir; else a synthetic one.')
_NUM_STARS = flags.DEFINE_integer('num_stars', 1500, 'Synthetic survey size (no --data_dir).')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch (paper: 128).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Rounds; figures are medians over rounds.')
_EPOCHS = flags.DEFINE_integer('epochs', 2, 'Epochs per timed tiny-model / no-model run.')
_PAPER_STEPS = flags.DEFINE_integer('paper_steps', 4, 'Timed steps of the paper model per path.')
_THREADS = flags.DEFINE_integer('num_threads', 4, 'grain reader threads (config default 4).')


def _build(tmp: str) -> str:
  manual_dir, data_dir = os.path.join(tmp, 'manual'), os.path.join(tmp, 'tfds')
  from tfds_apogee import build as build_lib  # Heavy import, only when building.
  t0 = time.perf_counter()
  synthetic.write_survey(manual_dir, _NUM_STARS.value, seed=0, show_progress=False)
  build_lib.build(manual_dir, data_dir, num_workers=os.cpu_count() or 1)
  print(f'synthetic survey of {_NUM_STARS.value} stars written and built in '
        f'{time.perf_counter() - t0:.0f} s')
  return data_dir


class Paths:
  """The three input paths over one training split, each yielding an epoch's (xs, k)."""

  def __init__(self, source, mesh, batch_size: int):
    self.source, self.mesh, self.batch = source, mesh, batch_size
    t0 = time.perf_counter()
    self.arrays = memory_data.load_split(source, num_threads=_THREADS.value, name='train')
    self.load_seconds = time.perf_counter() - t0
    self.standardizer = Standardizer.fit(self.arrays.labels)
    self.resident = {
        dtype: train_inputs.place_split(
            self.arrays if dtype == 'float32' else memory_data.load_split(
                source, dtype=dtype, num_threads=_THREADS.value, name=f'train {dtype}'),
            self.standardizer, mesh)
        for dtype in ('float32', 'bfloat16')}
    self.indices = np.arange(len(source))

  def inputs(self, path: str, epoch: int, k: int):
    rows = input_pipeline.epoch_batch_indices(self.indices, self.batch, seed=0, epoch=epoch)
    if path == 'stream':
      batches = input_pipeline.train_batches(self.source, self.batch, seed=0, epoch=epoch,
                                             num_threads=_THREADS.value)
      return train_inputs.stream_inputs(batches, ('flux',), self.standardizer, self.mesh, k)
    if path == 'memory, host RAM':
      return train_inputs.memory_inputs(self.arrays, rows, ('flux',), self.standardizer, self.mesh, k)
    dtype = 'bfloat16' if 'bfloat16' in path else 'float32'
    return train_inputs.resident_inputs(self.resident[dtype], rows, self.mesh, k)


@functools.cache
def _resident_consumer(mesh):
  """What the train step does with device-resident data, minus the model: gather each step's
  batch and reduce it (so nothing is optimised away)."""
  n_dev = mesh.shape[sharding.DATA_AXIS]

  def run(split, idx):
    def body(total, rows):
      batch = steps.gather_resident(split, rows, n_dev)
      return total + lax.psum(jnp.sum(batch['flux']), sharding.DATA_AXIS), None
    return lax.scan(body, jnp.float32(0), idx)[0]

  return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(sharding.RESIDENT_SPECS, P()),
                               out_specs=P()))


@functools.cache
def _resolved_default():
  """configs/default.py with its cosine decay resolved (100 batches per epoch stand in)."""
  return optimizer.resolve_decay_steps(default.get_config(), 100)


def _train_steps(model, mesh, resident: bool):
  """Compiled once per model and path kind, as in training (``steps.compiled_train_steps``)."""
  tx = optimizer.from_key(optimizer.optimizer_key(_resolved_default()))
  return steps.make_train_steps(model, tx, mesh, resident=resident)


def deliver(paths: Paths, path: str, num_epochs: int) -> float:
  """Spectra/s that reach the device (blocked on), no model; epoch 0 untimed (compilation)."""
  count, t0 = 0, time.perf_counter()
  for epoch in range(num_epochs + 1):
    if epoch == 1:
      count, t0 = 0, time.perf_counter()
    for xs, k in paths.inputs(path, epoch, 8):
      if path.startswith('memory, device'):
        _resident_consumer(paths.mesh)(*xs).block_until_ready()
      else:
        jax.block_until_ready(xs['flux'])
      count += k * paths.batch
  return count / (time.perf_counter() - t0)


def loop(paths: Paths, path: str, model, k: int, num_epochs: int, max_steps: int | None = None
         ) -> float:
  """Spectra/s through ``epochs.train_epoch`` (first epoch of a fresh state untimed: compile)."""
  tx = optimizer.from_key(optimizer.optimizer_key(_resolved_default()))
  train_steps = _train_steps(model, paths.mesh, path.startswith('memory, device'))
  state = sharding.replicate(train_state.create_train_state(jax.random.PRNGKey(0), model, tx),
                             paths.mesh)
  n_batches = len(paths.indices) // paths.batch
  limit = n_batches if max_steps is None else min(max_steps, n_batches)

  def epoch_run(state, epoch, calls):
    inputs = itertools.islice(paths.inputs(path, epoch, k), calls)
    state, sums, _ = epochs.train_epoch(state, train_steps, inputs, batch_size=paths.batch,
                                        num_batches=limit, progress=False)
    jax.block_until_ready(state.params)
    return state, sums

  calls = -(-limit // k)
  if limit % k:  # Compile the shorter last call outside the timing too.
    state, _ = epoch_run(state, 0, calls)
  else:
    state, _ = epoch_run(state, 0, 1)
  count, t0 = 0, time.perf_counter()
  for epoch in range(1, num_epochs + 1):
    state, sums = epoch_run(state, epoch, calls)
    count += int(sums['count'])
  return count / (time.perf_counter() - t0)


def _table(title: str, results: dict[str, list[float]], ref: str) -> None:
  print(f'\n{title}  (spectra/s, median of {_REPEATS.value}; × = vs {ref})')
  ref_rate = statistics.median(results[ref])
  for name, rates in results.items():
    rate = statistics.median(rates)
    figure = f'{rate:10,.0f}' if rate >= 100 else f'{rate:10.3g}'
    print(f'  {name:<42} {figure}   {rate / ref_rate:6.1f}×')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  print(f'JAX {jax.__version__} on {jax.devices()[0].platform} '
        f'({jax.devices()[0].device_kind}); CPU: {cpu_model()}')
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = _DATA_DIR.value or _build(tmp)
    source = input_pipeline.open_split(data_dir, 'train')
    mesh = sharding.make_mesh(1)
    paths = Paths(source, mesh, _BATCH.value)
    n = len(source)
    rounding = memory_data.load_split(source, dtype='bfloat16', num_threads=_THREADS.value).rounding
    print(f'train split: {n} spectra, batch {_BATCH.value}, {n // _BATCH.value} batches/epoch; '
          f'loaded into memory once in {paths.load_seconds:.1f} s ({n / paths.load_seconds:,.0f} '
          f'spectra/s); {memory_data.bytes_per_spectrum("float32") * 1e5 / 1e9:.2f} GB per 100k '
          f'spectra in float32, {memory_data.bytes_per_spectrum("bfloat16") * 1e5 / 1e9:.2f} GB in '
          f'bfloat16 (relative rounding max {rounding["max"]:.2g}, rms {rounding["rms"]:.2g})')

    names = ['stream', 'memory, host RAM', 'memory, device', 'memory, device, bfloat16']
    tiny = train_state.create_model(default.get_config()).clone(channels=(4, 4), hidden=(8, 8))
    paper = train_state.create_model(default.get_config())
    delivered = {name: [] for name in names}
    # With no convolution the step is a few ms, so this loop shows the input path alone.
    linear = tiny.clone(channels=())
    tiny_loop = {f'{name}, steps_per_call {k}': [] for name in names[:3] for k in (1, 8)}
    linear_loop = {key: [] for key in tiny_loop}
    paper_loop = {name: [] for name in names[:3]}
    for _ in range(_REPEATS.value):
      for name in names:
        delivered[name].append(deliver(paths, name, _EPOCHS.value))
      for key in tiny_loop:
        name, k = key.rsplit(', steps_per_call ', 1)
        tiny_loop[key].append(loop(paths, name, tiny, int(k), _EPOCHS.value))
        linear_loop[key].append(loop(paths, name, linear, int(k), _EPOCHS.value))
      for name in paper_loop:
        paper_loop[name].append(loop(paths, name, paper, 1, 1, _PAPER_STEPS.value))

  _table('1. delivered to the device, no model', delivered, 'stream')
  _table('2. train_epoch, tiny model (channels 4,4; hidden 8,8)', tiny_loop,
         'stream, steps_per_call 1')
  _table('2b. train_epoch, no convolution (channels (); hidden 8,8)', linear_loop,
         'stream, steps_per_call 1')
  _table(f'3. train_epoch, paper model (Appendix B), {_PAPER_STEPS.value} steps', paper_loop,
         'stream')
  print()
  for name, results in (('no convolution', linear_loop), ('tiny model', tiny_loop)):
    best = {prefix: max(statistics.median(v) for k, v in results.items() if k.startswith(prefix))
            for prefix in ('stream', 'memory')}
    print(f'memory/stream loop throughput ratio ({name}): {best["memory"] / best["stream"]:.1f}')


if __name__ == '__main__':
  app.run(main)
