r"""Training throughput: the JAX data-parallel step vs the paper's PyTorch model, same run.

    python benchmarks/train_benchmark.py [--batch_size=128] [--steps=10] [--torch_threads=2]
        [--pool=pairwise|reduce_window] [--ensemble_sizes=1,4,8] [--model=paper|small]

Both do one SGD step (lr 0.001, MSE, dropout 0.1, paper Appendix B architecture) on the same
random raw-flux batch. Reports the median step time of ``--steps`` timed steps after warm-up,
spectra/s (and per device for JAX) and the JAX/PyTorch ratio. Figures, never assertions.

``--ensemble_sizes``: also times the K-member step (``config.ensemble_size``, one jitted step,
the members vmapped and/or unrolled: ``--ensemble_layouts``) against K separate single-network
steps, interleaved in one run, and prints the time per step relative to K separate steps (< 1:
the ensemble step is cheaper).
``--model=small`` uses SMALL_NETWORK, the reduced network the early demo used.
"""

import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ at the top

from apogeenet_jax import optimizer, sharding, steps, train_inputs, train_state
from apogeenet_jax.constants import N_PIXELS
from apogeenet_jax.normalization import PAPER_STANDARDIZER
from benchmarks.common import cpu_model
from configs import paper

flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
flags.DEFINE_integer('steps', 10, 'Timed steps per framework (after warm-up).')
flags.DEFINE_integer('warmup', 2, 'Untimed steps first (compilation, allocator).')
flags.DEFINE_integer('torch_threads', 2, 'torch.set_num_threads; 0 = leave torch’s default.')
flags.DEFINE_integer('num_devices', 0, 'JAX devices in the mesh; 0 = all.')
flags.DEFINE_enum('pool', 'pairwise', ['pairwise', 'reduce_window'], 'APOGEENet.pool.')
flags.DEFINE_bool('torch', True, 'Also time PyTorch.')
flags.DEFINE_string('ensemble_sizes', '', 'Comma-separated K: time the K-member step against K '
                    'single steps (e.g. 1,4,8); empty: skip.')
flags.DEFINE_enum('model', 'paper', ['paper', 'small'], 'paper: Appendix B; small: SMALL_NETWORK.')
flags.DEFINE_list('ensemble_layouts', ['vmap', 'unrolled'], 'Members vmapped (GPU/TPU default) '
                  'and/or unrolled (CPU default, steps.members_unrolled).')
FLAGS = flags.FLAGS
# The reduced network of the early demo (configs/demo.py then): quick ensemble timings.
SMALL_NETWORK = {'channels': (8, 8, 16, 16), 'hidden': (64, 64)}


def _batch(batch_size: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  flux = rng.lognormal(5.0, 0.5, (batch_size, 1)) * (1 + 0.05 * rng.normal(
      size=(batch_size, N_PIXELS)))
  labels = PAPER_STANDARDIZER.inverse(rng.normal(size=(batch_size, 3)))
  return {'flux': flux.astype(np.float32), 'labels': labels.astype(np.float32),
          'data_type': np.zeros(batch_size, np.int32)}


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def jax_step_fn(batch: dict, ensemble_size: int = 1, unroll_members: bool | None = None):
  """One jitted data-parallel step of the paper model, ready to call; returns (fn, devices).
  ``unroll_members``: the members' layout (None: ``steps.members_unrolled``)."""
  config = paper.get_config()  # the paper's SGD step, as the PyTorch reference does
  if FLAGS.model == 'small':
    config.model.update(SMALL_NETWORK)
  config.model.pool = FLAGS.pool
  model = train_state.create_model(config)
  tx = optimizer.create_optimizer(config.optim, config.batch_size)
  mesh = sharding.make_mesh(FLAGS.num_devices)
  state = sharding.replicate(
      train_state.create_ensemble_state(0, model, tx, ensemble_size=ensemble_size), mesh)
  step = steps.make_train_step(model, tx, mesh, ensemble_size, unroll_members)
  device_batch = train_inputs.device_batch(batch, ('flux',), PAPER_STANDARDIZER, mesh)
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], device_batch)
    jax.block_until_ready(metrics['loss'])

  return run, mesh.devices.size


