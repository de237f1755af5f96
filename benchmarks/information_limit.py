r"""How close is the network to the information in the spectra? Its scatter against the Cramér–Rao bound.

    python benchmarks/information_limit.py --data_dir=D [--workdir=W] [--split=test] \
        [--max_stars=N] [--ml_fit_stars=300] [--nuisances=scale,response,telluric] \
        [--each_member] [--with_photometry] [--label_space=auto|teff|log_teff]

For each star of a split of a built SYNTHETIC survey (anything else is refused: the records hold
the telescope) (``apogeenet_jax.synthetic``, whose forward
model ``forward_model`` is known) it computes the Cramér–Rao bound σ_CRB on (log g, Teff,
[Fe/H]) (``cramer_rao``): Fisher matrix JᵀΣ⁻¹J of the exact Jacobian at the true labels, with the
per-pixel σ as stored in the records (bad pixels weight 0), the ``--nuisances`` marginalised at
their maximum-likelihood values for the true labels (the files' true nuisances are not in the
records). With ``--workdir`` it predicts the split with that run's best checkpoint (no MC noise)
and prints, per label, rms σ_CRB, the network's rms residual and their ratio, for all stars, per
data type and in S/N bins (header SNR). Without it, only the bound. For a deep ensemble the
network is the members' mean; ``--each_member`` also prints each member's ratio (member k is the
single network of seed + k, so this is the spread of the recipe over seeds).

The proof that the bound is right: a maximum-likelihood fit of the forward model
(Levenberg–Marquardt, all of the parameters the bound treats as unknown) to the first
``--ml_fit_stars`` spectra, started near the truth, must scatter like σ_CRB:
rms((θ_ML − θ_true)/σ_CRB) ≈ 1 per label (sampling error ≈ 1/sqrt(2N)), and χ²(θ_ML) must not
exceed χ² at the truth (else the fit did not converge). Prints figures; asserts nothing. The last
line (with ``--workdir``) is ``residual / Cramér–Rao (rms), LOGG TEFF FE_H: x y z``.

``--with_photometry``: the bound of spectrum AND photometry (the records' ``metadata`` and
``metadata_err``, builder ≥ 1.1.0; the distance marginalised, evaluated at its maximum-likelihood
value for the true labels), what APOGEE Net II sees; it also prints the spectra-only bound beside
it, per label (what the photometry adds). The ML check stays a fit of the spectra, against their
bound. ``--label_space``: 'log_teff' reports Teff as log10 Teff (bound σ_Teff / (Teff ln 10), the
network's residual against log10 of the true Teff); 'auto' (default) takes the checkpoint's
(``cramer_rao.label_space_of``: APOGEE Net II/III predict log10 Teff), 'teff' without --workdir.
"""

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from apogeenet_jax import (
  checkpoint,
  cramer_rao,
  evaluation,
  input_pipeline,
  prediction,
  synthetic,
)
from apogeenet_jax.constants import DATA_TYPES, LABEL_NAMES, SPLITS
from benchmarks.common import cpu_model

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run whose best checkpoint predicts; '
                               'omitted: print only the bound.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data dir of the built synthetic survey.')
_SPLIT = flags.DEFINE_enum('split', 'test', SPLITS, 'Split whose stars are used.')
_MAX_STARS = flags.DEFINE_integer('max_stars', 0, 'At most this many stars (the first of the '
                                  'split); 0: all.', lower_bound=0)
_ML_FIT_STARS = flags.DEFINE_integer('ml_fit_stars', 300, 'Stars of the maximum-likelihood check '
                                     '(the first of those used); 0: no check.')
_NUISANCES = flags.DEFINE_list('nuisances', list(cramer_rao.DEFAULT_NUISANCES),
                               'Nuisance groups marginalised (and fitted): scale, response, '
                               'telluric.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 50, 'Stars per vmapped batch.', lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the ML fit starting offsets.')
_EACH_MEMBER = flags.DEFINE_bool('each_member', False, 'For an ensemble checkpoint, also print '
                                 "each member's residual / Cramér–Rao.")
_WITH_PHOTOMETRY = flags.DEFINE_bool('with_photometry', False, "Add the photometry's information "
                                     '(records built with metadata) to the bound.')
_LABEL_SPACE = flags.DEFINE_enum('label_space', 'auto', ('auto', *cramer_rao.LABEL_SPACES),
                                 "Report Teff as is or as log10 Teff; auto: the checkpoint's.")

# Starting offsets of the ML fit from the true labels: N(0, these), several σ_CRB away.
START_OFFSET = np.array([0.05, 50.0, 0.02])
SNR_BINS = ((0, 50), (50, 100), (100, 200), (200, np.inf))
HOT_TEFF = 7000.0  # K: the hot kind of the synthetic survey starts here (its own table row).


