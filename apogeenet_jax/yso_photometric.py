"""The YSO photometric network of paper §2.4: photometry → (age, mass, A_V, Teff, log g).

"A CNN with three convolutional layers using max pooling and two fully connected layers",
trained on ~42,000 synthetic stars drawn from PARSEC isochrones (``label_sources.isochrones``).
The paper gives no widths, kernel, optimiser or input scaling; the choices here are ours:
kernel 3 ('SAME'), a max-pool of 2 after each conv (12 inputs → 6 → 3 → 1), channels
(32, 64, 128), Dense 256 → ReLU → Dense 5, Adam. Inputs are the 12 FEATURES scaled as Kounkel's
Auriga does; targets (log age, mass, A_V, log Teff, log g) are standardised with the training
set's μ, σ.

Training runs through the spectral model's machinery (``training``): the same jitted
data-parallel step (``make_train_steps``/``make_eval_step`` on a 'data' mesh), ``train_epoch``,
``evaluate_split``, early stopping on the dev loss and orbax checkpoints (``checkpoint``). Only
the epoch orchestration below is separate, because ``training.train_and_evaluate`` reads
apStar spectra through the TFDS input pipeline. The checkpoint meta names the targets, their
μ/σ and the input scaling, so a checkpoint alone is enough to predict.

Paper benchmark (§2.4, noiseless synthetic test set): log g to 0.01 dex, log Teff to 0.003 dex.
"""

import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from astropy.table import Table

from apogeenet_jax import checkpoint, epochs, models, sharding, steps, train_inputs, train_state
from apogeenet_jax.label_sources import common, isochrones
from apogeenet_jax.models.yso_photometric import YSOPhotometricNet
from apogeenet_jax.normalization import Standardizer

SOURCE = 'YSO'
META_KIND = 'yso_photometric'
TEST_SCORES = 'synthetic_test.json'  # beside checkpoints/
PROVENANCE = ('YSO (Olney+2020 sec. 2.4): photometric CNN trained on PARSEC isochrones; '
              '[Fe/H] = {fe_h:g} (isochrone metallicity)')


def default_config() -> ml_collections.ConfigDict:
  """The training recipe (configs/yso.py returns this). §2.4 fixes only the 42,000 stars."""
  config = ml_collections.ConfigDict()
  config.num_train = 42_000  # §2.4
  config.num_dev = 4_200
  config.num_test = 4_200
  config.seed = 0
  config.channels = (32, 64, 128)
  config.hidden = 256
  config.dropout_rate = 0.0
  config.batch_size = 128
  config.eval_batch_size = 1024
  config.learning_rate = 1e-3  # Adam
  config.max_epochs = 200
  config.patience = 10  # dev evaluations without improvement
  config.min_delta = 0.0
  config.num_devices = 1
  return config


