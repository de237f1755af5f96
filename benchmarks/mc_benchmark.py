r"""Monte Carlo inference: JAX (``uncertainty.make_mc_fn``) against the paper's PyTorch model.

  python benchmarks/mc_benchmark.py [--num_stars=32] [--mc=100] [--batch_size=16] \
      [--draw_chunk=25] [--rounds=3] [--torch_threads=2] [--memory_stars=1000,10000] [--memory_mc=2]

1. Throughput, same run, same stars, paper-size network (Appendix B), random weights:
   JAX: the jitted MC of ``evaluation`` (vmap over draws in chunks, lax.map over chunks),
   error preparation included; PyTorch (Appendix B model, ``torch_threads`` threads): for each
   star, its ``mc`` draws (flux + N(0,1)·capped error, draw 0 noiseless) as one batch, in a loop,
   as the authors' inference code does. Prints stars/s and the ratio JAX/PyTorch (goal ≥ 3).
2. Memory: ``evaluation.predict_batches`` streams ``memory_stars`` synthetic in-memory spectra in
   a fresh subprocess each (separate high-water marks) and reports the peak RSS; flat means the
   peak does not grow with the star count. ``memory_mc`` draws keep it quick: the per-batch
   memory depends on batch_size × draw_chunk, not on the number of stars.
3. ``--ensemble_sizes=4,8``: the same MC over K stacked members (``uncertainty.make_ensemble_fn``,
   the draws vmapped across members), interleaved with the single network; prints stars/s and
   the time relative to K single-network runs.
Prints figures; asserts nothing. Compile time is excluded (one warm-up batch).
"""

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_NUM_STARS = flags.DEFINE_integer('num_stars', 32, 'Stars timed in the throughput comparison.')
_MC = flags.DEFINE_integer('mc', 100, 'Monte Carlo draws per star (paper: 100).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'JAX stars per device batch.')
_CHUNK = flags.DEFINE_integer('draw_chunk', 25, 'JAX draws per chunk.')
_THREADS = flags.DEFINE_integer('torch_threads', 2, 'PyTorch intra-op threads.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved timing rounds (median reported).')
_SKIP_TORCH = flags.DEFINE_bool('skip_torch', False, 'Time JAX only.')
_MEM_STARS = flags.DEFINE_string('memory_stars', '1000,10000', 'Star counts for the memory test; '
                                 'empty: skip.')
_MEM_MC = flags.DEFINE_integer('memory_mc', 2, 'Draws per star in the memory test.')
_CHILD = flags.DEFINE_integer('memory_child', 0, 'Internal: run one memory measurement.')
_ENSEMBLES = flags.DEFINE_string('ensemble_sizes', '', 'Comma-separated K > 1 to time ensembles '
                                 'of K members; empty: skip.')
_VECTORIZE = flags.DEFINE_bool('ensemble_vectorize', False, 'vmap the members instead of '
                               'lax.map (make_ensemble_fn(vectorize=True)).')
_MODEL = flags.DEFINE_enum('model', 'paper', ['paper', 'small'],
                           'paper: Appendix B; small: channels 8,8,16,16, hidden 64,64 (the demo '
                           'network before issue 8).')

N_PIX = 8575


def _spectra(n, seed=0):
  """Raw-flux-like spectra with apStar-like errors: bad pixels at 1e10, a few huge errors."""
  rng = np.random.default_rng(seed)
  flux = rng.normal(300.0, 30.0, (n, N_PIX)).astype(np.float32)
  err = rng.uniform(2.0, 6.0, (n, N_PIX)).astype(np.float32)
  err[:, :300] = 1e10
  err[:, 3000:3100] = 1e10
  flux[err >= 1e10] = 0
  err[:, 5000:5005] = 1e4
  return flux, err


def _batches(n, batch_size, seed=0):
  """In-memory batches in the input_pipeline contract, generated on the fly (no host growth)."""
  for start in range(0, n, batch_size):
    m = min(batch_size, n - start)
    flux, err = _spectra(batch_size, seed=seed + start)
    yield {'flux': flux, 'flux_err': err, 'labels': np.full((batch_size, 3), np.nan, np.float32),
           'data_type': np.full(batch_size, -1, np.int32),
           'apogee_id': np.asarray([f'2M{start + i:08d}' for i in range(batch_size)]),
           'snr': np.full(batch_size, 50.0, np.float32), 'ra': np.zeros(batch_size),
           'dec': np.zeros(batch_size), 'mask': np.arange(batch_size) < m}


def _jax_model(ensemble_size=1):
  import jax
  import jax.numpy as jnp

  from apogeenet_jax.model import APOGEENet
  model = (APOGEENet(channels=(8, 8, 16, 16), hidden=(64, 64)) if _MODEL.value == 'small'
           else APOGEENet())
  init = jax.jit(model.init)
  members = [init(jax.random.PRNGKey(k), jnp.zeros((1, N_PIX)))['params']
             for k in range(ensemble_size)]
  params = members[0] if ensemble_size == 1 else jax.tree.map(lambda *x: jnp.stack(x), *members)
  return model, params


def jax_runner(flux, err, mc, batch_size, draw_chunk, ensemble_size=1):
  """A compiled, warmed-up ``run() -> seconds`` for MC over all stars."""
  import jax

  from apogeenet_jax import uncertainty
  model, params = _jax_model(ensemble_size)
  fn = uncertainty.make_mc_fn(uncertainty.model_apply_fn(model), num_draws=mc,
                              draw_chunk=draw_chunk)
  if ensemble_size > 1:
    fn = uncertainty.make_ensemble_fn(fn, vectorize=_VECTORIZE.value)
  key = jax.random.PRNGKey(0)
  pad = -len(flux) % batch_size
  flux = np.concatenate([flux, flux[:pad]])
  err = np.concatenate([err, err[:pad]])
  idx = np.arange(len(flux), dtype=np.uint32)
  jax.block_until_ready(fn(params, flux[:batch_size], uncertainty.prepare_errors(err[:batch_size]),
                           idx[:batch_size], key))  # compile

  def run():
    t0 = time.perf_counter()
    outs = []
    for s in range(0, len(flux), batch_size):
      scale = uncertainty.prepare_errors(err[s:s + batch_size])  # error preparation included
      outs.append(fn(params, flux[s:s + batch_size], scale, idx[s:s + batch_size], key))
    jax.block_until_ready(outs)
    return time.perf_counter() - t0

  return run


def torch_runner(flux, err, mc, threads):
  """``run() -> seconds``: the paper's model, one batch of ``mc`` draws per star, in a loop."""
  import torch

  from apogeenet_jax import uncertainty
  from apogeenet_jax.torch_reference import TorchAPOGEENet
  torch.set_num_threads(threads)
  model = TorchAPOGEENet().eval()
  gen = torch.Generator().manual_seed(0)

  def one(f, e):
    scale = torch.from_numpy(uncertainty.prepare_errors(e))
    noise = torch.randn((mc, N_PIX), generator=gen) * scale
    noise[0] = 0  # draw 0 noiseless, as in the authors' code
    x = (torch.from_numpy(f) + noise)[:, None, :]
    out = model(x)
    return out.mean(0), out.std(0, unbiased=False)

  def run():
    with torch.no_grad():
      t0 = time.perf_counter()
      for f, e in zip(flux, err, strict=True):
        one(f, e)
      return time.perf_counter() - t0

  with torch.no_grad():
    one(flux[0], err[0])  # warm-up
  return run


def memory_child(n_stars, mc, batch_size, draw_chunk):
  from apogeenet_jax import evaluation
  from apogeenet_jax.normalization import PAPER_STANDARDIZER
  model, params = _jax_model()
  t0 = time.perf_counter()
  out = evaluation.predict_batches(params, model, PAPER_STANDARDIZER,
                                   _batches(n_stars, batch_size), mc=mc, draw_chunk=draw_chunk,
                                   total=n_stars)
  seconds = time.perf_counter() - t0
  assert len(out['pred']) == n_stars
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({'stars': n_stars, 'peak_rss_mib': peak_kib / 1024, 'seconds': seconds}))