def _network(source, n: int) -> dict[str, np.ndarray]:
  """Noiseless predictions of the first n stars by the checkpoint of --workdir (float32); with
  --each_member and an ensemble, each member's too ('member_pred': (K, n, 3))."""
  params, meta = evaluation.load_checkpoint(workdir=_WORKDIR.value)
  size = checkpoint.ensemble_size(meta)

  def predict(p, ensemble_size):
    return prediction.predict_batches(
        p, checkpoint.model_from_meta(meta), checkpoint.standardizer_from_meta(meta),
        input_pipeline.eval_batches(source, _BATCH_SIZE.value, indices=np.arange(n)),
        prediction.MCSettings(mc=0), total=n, desc=_SPLIT.value,
        stream=SPLITS.index(_SPLIT.value), ensemble_size=ensemble_size)

  out = predict(params, size)
  if _EACH_MEMBER.value and size > 1:
    out['member_pred'] = np.stack([predict(jax.tree.map(lambda x, k=k: x[k], params), 1)['pred']
                                   for k in range(size)])
  print(f'network: checkpoint {meta["checkpoint_dir"]}' + (f', ensemble of {size}' if size > 1
                                                             else ''))
  out['label_space'] = cramer_rao.label_space_of(meta)
  return out


def _bound(source, n: int, fns, n_keep: int) -> dict[str, np.ndarray]:
  """σ_CRB (n, 3), θ at the true labels (n, 7), labels, data type, S/N, IDs; and the flux and
  weights of the first n_keep stars (for the ML fit). float64 throughout."""
  keys = ['sigma', 'theta', 'labels', 'data_type', 'snr', 'apogee_id']
  out = {k: [] for k in keys + (['sigma_total', 'distance'] if _WITH_PHOTOMETRY.value else [])}
  flux_keep, weights_keep = [], []
  for batch in input_pipeline.eval_batches(source, _BATCH_SIZE.value, indices=np.arange(n)):
    valid = np.asarray(batch['mask'], bool)
    flux = jnp.asarray(batch['flux'], jnp.float64)
    weights = cramer_rao.inverse_variance(flux, jnp.asarray(batch['flux_err'], jnp.float64))
    labels = jnp.asarray(batch['labels'], jnp.float64)
    theta = fns['fit_nuisances'](labels, flux, weights)
    out['sigma'].append(np.asarray(fns['crb'](theta, weights))[valid])
    out['theta'].append(np.asarray(theta)[valid])
    if _WITH_PHOTOMETRY.value:
      meta = [jnp.asarray(batch[k], jnp.float64) for k in input_pipeline.METADATA_KEYS]
      distance = fns['fit_distance'](labels, *meta)
      out['distance'].append(np.asarray(distance)[valid])
      out['sigma_total'].append(np.asarray(fns['crb_photometry'](theta, weights, distance,
                                                                 *meta))[valid])
    for k in ('labels', 'data_type', 'snr', 'apogee_id'):
      out[k].append(np.asarray(batch[k])[valid])
    room = n_keep - sum(len(f) for f in flux_keep)
    if room > 0:
      flux_keep.append(np.asarray(flux)[valid][:room])
      weights_keep.append(np.asarray(weights)[valid][:room])
  out = {k: np.concatenate(v) for k, v in out.items()}
  if flux_keep:
    out['flux'], out['weights'] = np.concatenate(flux_keep), np.concatenate(weights_keep)
  return out