def torch_step_fn(batch: dict):
  """One step of the paper's PyTorch model (Appendix B) with plain SGD."""
  import torch

  from apogeenet_jax.models.torch_reference import TorchAPOGEENet
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  torch.manual_seed(0)
  model = TorchAPOGEENet(drop_p=0.1).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.001)
  x = torch.from_numpy(batch['flux'])[:, None, :]
  y = torch.from_numpy(PAPER_STANDARDIZER.transform(batch['labels']))
  loss_fn = torch.nn.MSELoss()

  def run():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()

  return run, torch.get_num_threads()


def ensemble_comparison(batch: dict, sizes: list[int]) -> None:
  """K-member step (both layouts of the members) vs K single steps, interleaved; prints the
  relative time per K and layout."""
  single, _ = jax_step_fn(batch, 1)
  runs = {(k, layout): jax_step_fn(batch, k, layout == 'unrolled')[0]
          for k in sizes if k > 1 for layout in FLAGS.ensemble_layouts}
  for _ in range(FLAGS.warmup):
    single()
    for run in runs.values():
      run()
  t_single, t_k = [], {k: [] for k in runs}
  for _ in range(FLAGS.steps):
    t_single.append(_timed(single))
    for k, run in runs.items():
      t_k[k].append(_timed(run))
  m1 = statistics.median(t_single)
  print(f'ensembles ({FLAGS.model} network, batch {FLAGS.batch_size}, median of {FLAGS.steps}, '
        f'interleaved; {jax.devices()[0].platform}, {cpu_model()}; default layout here: '
        f'{"unrolled" if steps.members_unrolled(sharding.make_mesh(FLAGS.num_devices)) else "vmap"}):')
  print(f'  K=1  step {m1 * 1e3:8.1f} ms')
  for (k, layout), times in t_k.items():
    mk = statistics.median(times)
    print(f'  K={k:<2d} {layout:8s} step {mk * 1e3:8.1f} ms = {mk / (k * m1):.2f} x the time of '
          f'{k} separate steps ({k * m1 * 1e3:.1f} ms); {k * FLAGS.batch_size / mk:.1f} '
          'member-spectra/s')


def main(argv):
  del argv
  b = FLAGS.batch_size
  batch = _batch(b)
  if FLAGS.ensemble_sizes:
    ensemble_comparison(batch, [int(k) for k in FLAGS.ensemble_sizes.split(',') if k.strip()])
    return
  jax_run, n_dev = jax_step_fn(batch)
  torch_run, threads = torch_step_fn(batch) if FLAGS.torch else (None, 0)
  for _ in range(FLAGS.warmup):
    jax_run()
    if torch_run:
      torch_run()
  # Interleaved, so that both frameworks see the same background load on a shared machine.
  t_jax, t_torch = [], []
  for _ in range(FLAGS.steps):
    t_jax.append(_timed(jax_run))
    if torch_run:
      t_torch.append(_timed(torch_run))
  mj = statistics.median(t_jax)
  print(f'device: {jax.devices()[0].platform} x{n_dev} ({jax.devices()[0].device_kind})')
  print(f'JAX     step {mj * 1e3:8.1f} ms  {b / mj:8.1f} spectra/s  '
        f'{b / mj / n_dev:8.1f} spectra/s/device  (batch {b}, median of {FLAGS.steps})')
  if torch_run:
    mt = statistics.median(t_torch)
    pair = statistics.median(t / j for t, j in zip(t_torch, t_jax, strict=True))
    print(f'PyTorch step {mt * 1e3:8.1f} ms  {b / mt:8.1f} spectra/s  '
          f'(threads {threads}, plain SGD)')
    print(f'ratio JAX/PyTorch throughput: {mt / mj:.2f}x (median of per-pair ratios {pair:.2f}x)')


if __name__ == '__main__':
  app.run(main)