def _model(config: ml_collections.ConfigDict) -> YSOPhotometricNet:
  return models.create({'name': 'yso_photometric', 'channels': config.channels,
                        'hidden': config.hidden, 'dropout_rate': config.dropout_rate})


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int | None = None,
             pad_to: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Training (seed given: shuffled, remainder dropped) or evaluation (in order, last batch
  padded to a multiple of ``pad_to`` and masked) batches in the layout ``training`` expects."""
  n = len(x)
  if seed is not None:
    order = np.random.default_rng(seed).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      idx = order[start:start + batch_size]
      yield {'features': x[idx], 'labels': y[idx], 'data_type': np.zeros(len(idx), np.int32)}
    return
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    size = -(-len(idx) // pad_to) * pad_to
    mask = np.zeros(size, bool)
    mask[:len(idx)] = True
    idx = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
    yield {'features': x[idx], 'labels': y[idx], 'data_type': np.zeros(size, np.int32),
           'mask': mask}


def _meta(model: YSOPhotometricNet, standardizer: Standardizer, config, **extra) -> dict:
  return checkpoint.make_meta(
      model, standardizer, label_names=isochrones.TARGETS, config=config, kind=META_KIND,
      features=list(isochrones.FEATURES),
      input_scale={k: list(v) for k, v in isochrones.INPUT_SCALE.items()}, **extra)


def train(iso: Table, workdir: str, config: ml_collections.ConfigDict) -> dict[str, float]:
  """Trains on synthetic stars from ``iso`` until early stopping; keeps the best checkpoint in
  WORKDIR/checkpoints. Returns the held-out synthetic test scatter (``evaluate_synthetic``)."""
  checkpoints = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_DIR)
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise train_state.TrainingError(f'{checkpoints} already holds a network: load it with '
                                 f'yso_photometric.load, or train into another workdir')
  train_set = isochrones.synthesize(iso, config.num_train, config.seed)
  dev_set = isochrones.synthesize(iso, config.num_dev, config.seed + 1)
  x_train, y_train = _arrays(train_set)
  x_dev, y_dev = _arrays(dev_set)
  standardizer = Standardizer.fit(y_train)
  model = _model(config)
  tx = optax.adam(config.learning_rate)
  mesh = sharding.make_mesh(config.get('num_devices', 1))
  if config.batch_size % mesh.devices.size:
    raise train_state.TrainingError(f'batch_size {config.batch_size} is not divisible by '
                                 f'{mesh.devices.size} devices')
  state = sharding.replicate(
      train_state.create_train_state(jax.random.PRNGKey(config.seed), model, tx, init='flax'), mesh)
  train_steps = steps.make_train_steps(model, tx, mesh)
  eval_step = steps.make_eval_step(model, mesh)
  manager = checkpoint.make_manager(checkpoints)
  meta = _meta(model, standardizer, config, num_train=len(x_train), num_dev=len(x_dev))
  num_batches = len(x_train) // config.batch_size
  if num_batches == 0:
    raise train_state.TrainingError(f'{len(x_train)} stars make no batch of {config.batch_size}')
  for epoch in range(config.max_epochs):
    batches = _batches(x_train, y_train, config.batch_size, seed=config.seed * 100_003 + epoch)
    state, _, _ = epochs.train_epoch(
        state, train_steps, train_inputs.stream_inputs(batches, ('features',), standardizer, mesh),
        batch_size=config.batch_size, num_batches=num_batches, progress=False)
    dev = epochs.evaluate_split(
        state.params, eval_step, _batches(x_dev, y_dev, config.eval_batch_size,
                                          pad_to=mesh.devices.size), ('features',),
        standardizer, mesh, 'dev')
    state = state.replace(epoch=state.epoch + 1, epoch_step=jnp.int32(0))
    state, improved = epochs.update_early_stopping(state, dev['dev_loss'], config.min_delta)
    state = sharding.replicate(state, mesh)
    if improved:
      checkpoint.save(manager, int(state.step), checkpoint.params_only(state.params), meta,
                      {checkpoint.BEST_METRIC: dev['dev_loss']})
    logging.info('YSO net epoch %d: dev loss %.5f%s', epoch + 1, dev['dev_loss'],
                 ' *' if improved else '')
    if epochs.should_stop_early(state, config.patience):
      break
  manager.close()
  params, meta = checkpoint.load_params(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))
  test_set = isochrones.synthesize(iso, config.num_test, config.seed + 2)
  scores = evaluate_synthetic(params, meta, test_set)
  logging.info('YSO net on %d held-out synthetic stars: %s', len(test_set), scores)
  with open(os.path.join(workdir, TEST_SCORES), 'w') as f:
    json.dump(scores, f, indent=1)
  return scores


def test_scores(workdir: str) -> dict[str, float]:
  """The held-out synthetic scatter ``train`` measured for the network in ``workdir``."""
  path = os.path.join(workdir, TEST_SCORES)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _arrays(table: Table) -> tuple[np.ndarray, np.ndarray]:
  features = np.stack([np.asarray(table[f], np.float64) for f in isochrones.FEATURES], axis=1)
  targets = np.stack([np.asarray(table[t], np.float64) for t in isochrones.TARGETS], axis=1)
  return isochrones.normalise_features(features), targets.astype(np.float32)


def load(directory: str) -> tuple[Any, dict[str, Any]]:
  """(params, meta) of the best step in a YSO network workdir (its checkpoints/ folder)."""
  path = os.path.join(directory, checkpoint.CHECKPOINT_DIR)
  if not os.path.isdir(path):
    raise checkpoint.CheckpointError(f'{path}: no YSO network checkpoints (train one first)')
  params, meta = checkpoint.load_params(path)
  if meta.get('kind') != META_KIND:
    raise checkpoint.CheckpointError(f'{path}: not a YSO photometric network checkpoint')
  return params, meta


def predict(params: Any, meta: dict[str, Any], features: np.ndarray,
            batch_size: int = 4096) -> np.ndarray:
  """(n, 12) physical FEATURES → (n, 5) TARGETS in physical units."""
  model = checkpoint.model_from_meta(meta)
  norm = meta['normalization']
  standardizer = Standardizer(mean=np.asarray(norm['mean']), std=np.asarray(norm['std']))
  x = isochrones.normalise_features(features)
  apply = jax.jit(lambda p, xb: model.apply({'params': p}, xb))
  out = [np.asarray(apply(params, x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
  return standardizer.inverse(np.concatenate(out) if out else np.zeros((0, 5)))


def evaluate_synthetic(params: Any, meta: dict[str, Any], stars: Table) -> dict[str, float]:
  """Standard deviation and median of (prediction − truth) per target on synthetic stars."""
  features = np.stack([np.asarray(stars[f], np.float64) for f in isochrones.FEATURES], axis=1)
  truth = np.stack([np.asarray(stars[t], np.float64) for t in isochrones.TARGETS], axis=1)
  diff = predict(params, meta, features) - truth
  out = {'n': len(stars)}
  for j, name in enumerate(isochrones.TARGETS):
    out[f'{name}_std'] = float(np.std(diff[:, j]))
    out[f'{name}_median'] = float(np.median(diff[:, j]))
  return out


def yso_labels(members: str | os.PathLike | Table, workdir: str, *, fe_h: float = 0.0,
               columns: isochrones.MemberColumns | None = None,
               report: list[common.Cut] | None = None) -> Table:
  """YSO labels (DATA_TYPE 'YSO') for a member table from a trained network in ``workdir``.

  [Fe/H] is set to ``fe_h`` for every star: the network trains on [M/H] = 0 isochrones and
  predicts no metallicity, and the paper's nearby star-forming regions are near solar (§2.4).
  This is our reading; the paper does not say which [Fe/H] its YSO labels carry.
  """
  report = [] if report is None else report
  columns = isochrones.MemberColumns() if columns is None else columns
  table = members if isinstance(members, Table) else common.read_table(members)
  report.append(common.Cut(SOURCE, 'input rows', 0, len(table)))
  kept, features = isochrones.member_features(table, columns, report, SOURCE)
  params, meta = load(workdir)
  pred = predict(params, meta, features)
  ids = common.string_column(kept, columns.apogee_id)
  out = common.label_table(ids, pred[:, isochrones.TARGETS.index('LOGG')],
                           10.0 ** pred[:, isochrones.TARGETS.index('LOG_TEFF')],
                           np.full(len(kept), fe_h), SOURCE, PROVENANCE.format(fe_h=fe_h))
  out = common.apply_cut(out, common.first_of_duplicates(out['APOGEE_ID']), SOURCE,
                         'repeated APOGEE_ID (first row kept)', report)
  return out


__all__ = ['YSOPhotometricNet', 'evaluate_synthetic', 'load', 'predict', 'train', 'yso_labels']