def _ml_check(bound: dict[str, np.ndarray], fns) -> None:
  """Fits the forward model to the kept spectra and prints how it scatters against σ_CRB."""
  m = len(bound.get('flux', ()))
  if m == 0:
    return
  rng = np.random.default_rng(_SEED.value)
  theta_true = bound['theta'][:m]
  start = theta_true.copy()
  start[:, :3] += rng.normal(0.0, 1.0, (m, 3)) * START_OFFSET
  t0 = time.perf_counter()
  fits, chi2_fit = [], []
  b = _BATCH_SIZE.value
  for lo in range(0, m, b):
    sl = slice(lo, lo + b)
    fit, value = fns['fit'](jnp.asarray(start[sl]), jnp.asarray(bound['flux'][sl]),
                            jnp.asarray(bound['weights'][sl]))
    fits.append(np.asarray(fit))
    chi2_fit.append(np.asarray(value))
  fit, chi2_fit = np.concatenate(fits), np.concatenate(chi2_fit)
  chi2_true = np.asarray(fns['chi2'](jnp.asarray(theta_true), jnp.asarray(bound['flux']),
                                     jnp.asarray(bound['weights'])))
  err = fit[:, :3] - bound['labels'][:m]
  sigma = bound['sigma'][:m]
  z = np.sqrt(np.mean((err / sigma) ** 2, 0))
  ratio = _rms(err) / _rms(sigma)
  converged = int(np.sum(chi2_fit <= chi2_true * (1 + 1e-9)))
  print(f'\nMaximum-likelihood fit of the forward model, {m} stars (Levenberg–Marquardt, '
        f'{time.perf_counter() - t0:.1f} s; start: truth + N(0, ({START_OFFSET[0]} dex, '
        f'{START_OFFSET[1]:.0f} K, {START_OFFSET[2]} dex))):')
  print(f'  χ²(θ_ML) ≤ χ²(true labels): {converged} of {m} stars')
  print(f'  rms((θ_ML − θ_true)/σ_CRB), {_names()}: {_fmt(z, 3)}   '
        f'(1 if the bound is attained; sampling error ±{1 / np.sqrt(2 * m):.3f})')
  # Robust: hot stars above ~14,000 K have almost no [Fe/H] information (σ_CRB of dex), where
  # the likelihood is flat and not Gaussian, and a few ML fits run far; they dominate the rms.
  mad = 1.4826 * np.median(np.abs(err / sigma - np.median(err / sigma, 0)), 0)
  print(f'  1.4826·MAD((θ_ML − θ_true)/σ_CRB), {_names()}: {_fmt(mad, 3)}   (robust to those)')
  print(f'  rms(θ_ML − θ_true) / rms(σ_CRB), {_names()}: {_fmt(ratio, 3)}   '
        '(noisier: a few faint stars dominate both rms)')


def _names(space: str = 'teff') -> str:
  return ' '.join(_label_names(space))


def _label_names(space: str) -> tuple[str, ...]:
  return ('LOGG', 'LOG_TEFF', 'FE_H') if space == 'log_teff' else LABEL_NAMES


def _fmt(values, digits: int) -> str:
  return ' '.join(f'{v:.{digits}g}' for v in values)


def _rms(x: np.ndarray) -> np.ndarray:
  return np.sqrt(np.mean(np.square(x), 0))


def _groups(bound: dict[str, np.ndarray]):
  yield 'all', np.ones(len(bound['snr']), bool)
  for i, name in enumerate(DATA_TYPES):
    yield name, bound['data_type'] == i
  yield f'Teff<{HOT_TEFF:.0f}', bound['labels'][:, 1] < HOT_TEFF
  yield f'Teff≥{HOT_TEFF:.0f}', bound['labels'][:, 1] >= HOT_TEFF
  for lo, hi in SNR_BINS:
    name = f'S/N<{hi:.0f}' if lo == 0 else (f'S/N≥{lo:.0f}' if np.isinf(hi)
                                             else f'S/N {lo:.0f}–{hi:.0f}')
    yield name, (bound['snr'] >= lo) & (bound['snr'] < hi)


def _table(bound: dict[str, np.ndarray], sigma: np.ndarray, residual: np.ndarray | None,
           space: str) -> None:
  """Per group: rms of ``sigma`` (n, 3), and of the network's residual and their ratio."""
  names = _label_names(space)
  head = f'{"":>12s} {"n":>5s}   σ_CRB rms: ' + ' '.join(f'{n:>8s}' for n in names)
  if residual is not None:
    head += ('   network rms: ' + ' '.join(f'{n:>8s}' for n in names)
             + '   ratio: ' + ' '.join(f'{n:>6s}' for n in names))
  print(head)
  for name, rows in _groups(bound):
    if not rows.any():
      continue
    crb = _rms(sigma[rows])
    line = f'{name:>12s} {int(rows.sum()):5d}              ' + ' '.join(f'{v:8.4g}' for v in crb)
    if residual is not None:
      net = _rms(residual[rows])
      line += ('                ' + ' '.join(f'{v:8.4g}' for v in net) + '          '
               + ' '.join(f'{v:6.1f}' for v in net / crb))
    print(line)


def _not_synthetic(source, n: int) -> str | None:
  """Why the first n records are not all from the synthetic forward model (whose Jacobian the
  bound uses), or None: a survey built from real apStar files has no bound here."""
  for i in range(n):
    telescope = source[i].get('telescope', b'')
    telescope = telescope.decode() if isinstance(telescope, bytes) else str(telescope)
    if telescope != synthetic.TELESCOPE:
      return (f'record {i} of the split was observed with {telescope!r}, not written by the '
              f'synthetic forward model (TELESCOP {synthetic.TELESCOPE!r}): the Cramér–Rao bound '
              'here is that of the forward model, so it holds only for a synthetic survey')
  return None


