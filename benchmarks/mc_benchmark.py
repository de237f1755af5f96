r"""Noise uncertainties: JAX MC and first-order ``linear`` against the paper's PyTorch MC loop.

  python benchmarks/mc_benchmark.py [--num_stars=32] [--mc=100] [--batch_size=16] \
      [--draw_chunk=25] [--rounds=3] [--torch_threads=2] [--memory_stars=1000,10000] [--memory_mc=2]
      [--linear_draws=2] [--linear_modes=vjp,jacrev] [--jvp_stars=1]
      [--workdir=workdirs/demo --data_dir=data/demo/tfds --split=test]  # σ ratio, trained model

1. Throughput, same run, same stars, paper-size network (Appendix B), random weights, all
   estimators interleaved round by round: JAX MC: the jitted MC of ``evaluation`` (vmap over
   draws in chunks, lax.map over chunks); JAX linear: ``uncertainty.make_linear_fn``, first
   the noise-averaged Jacobian of ``linear_draws`` draws (what ``evaluate.py
   --uncertainty=linear`` does; the headline ``linear / …`` ratios), then the Jacobian at the
   spectrum (``--linear_draws=0``) in each of ``linear_modes``; all with error preparation
   included; PyTorch (Appendix B model, ``torch_threads`` threads): for each star, its ``mc``
   draws (flux + N(0,1)·capped error, draw 0 noiseless) as one batch, in a loop, as the authors'
   inference code does. Prints stars/s and the ratios (goals: JAX MC / PyTorch ≥ 3; linear ≥ 5×
   JAX MC-100 and ≥ 3× PyTorch MC-100). Forward mode (``jvp``: 8575 tangents per star) is timed
   once on ``jvp_stars`` stars outside the rounds: it is far too slow to interleave.
2. σ_linear / σ_MC per star and label, for both linear estimators (median, p10, p90): on a split of the built data set with a
   trained checkpoint (``--workdir`` or ``--checkpoint``, ``--data_dir``, ``--split``), else on the
   real apStar files of ``--apstar_dir`` with the random network (skipped when neither is given).
3. Memory: ``prediction.predict_batches`` streams ``memory_stars`` synthetic in-memory spectra in
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

from benchmarks.common import torch_runner

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
                           'network of the early demo).')
_LINEAR_MODES = flags.DEFINE_list('linear_modes', ['vjp', 'jacrev'],
                                  'make_linear_fn modes timed in the rounds (first: "JAX linear").')
_JVP_STARS = flags.DEFINE_integer('jvp_stars', 1, 'Stars for the one-off forward-mode timing; '
                                  '0: skip.')
_LINEAR_DRAWS = flags.DEFINE_integer(
    'linear_draws', 2, 'The noise-averaged Jacobian from this many draws, as evaluate.py '
    '--uncertainty=linear computes it (its default: 2), timed first and compared with the MC; '
    '0: skip it.')
_RATIO = flags.DEFINE_bool('sigma_ratio', True, 'Compare σ_linear with σ_MC (section 2).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'σ ratio: the best checkpoint of this run.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'σ ratio: this orbax checkpoint.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'σ ratio: tfds data dir of the built data set.')
_SPLIT = flags.DEFINE_string('split', 'test', 'σ ratio: split of --data_dir.')
_APSTAR_DIR = flags.DEFINE_string(
    'apstar_dir', '',
    'σ ratio without a checkpoint: a folder of real apStar files, random paper-size network.')

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

  from apogeenet_jax.models.apogee_net import APOGEENet
  model = (APOGEENet(channels=(8, 8, 16, 16), hidden=(64, 64)) if _MODEL.value == 'small'
           else APOGEENet())
  init = jax.jit(model.init)
  members = [init(jax.random.PRNGKey(k), jnp.zeros((1, N_PIX)))['params']
             for k in range(ensemble_size)]
  params = members[0] if ensemble_size == 1 else jax.tree.map(lambda *x: jnp.stack(x), *members)
  return model, params


def jax_runner(flux, err, mc, batch_size, draw_chunk, ensemble_size=1, linear_mode=None,
               linear_draws=0):
  """A compiled, warmed-up ``run() -> seconds`` for MC (or ``linear_mode``) over all stars."""
  import jax

  from apogeenet_jax import uncertainty
  model, params = _jax_model(ensemble_size)
  apply_fn = uncertainty.model_apply_fn(model)
  if linear_mode is None:
    fn = uncertainty.make_mc_fn(apply_fn, num_draws=mc, draw_chunk=draw_chunk)
  else:
    fn = uncertainty.make_linear_fn(apply_fn, mode=linear_mode, num_draws=linear_draws)
  if ensemble_size > 1:
    fn = uncertainty.make_ensemble_fn(fn, vectorize=_VECTORIZE.value)
  key = jax.random.PRNGKey(0)
  pad = -len(flux) % batch_size
  flux = np.concatenate([flux, flux[:pad]])
  err = np.concatenate([err, err[:pad]])
  idx = np.arange(len(flux), dtype=np.uint32)
  jax.block_until_ready(fn(params, {'flux': flux[:batch_size]},
                           {'flux': uncertainty.prepare_errors(err[:batch_size])},
                           idx[:batch_size], key))  # compile

  def run():
    t0 = time.perf_counter()
    outs = []
    for s in range(0, len(flux), batch_size):
      scale = uncertainty.prepare_errors(err[s:s + batch_size])  # error preparation included
      outs.append(fn(params, {'flux': flux[s:s + batch_size]}, {'flux': scale},
                      idx[s:s + batch_size], key))
    jax.block_until_ready(outs)
    return time.perf_counter() - t0

  return run


def memory_child(n_stars, mc, batch_size, draw_chunk):
  from apogeenet_jax import prediction, uncertainty
  from apogeenet_jax.normalization import PAPER_STANDARDIZER
  model, params = _jax_model()
  t0 = time.perf_counter()
  out = prediction.predict_batches(params, model, PAPER_STANDARDIZER,
                                   _batches(n_stars, batch_size),
                                   uncertainty.MCSettings(mc=mc, draw_chunk=draw_chunk),
                                   total=n_stars)
  seconds = time.perf_counter() - t0
  assert len(out['pred']) == n_stars
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({'stars': n_stars, 'peak_rss_mib': peak_kib / 1024, 'seconds': seconds}))


def jvp_seconds_per_star(flux, err, n_stars):
  """Forward mode, timed once (compile excluded): seconds per star."""
  import jax

  from apogeenet_jax import uncertainty
  model, params = _jax_model()
  fn = uncertainty.make_linear_fn(uncertainty.model_apply_fn(model), mode='jvp')
  flux, scale = flux[:n_stars], uncertainty.prepare_errors(err[:n_stars])
  jax.block_until_ready(fn(params, {'flux': flux}, {'flux': scale}, None, None))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(params, {'flux': flux}, {'flux': scale}, None, None))
  return (time.perf_counter() - t0) / n_stars


def _ratio_source():
  """(params, model, standardizer, batches factory, description) for the σ comparison."""
  from apogeenet_jax import evaluation, input_pipeline, prediction
  from apogeenet_jax.normalization import PAPER_STANDARDIZER
  if _WORKDIR.value or _CHECKPOINT.value:
    from apogeenet_jax import checkpoint
    params, meta = evaluation.load_checkpoint(workdir=_WORKDIR.value,
                                              checkpoint_dir=_CHECKPOINT.value)
    model = checkpoint.model_from_meta(meta)
    return (params, model, checkpoint.standardizer_from_meta(meta),
            lambda: prediction.split_batches(_DATA_DIR.value, _SPLIT.value, _BATCH.value)[0],
            f'split {_SPLIT.value!r} of {_DATA_DIR.value}, checkpoint {meta["checkpoint_dir"]}')
  from apogeenet_jax import apstar
  files = apstar.find_apstar_files(_APSTAR_DIR.value) if os.path.isdir(_APSTAR_DIR.value) else []
  if not files:
    return None
  model, params = _jax_model()
  return (params, model, PAPER_STANDARDIZER,
          lambda: input_pipeline.eval_batches(input_pipeline.ApStarFiles(files), _BATCH.value),
          f'{len(files)} real apStar files in {_APSTAR_DIR.value}, random paper-size network')


def sigma_ratios():
  """Prints σ_linear / σ_MC per label over the stars of ``_ratio_source``."""
  from apogeenet_jax import prediction, uncertainty
  from apogeenet_jax.constants import LABEL_NAMES
  source = _ratio_source()
  if source is None:
    print(f'σ ratio: no checkpoint given and no apStar files in {_APSTAR_DIR.value}: skipped')
    return
  params, model, standardizer, batches, what = source
  out = {(est, m): prediction.predict_batches(
      params, model, standardizer, batches(),
      uncertainty.MCSettings(mc=_MC.value, draw_chunk=_CHUNK.value, estimator=est,
                             linear_draws=m), desc=f'{est} {m}')
         for est, m in {('linear', 0), ('mc', 0), ('linear', _LINEAR_DRAWS.value)}}
  variants = [(0, 'σ_linear')]
  if _LINEAR_DRAWS.value:
    variants.append((_LINEAR_DRAWS.value, f'σ_linear (E[J], {_LINEAR_DRAWS.value} draws)'))
  for m, title in variants:
    ratio = out['linear', m]['pred_err'] / out['mc', 0]['pred_err']
    print(f'{title} / σ_MC-{_MC.value} on {what} ({len(ratio)} stars; MC-{_MC.value} σ itself '
          f'has ~{100 / np.sqrt(2 * _MC.value):.0f}% sampling error):')
    for j, name in enumerate(LABEL_NAMES):
      p10, med, p90 = np.percentile(ratio[:, j], [10, 50, 90])
      print(f'  {name:5s} median {med:.3f}  p10 {p10:.3f}  p90 {p90:.3f}')


def _runners(flux: np.ndarray, err: np.ndarray) -> tuple[dict, list[int], list[str]]:
  """The timed sides: JAX MC, ensembles, the linear estimators, and PyTorch when installed."""
  import jax
  print(f'devices: {jax.devices()}; {os.cpu_count()} CPUs')
  runners = {'JAX': jax_runner(flux, err, _MC.value, _BATCH.value, _CHUNK.value)}
  sizes = [int(k) for k in _ENSEMBLES.value.split(',') if k.strip() and int(k) > 1]
  for k in sizes:
    runners[f'JAX K={k}'] = jax_runner(flux, err, _MC.value, _BATCH.value, _CHUNK.value, k)
  # First the estimator evaluate.py --uncertainty=linear uses (the headline ratios), then the
  # Jacobian at the spectrum (--linear_draws=0) in each mode.
  linear_names = []
  if _LINEAR_DRAWS.value:
    name = f'linear E[J] M={_LINEAR_DRAWS.value}'
    linear_names.append(name)
    runners[name] = jax_runner(flux, err, _MC.value, _BATCH.value, _CHUNK.value,
                               linear_mode='vjp', linear_draws=_LINEAR_DRAWS.value)
  for mode in _LINEAR_MODES.value:
    linear_names.append(f'linear {mode}')
    runners[f'linear {mode}'] = jax_runner(flux, err, _MC.value, _BATCH.value, _CHUNK.value,
                                           linear_mode=mode)
  if not _SKIP_TORCH.value:
    try:
      runners['PyTorch'] = torch_runner(flux, err, _MC.value, _THREADS.value)
    except ImportError:
      print('PyTorch not installed: no reference (pip install -e ".[torch]")')
  return runners, sizes, linear_names


def _interleaved(runners: dict) -> dict[str, list[float]]:
  """Seconds per round of each side. On a shared machine all sides then see the same load; the
  order rotates each round so that no side always runs right after the same other one."""
  times = {name: [] for name in runners}
  names = list(runners)
  for r in range(_ROUNDS.value):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(runners[name]())
  return times


def _print_rates(times: dict[str, list[float]], n: int, sizes: list[int],
                 linear_names: list[str]) -> None:
  rate = {name: n / float(np.median(t)) for name, t in times.items()}

  def per_round(num, den):
    return ', '.join(f'{b / a:.2f}' for a, b in zip(times[num], times[den], strict=True))

  print(f'JAX     MC {_MC.value} draws: {rate["JAX"]:7.2f} stars/s ({rate["JAX"] * _MC.value:.0f} '
        f'spectra/s; batch {_BATCH.value}, draw_chunk {_CHUNK.value}; median of '
        f'{_ROUNDS.value} rounds of {n} stars)')
  for k in sizes:
    r = rate[f'JAX K={k}']
    print(f'JAX     MC {_MC.value} draws x {k} members: {r:7.2f} stars/s = '
          f'{rate["JAX"] / (k * r):.2f} x the time of {k} single-network runs')
  for name in linear_names:
    passes = ('one forward + 3 backward passes' if 'E[J]' not in name else
              f'{_LINEAR_DRAWS.value} x (forward + 3 backward) + 1 forward passes')
    print(f'JAX {name:13s}: {rate[name]:7.2f} stars/s (batch {_BATCH.value}; {passes} per star)')
  if 'PyTorch' in rate:
    print(f'PyTorch MC {_MC.value} draws: {rate["PyTorch"]:7.2f} stars/s '
          f'({rate["PyTorch"] * _MC.value:.0f} spectra/s; {_THREADS.value} threads, one batch of '
          f'{_MC.value} per star)')
    print(f'ratio JAX / PyTorch: {rate["JAX"] / rate["PyTorch"]:.2f}x  (goal >= 3x); per round: '
          + per_round('JAX', 'PyTorch'))
  if linear_names:
    lin = linear_names[0]
    print(f'linear / JAX MC-{_MC.value}: {rate[lin] / rate["JAX"]:.2f}  (goal >= 5; {lin}; per '
          f'round: {per_round(lin, "JAX")})')
    if 'PyTorch' in rate:
      print(f'linear / PyTorch MC-{_MC.value}: {rate[lin] / rate["PyTorch"]:.2f}  (goal >= 3; per '
            f'round: {per_round(lin, "PyTorch")})')
  for name in linear_names[1:]:
    print(f'{name} / JAX MC-{_MC.value}: {rate[name] / rate["JAX"]:.2f}'
          + (f'; / PyTorch MC-{_MC.value}: {rate[name] / rate["PyTorch"]:.2f}'
             if 'PyTorch' in rate else ''))


def main(argv):
  del argv
  if _CHILD.value:
    memory_child(_CHILD.value, _MEM_MC.value, _BATCH.value, _CHUNK.value)
    return
  flux, err = _spectra(_NUM_STARS.value, seed=1)
  runners, sizes, linear_names = _runners(flux, err)
  _print_rates(_interleaved(runners), len(flux), sizes, linear_names)
  if _JVP_STARS.value > 0:
    sec = jvp_seconds_per_star(flux, err, _JVP_STARS.value)
    print(f'JAX linear jvp   : {1 / sec:7.3f} stars/s (forward mode, 8575 tangents per star, '
          f'{_JVP_STARS.value} star(s), timed once after the rounds)')
  if _RATIO.value:
    sigma_ratios()
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