def main(argv):
  del argv
  if _CHILD.value:
    memory_child(_CHILD.value, _MEM_MC.value, _BATCH.value, _CHUNK.value)
    return
  import jax
  print(f'devices: {jax.devices()}; {os.cpu_count()} CPUs')
  flux, err = _spectra(_NUM_STARS.value, seed=1)
  n = len(flux)
  runners = {'JAX': jax_runner(flux, err, _MC.value, _BATCH.value, _CHUNK.value)}
  sizes = [int(k) for k in _ENSEMBLES.value.split(',') if k.strip() and int(k) > 1]
  for k in sizes:
    runners[f'JAX K={k}'] = jax_runner(flux, err, _MC.value, _BATCH.value, _CHUNK.value, k)
  if not _SKIP_TORCH.value:
    try:
      runners['PyTorch'] = torch_runner(flux, err, _MC.value, _THREADS.value)
    except ImportError:
      print('PyTorch not installed: no reference (pip install -e ".[torch]")')
  # Interleaved rounds: on a shared machine both sides then see the same load.
  times = {name: [] for name in runners}
  for _ in range(_ROUNDS.value):
    for name, run in runners.items():
      times[name].append(run())
  rate = {name: n / float(np.median(t)) for name, t in times.items()}
  print(f'JAX     MC {_MC.value} draws: {rate["JAX"]:7.2f} stars/s ({rate["JAX"] * _MC.value:.0f} '
        f'spectra/s; batch {_BATCH.value}, draw_chunk {_CHUNK.value}; median of '
        f'{_ROUNDS.value} rounds of {n} stars)')
  for k in sizes:
    r = rate[f'JAX K={k}']
    print(f'JAX     MC {_MC.value} draws x {k} members: {r:7.2f} stars/s = '
          f'{rate["JAX"] / (k * r):.2f} x the time of {k} single-network runs')
  if 'PyTorch' in rate:
    print(f'PyTorch MC {_MC.value} draws: {rate["PyTorch"]:7.2f} stars/s '
          f'({rate["PyTorch"] * _MC.value:.0f} spectra/s; {_THREADS.value} threads, one batch of '
          f'{_MC.value} per star)')
    print(f'ratio JAX / PyTorch: {rate["JAX"] / rate["PyTorch"]:.2f}x  (goal >= 3x); per round: '
          + ', '.join(f'{b / a:.2f}' for a, b in zip(times['JAX'], times['PyTorch'], strict=True)))
  counts = [int(s) for s in _MEM_STARS.value.split(',') if s.strip()]
  for n in counts:
    cmd = [sys.executable, __file__, f'--memory_child={n}', f'--memory_mc={_MEM_MC.value}',
           f'--batch_size={_BATCH.value}', f'--draw_chunk={_CHUNK.value}']
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      print(f'memory run with {n} stars failed:\n{proc.stderr[-2000:]}')
      continue
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f'memory: {r["stars"]:6d} stars streamed (mc={_MEM_MC.value}): peak RSS '
          f'{r["peak_rss_mib"]:7.1f} MiB, {r["seconds"]:.1f} s')


if __name__ == '__main__':
  app.run(main)
