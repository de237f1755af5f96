r"""How linear is a trained network over the photon noise? Brackets the MC σ with first-order ones.

    python benchmarks/sigma_linearity.py --workdir=workdirs/demo --data_dir=data/demo/tfds \
        [--split=test] [--num_stars=64] [--reference_draws=400]

For ``--num_stars`` stars of a split it prints, per label, the median (p10, p90) over stars of
each σ divided by a reference σ_MC from ``--reference_draws`` noisy draws (all noisy, ddof 1):

- ``linear``: the delta method at the spectrum, σ = |J(x)·s| (``evaluate.py --uncertainty=linear``);
- ``MC-100``: the catalogue's estimator (authors' convention: draw 0 noiseless, ddof 0);
- ``E[J], M draws``: the noise-averaged Jacobian, |E[J]·s| with E[J] estimated without bias from
  M Jacobians at x + ε_m (Σ_i s_i² (ḡ_i² − v_i/M), v the sample variance over the M draws).

Why the last one: for Gaussian noise ε, Stein's lemma gives Cov(f(x+ε), ε) = E[J] Σ, so
|E[J]·s|² is the part of Var f(x+ε) that is linear in the noise, a LOWER bound on the MC
variance; the rest is the network's non-linearity over the noise. The delta method has no such
bound: at a ReLU network's kinks J(x) can exceed E[J] and over-estimate σ. Where the two
first-order numbers bracket 1 widely, no first-order estimate can match the MC on that network.
Prints figures; asserts nothing.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from apogeenet_jax import checkpoint, evaluation, prediction, uncertainty
from apogeenet_jax.constants import LABEL_NAMES

_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/demo', 'Run whose best checkpoint is used.')
_DATA_DIR = flags.DEFINE_string('data_dir', 'data/demo/tfds', 'tfds data dir of the built set.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Split to take the stars from.')
_NUM_STARS = flags.DEFINE_integer('num_stars', 64, 'Stars (the first of the split).')
_REF_DRAWS = flags.DEFINE_integer('reference_draws', 400, 'Draws of the reference MC.')
_JAC_DRAWS = flags.DEFINE_list('jacobian_draws', ['2', '4', '8'], 'M values for E[J].')


def _summary(name, ratio):
  cells = []
  for j, label in enumerate(LABEL_NAMES):
    p10, med, p90 = np.percentile(ratio[:, j], [10, 50, 90])
    cells.append(f'{label} {med:.3f} ({p10:.2f}, {p90:.2f})')
  print(f'  {name:24s} ' + '   '.join(cells))


def main(argv):
  del argv
  params, meta = evaluation.load_checkpoint(workdir=_WORKDIR.value)
  if checkpoint.ensemble_size(meta) > 1:
    params = jax.tree.map(lambda p: p[0], params)  # member 0: one network's linearity
  apply_fn = uncertainty.model_apply_fn(checkpoint.model_from_meta(meta))
  batches, _ = prediction.split_batches(_DATA_DIR.value, _SPLIT.value, _NUM_STARS.value)
  batch = next(iter(batches))
  keep = np.asarray(batch['mask'])
  flux = {'flux': jnp.asarray(batch['flux'][keep])}  # the model's inputs
  scale = {'flux': jnp.asarray(uncertainty.prepare_errors(batch['flux_err'][keep]))}
  n = int(flux['flux'].shape[0])
  index = jnp.arange(n, dtype=jnp.uint32)
  key = jax.random.PRNGKey(0)

  ref_fn = uncertainty.make_mc_fn(apply_fn, num_draws=_REF_DRAWS.value, noiseless_first=False)
  ref = np.asarray(ref_fn(params, flux, scale, index, jax.random.PRNGKey(1))[1])
  ref = ref * np.sqrt(_REF_DRAWS.value / (_REF_DRAWS.value - 1))
  print(f'{n} stars of split {_SPLIT.value!r}, checkpoint {meta["checkpoint_dir"]}; σ / σ_MC-'
        f'{_REF_DRAWS.value} (all draws noisy, ddof 1; its own sampling error '
        f'~{100 / np.sqrt(2 * _REF_DRAWS.value):.1f}%): median (p10, p90)')
  linear = np.asarray(uncertainty.make_linear_fn(apply_fn)(params, flux, scale, index, key)[1])
  _summary('linear (J at x)', linear / ref)
  mc100 = np.asarray(uncertainty.make_mc_fn(apply_fn, num_draws=100)(
      params, flux, scale, index, key)[1])
  _summary('MC-100 (catalogue)', mc100 / ref)
  for m in (int(v) for v in _JAC_DRAWS.value):
    fn = uncertainty.make_linear_fn(apply_fn, num_draws=m)  # evaluate.py's --linear_draws=m
    ej = np.asarray(fn(params, flux, scale, index, key)[1])
    _summary(f'E[J] (unbiased), M={m}', ej / ref)

if __name__ == '__main__':
  app.run(main)