def _open(n_max: int):
  """(source, n, free θ indices), or SystemExit with one FATAL line for a user error."""
  try:
    free = cramer_rao.free_indices(_NUISANCES.value)
    source = input_pipeline.open_split(_DATA_DIR.value, _SPLIT.value)
  except (ValueError, input_pipeline.InputPipelineError) as e:
    raise SystemExit(f'FATAL {e}') from None
  n = len(source) if n_max <= 0 else min(len(source), n_max)
  if n == 0:
    raise SystemExit(f'FATAL split {_SPLIT.value!r} of {_DATA_DIR.value} has no stars')
  if problem := _not_synthetic(source, n):
    raise SystemExit(f'FATAL {_DATA_DIR.value}: {problem}')
  if _WITH_PHOTOMETRY.value:
    try:
      input_pipeline.require_metadata(source, '--with_photometry')
    except input_pipeline.InputPipelineError as e:
      raise app.UsageError(str(e)) from None
  return source, n, free


def _photometry_gain(bound: dict[str, np.ndarray], space: str) -> None:
  """Per group, rms σ_CRB of the spectra alone and with the photometry, and their ratio."""
  names = _label_names(space)
  spectra = cramer_rao.sigma_to_label_space(bound['sigma'], bound['labels'], space)
  total = cramer_rao.sigma_to_label_space(bound['sigma_total'], bound['labels'], space)
  print('\nWhat the photometry adds (σ_CRB rms, the distance marginalised):'
        f'\n{"":>12s} {"n":>5s}   '
        'spectra: ' + ' '.join(f'{n:>8s}' for n in names) + '   + photometry: '
        + ' '.join(f'{n:>8s}' for n in names) + '   ratio: ' + ' '.join(f'{n:>6s}' for n in names))
  for name, rows in _groups(bound):
    if rows.any():
      a, b = _rms(spectra[rows]), _rms(total[rows])
      print(f'{name:>12s} {int(rows.sum()):5d}            ' + ' '.join(f'{v:8.4g}' for v in a)
            + '                  ' + ' '.join(f'{v:8.4g}' for v in b) + '          '
            + ' '.join(f'{v:6.3f}' for v in b / a))


def main(argv):
  del argv
  if not _DATA_DIR.value:
    raise app.UsageError('--data_dir is required')
  source, n, free = _open(_MAX_STARS.value)
  print(f'information_limit: split {_SPLIT.value!r} of {_DATA_DIR.value}, {n} stars; nuisances '
        f'marginalised: {", ".join(_NUISANCES.value)}; {cpu_model()}, {jax.default_backend()}')
  try:
    network = _network(source, n) if _WORKDIR.value else None  # float32, before x64 below
  except (checkpoint.CheckpointError, prediction.EvaluationError) as e:
    raise SystemExit(f'FATAL {e}') from None
  with jax.enable_x64(True):
    fns = cramer_rao.make_batch_fns(free)
    t0 = time.perf_counter()
    bound = _bound(source, n, fns, max(_ML_FIT_STARS.value, 0))
    print(f'bound: {len(bound["snr"])} stars in {time.perf_counter() - t0:.1f} s; σ_CRB median '
          f'{_fmt(np.median(bound["sigma"], 0), 3)} ({_names()})\n')
    space = _LABEL_SPACE.value
    if space == 'auto':
      space = network['label_space'] if network is not None else 'teff'
    truth = cramer_rao.to_label_space(bound['labels'], space)
    sigma = cramer_rao.sigma_to_label_space(
        bound['sigma_total' if _WITH_PHOTOMETRY.value else 'sigma'], bound['labels'], space)
    residual = None
    if network is not None:
      if not np.array_equal(network['apogee_id'], bound['apogee_id']):
        raise RuntimeError('network predictions and records are not in the same order')
      # Predictions come in the catalogue's units (Teff in K) whatever the family predicts.
      residual = cramer_rao.to_label_space(network['pred'], space) - truth
    print(f'label space: {space}; bound of the spectra'
          + (' and the photometry' if _WITH_PHOTOMETRY.value else ''))
    _table(bound, sigma, residual, space)
    if _WITH_PHOTOMETRY.value:
      _photometry_gain(bound, space)
    _ml_check(bound, fns)
  crb = _rms(sigma)
  print(f'\nCramér–Rao bound (rms), {_names(space)}: {_fmt(crb, 4)}')
  for k, pred in enumerate(network.get('member_pred', ()) if network else ()):
    print(f'member {k} (seed + {k}): residual / Cramér–Rao (rms), {_names(space)}: '
          f'{_fmt(_rms(cramer_rao.to_label_space(pred, space) - truth) / crb, 3)}')
  if residual is not None:
    print(f'residual / Cramér–Rao (rms), {_names(space)}: {_fmt(_rms(residual) / crb, 3)}')


if __name__ == '__main__':
  app.run(main)
