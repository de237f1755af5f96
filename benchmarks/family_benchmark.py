r"""What each model family costs: parameters, FLOPs of a forward pass (counted by XLA), and the
time of a training step, of a noiseless forward pass and of the Monte Carlo σ (``--mc`` draws per
star), measured in interleaved rounds.

    python benchmarks/family_benchmark.py [--configs=default,net2,net3_small,net3] \
        [--batch_size=16] [--rounds=3] [--mc=100]

Each config is configs/<name>.py; the step is the project's jitted data-parallel train step
(``steps.make_train_step``) on random spectra (and photometry for Net II) of the apStar grid;
the MC is evaluation's (``uncertainty.make_mc_fn``: the draws vmapped in chunks of 25, draw 0
noiseless, the flux perturbed by 1% errors).
Rounds visit the families in turn, so load on a shared machine hits all of them alike; the
medians and the ratios to the first config are printed with the CPU model. With ``--mc`` the
reference, the paper's PyTorch model (``torch_reference``, ``--torch_threads`` threads; the
authors' loop: each star's draws as one batch, draw 0 noiseless), takes its MC of the same stars
in the same rounds (needs the ``torch`` extra; skipped when absent). Prints figures, asserts
nothing.
"""

import importlib
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from apogeenet_jax import (
  models,
  optimizer,
  sharding,
  steps,
  train_inputs,
  train_state,
  uncertainty,
)
from apogeenet_jax.normalization import PAPER_STANDARDIZER
from benchmarks.common import cpu_model, torch_runner

_CONFIGS = flags.DEFINE_list('configs', ['default', 'net2', 'net3_small', 'net3'],
                             'configs/<name>.py to compare; the first is the reference.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Global batch of the step and the forward pass.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved timing rounds.')
_MC = flags.DEFINE_integer('mc', 100, 'Monte Carlo draws per star of the timed σ (0: not timed).')
_THREADS = flags.DEFINE_integer('torch_threads', 2, 'PyTorch intra-op threads of the reference.')


def _batch(model, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random host batch of the model's inputs: flux around 300 with 1% noise, photometry."""
  shapes = models.family_of(model).input_shapes(model)
  batch = {'labels': PAPER_STANDARDIZER.inverse(rng.normal(size=(batch_size, 3))),
           'data_type': np.zeros(batch_size, np.int32)}
  for name, shape in shapes.items():
    scale = 300.0 if name == 'flux' else 12.0
    batch[name] = (scale * (1 + 0.01 * rng.normal(size=(batch_size, *shape)))).astype(np.float32)
  return batch


def _setup(name: str, batch_size: int, mc: int):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.model.dropout_rate = 0.0
  config.optim.decay_steps = 1000  # a cosine needs a length; the step's cost does not change
  if 'metadata_fill' in config.model:  # Net II: the authors' constants stand in for a fit.
    for key in ('metadata_fill', 'metadata_mean', 'metadata_std'):
      del config.model[key]
  model = train_state.create_model(config)
  tx = optimizer.create_optimizer(config.optim, batch_size)
  mesh = sharding.make_mesh(1)
  state = sharding.replicate(train_state.create_train_state(jax.random.PRNGKey(0), model, tx,
                                                            init='he'), mesh)
  host = _batch(model, batch_size, np.random.default_rng(0))
  names = tuple(models.family_of(model).input_shapes(model))
  device = train_inputs.device_batch(host, names, PAPER_STANDARDIZER, mesh)
  step = steps.make_train_step(model, tx, mesh)
  apply = jax.jit(uncertainty.model_apply_fn(model))
  # A copy: the train step donates the state's buffers.
  params = jax.tree.map(jax.numpy.copy, train_state.inference_params(state))
  inputs = {k: host[k] for k in names}
  flops = apply.lower(params, inputs).compile().cost_analysis()
  flops = (flops[0] if isinstance(flops, list) else flops).get('flops', float('nan'))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  holder = [state]

  def train():
    holder[0], metrics = step(holder[0], device)
    jax.block_until_ready(metrics['loss'])

  def forward():
    jax.block_until_ready(apply(params, inputs))

  timed = {'train': train, 'forward': forward}
  if mc:
    mc_fn = uncertainty.make_mc_fn(uncertainty.model_apply_fn(model), num_draws=mc)
    noise = {'flux': (0.01 * inputs['flux']).astype(np.float32)}
    star_index = np.arange(batch_size, dtype=np.uint32)

    def monte_carlo():
      jax.block_until_ready(mc_fn(params, inputs, noise, star_index, jax.random.PRNGKey(0)))

    timed['mc'] = monte_carlo
  for fn in timed.values():
    fn()  # compile
  return {'params': n_params, 'flops': flops / batch_size, 'timed': timed}


def _torch_reference(batch_size: int):
  """``run() -> seconds`` of the paper's PyTorch model's MC-``--mc`` on ``batch_size`` random
  spectra like ``_batch``'s (1% errors), or None without ``--mc`` or without torch."""
  if not _MC.value:
    return None
  try:
    import torch  # noqa: F401  (only to know whether the reference can run)
  except ImportError:
    print('PyTorch not installed: no reference (pip install -e ".[torch]")')
    return None
  flux = _batch(models.create({'name': 'apogee_net'}), batch_size,
                np.random.default_rng(0))['flux']
  return torch_runner(flux, 0.01 * flux, _MC.value, _THREADS.value)


def main(argv):
  del argv
  batch = _BATCH.value
  runs = {name: _setup(name, batch, _MC.value) for name in _CONFIGS.value}
  times = {name: {what: [] for what in run['timed']} for name, run in runs.items()}
  reference, torch_times = _torch_reference(batch), []
  for _ in range(_ROUNDS.value):
    for name, run in runs.items():
      for what, fn in run['timed'].items():
        t0 = time.perf_counter()
        fn()
        times[name][what].append(time.perf_counter() - t0)
    if reference is not None:
      torch_times.append(reference())
  ref = _CONFIGS.value[0]
  print(f'family_benchmark: batch {batch}, {_ROUNDS.value} interleaved rounds, medians; '
        f'{cpu_model()}, {jax.default_backend()}')
  print(f'{"config":>12s} {"parameters":>12s} {"GFLOP/spectrum":>15s} {"train step s":>13s} '
        f'{"spectra/s":>10s} {"× " + ref:>10s} {"forward s":>10s} {"spectra/s":>10s}'
        + (f' {f"MC-{_MC.value} stars/s":>17s}' if _MC.value else ''))
  base = np.median(times[ref]['train'])
  for name, run in runs.items():
    train, fwd = np.median(times[name]['train']), np.median(times[name]['forward'])
    mc = f' {batch / np.median(times[name]["mc"]):>17.2f}' if _MC.value else ''
    print(f'{name:>12s} {run["params"]:>12,d} {run["flops"] / 1e9:>15.3f} {train:>13.3f} '
          f'{batch / train:>10.1f} {train / base:>10.2f} {fwd:>10.3f} {batch / fwd:>10.1f}{mc}')
  if torch_times:
    torch_rate = batch / np.median(torch_times)
    print(f'PyTorch Net I (the paper\'s model, {_THREADS.value} threads), MC-{_MC.value}: '
          f'{torch_rate:.2f} stars/s; JAX / PyTorch: ' + ', '.join(
              f'{name} {batch / np.median(times[name]["mc"]) / torch_rate:.2f}' for name in runs))


if __name__ == '__main__':
  app.run(main)
