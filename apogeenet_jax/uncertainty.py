"""Monte Carlo uncertainties (paper §3.5; docs/uncertainties.md): predictions on noisy copies of a spectrum.

For each star, N realisations ``flux + N(0, 1) · error`` per pixel go through the network; the
catalogue reports their mean and standard deviation per label. Two error treatments:

``median`` (default, the authors' released inference code):
  error capped at 5 × the spectrum's median error, the median taken over ALL 8575 pixels as the
  released code's ``np.median(e_flux)`` does (the 800–900 bad pixels at 1e10 shift it from the
  50th to about the 55th percentile of the good pixels — a small, faithful effect); pixels whose
  error is BAD_PIXEL_ERROR (1e10: array ends, chip gaps) get no noise; draw 0 is noiseless.
``mean`` (the paper's text):
  error capped at 5 × the mean error of the GOOD pixels (error < BAD_PIXEL_ERROR). Including the
  1e10 pixels would make the cap ~1e9 and the draws meaningless, so they are excluded from the
  mean and, as in ``median`` mode, get no noise (the paper does not say; noise of 1e10 would
  destroy the prediction). All N draws are noisy. On real files a few finite but huge errors make
  the good-pixel mean up to 1000× the median, so this cap leaves them almost untouched.

Randomness: the noise of draw d of the star with global index i comes from
``fold_in(fold_in(PRNGKey(seed), i), d)``, so a star's result depends on neither the batch it
lands in, the padding, the draw chunking, nor the number of other draws.

Ensembles (K networks, params stacked on a leading member axis): ``make_ensemble_fn`` maps a
single-network function over the members, every member seeing the SAME noise draws, and returns
per star the mean over members and draws and two spreads (standardised units):
  σ_noise = sqrt(mean over members of each member's draw variance)   (photon noise)
  σ_model = std over members of the members' means (ddof 0)           (the networks disagree)
Their quadrature sum is exactly the standard deviation over all K·N predictions (law of total
variance), which is what the catalogue's raw total σ is.

Memory: the draws run in chunks of ``draw_chunk`` through one jitted ``lax.map``, so the device
holds activations for ``batch · draw_chunk`` spectra at a time whatever N is.

First-order propagation (``make_linear_fn``, ``evaluate.py --uncertainty=linear``): the standard
error-propagation formula σ_k² = Σ_i (∂f_k/∂x_i · s_i)² with s_i the same per-pixel noise scale as
the MC (``prepare_errors``: same cap, same 1e10 pixels without noise); the prediction is the
noiseless forward pass. Two Jacobians: the delta method's J(x) at the spectrum (``num_draws=0``,
deterministic), or the noise-averaged E[J] from M of the MC's own noisy copies (``num_draws=M``,
``evaluate.py``'s default M = 2), whose σ² is by Stein's lemma the part of the MC variance linear
in the noise (a lower bound on it). Not in the paper. Both equal the MC where the network is
linear over the noise and miss it where it is not (very low S/N, ReLU or max-pool decisions
flipped by the noise): on the demo's trained network σ / σ_MC-100 has median 0.88–0.89 for E[J]
and 1.20–1.22 for J(x) (``benchmarks/mc_benchmark.py``, ``benchmarks/sigma_linearity.py``).
Reverse mode wins because there are 3 outputs against 8575 inputs: one forward pass and three
backward passes per spectrum (``mode='vjp'``; the batch is one function call, so each star's
pull-back is its own row because the rows do not interact in eval mode); 'jacrev' runs the same
passes, 'jvp' (8575 tangents per star) is ~1000× slower. Measured on 2 quiet CPU cores,
paper-size network, batch 16: J(x) ~18× the speed of MC-100, E[J] with M = 2 ~8.5×. Memory: the
forward residuals of ``batch`` spectra (E[J]: M · batch) plus three backward passes at once.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apogeenet_jax.preprocessing import BAD_PIXEL_ERROR

# Catalogue placeholders for a missing photometric value start here (99.999; APOGEE Net II).
MISSING_VALUE = 98.0
# §3.5: "each pixel's error capped at 5× the spectrum's mean error" (the code: median).
ERROR_CAP_FACTOR = 5.0
ERROR_CAP_MODES = ('median', 'mean')
# §3.5: 100 realisations per spectrum.
PAPER_NUM_DRAWS = 100
LINEAR_MODES = ('vjp', 'jacrev', 'jvp')
# evaluate.py --uncertainty=linear: the noise-averaged Jacobian from 2 draws (measured on the demo
# network: 0.88–0.89× the MC-100 σ at 8.5× its speed; the delta method, --linear_draws=0, 1.20–1.22×
# at 18–21×; docs/uncertainties.md).
DEFAULT_LINEAR_DRAWS = 2
# Draws evaluated together (device memory: batch · draw_chunk spectra); no effect on the numbers.
DEFAULT_DRAW_CHUNK = 25
# The M noisy Jacobians of a batch are held at once (M × 3 × batch × 8575 floats): 100000 ran
# out of memory. Beyond this many the MC estimator (--uncertainty=mc) is the cheaper way.
MAX_LINEAR_DRAWS = 100


class UncertaintyError(ValueError):
  """Bad Monte Carlo settings or inputs."""


def prepare_errors(flux_err: np.ndarray, mode: str = 'median') -> np.ndarray:
  """Per-pixel noise scale for the MC draws.

  Args:
    flux_err: (..., 8575) errors already passed through ``preprocess_error`` (bad pixels at
      BAD_PIXEL_ERROR), 1e-17 erg/s/cm²/Å.
    mode: 'median' (authors' code) or 'mean' (paper text); see the module docstring.

  Returns:
    (..., 8575) float32 noise standard deviation per pixel; 0 where no noise is drawn.
  """
  if mode not in ERROR_CAP_MODES:
    raise UncertaintyError(f'error cap mode {mode!r} is not one of {ERROR_CAP_MODES}')
  err = np.asarray(flux_err, dtype=np.float64)
  bad = ~(err < BAD_PIXEL_ERROR)
  if mode == 'median':
    cap = ERROR_CAP_FACTOR * np.median(err, axis=-1, keepdims=True)
  else:
    n_good = np.maximum((~bad).sum(axis=-1, keepdims=True), 1)
    cap = ERROR_CAP_FACTOR * np.where(bad, 0.0, err).sum(axis=-1, keepdims=True) / n_good
  return np.where(bad, 0.0, np.minimum(err, cap)).astype(np.float32)


def photometry_errors(values: np.ndarray, errors: np.ndarray) -> np.ndarray:
  """The noise scale of photometric inputs (n, 7): their catalogue errors, 0 where the value is
  missing (non-finite or ≥ 98, which the network replaces) or the error is not a finite number
  ≥ 0."""
  values, errors = np.asarray(values, np.float64), np.asarray(errors, np.float64)
  ok = np.isfinite(values) & (values < MISSING_VALUE) & np.isfinite(errors) & (errors >= 0)
  return np.where(ok, errors, 0.0).astype(np.float32)


def draw_key(key: jax.Array, star_index, draw_index) -> jax.Array:
  """The PRNG key of one (star, draw): independent of batching and of the number of draws."""
  return jax.random.fold_in(jax.random.fold_in(key, star_index), draw_index)


def _draw_noise(keys: jax.Array, j: int, shape: tuple[int, ...], dtype) -> jax.Array:
  """N(0, 1) noise of shape (*keys.shape[:-1], *shape): noisy input j (in name order) of each
  (star, draw) key; input 0 draws from the key itself, input j > 0 from ``fold_in(key, j)``."""
  def one(k):
    return jax.random.normal(k if j == 0 else jax.random.fold_in(k, j), shape, dtype)
  for _ in range(keys.ndim - 1):
    one = jax.vmap(one)
  return one(keys)


def make_mc_fn(apply_fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array], *, num_draws: int,
               draw_chunk: int = 25, noiseless_first: bool = True) -> Callable:
  """A jitted ``fn(params, inputs, noise_scale, star_index, key) -> (mean_z, std_z)``.

  Args:
    apply_fn: ``apply_fn(params, inputs {name: (n, …)}) -> (n, 3)`` standardised predictions.
    num_draws: N ≥ 1 realisations per star (paper: 100). Use ``make_predict_fn`` for N = 0.
    draw_chunk: draws evaluated together per star; the device sees batch · draw_chunk spectra.
    noiseless_first: draw 0 is the spectrum itself (the authors' code, ``median`` mode).

  The returned function takes the model's named inputs {name: (B, …)} (the flux (B, 8575)
  float32), ``noise_scale`` {name: (B, …)} for the inputs that are perturbed (the flux's from
  ``prepare_errors``; an input without one is passed unchanged to every draw), star_index (B,)
  int global star numbers and a PRNG key; it returns the mean and the population standard
  deviation (ddof 0) over the N draws, each (B, 3) standardised.
  """
  if num_draws < 1:
    raise UncertaintyError(f'num_draws must be >= 1, got {num_draws}')
  chunk = max(1, min(int(draw_chunk), num_draws))
  n_chunks = -(-num_draws // chunk)

  def mc(params, inputs, noise_scale, star_index, key):
    batch = star_index.shape[0]
    names = sorted(noise_scale)
    draw_ids = jnp.arange(n_chunks * chunk, dtype=jnp.uint32).reshape(n_chunks, chunk)

    def one_chunk(ids):  # ids (chunk,) → predictions (batch, chunk, 3)
      keys = jax.vmap(lambda i: jax.vmap(lambda d: draw_key(key, i, d))(ids))(star_index)
      x = {}
      for name, value in inputs.items():
        tail = value.shape[1:]
        if name in noise_scale:
          eps = _draw_noise(keys, names.index(name), tail, value.dtype)
          if noiseless_first:
            eps = eps * (ids > 0).astype(value.dtype).reshape(1, chunk, *(1,) * len(tail))
          v = value[:, None] + eps * noise_scale[name][:, None]
        else:
          v = jnp.broadcast_to(value[:, None], (batch, chunk, *tail))
        x[name] = v.reshape(batch * chunk, *tail)
      return apply_fn(params, x).reshape(batch, chunk, -1)

    preds = jax.lax.map(one_chunk, draw_ids)  # (n_chunks, batch, chunk, 3)
    preds = jnp.moveaxis(preds, 0, 1).reshape(batch, n_chunks * chunk, -1)[:, :num_draws]
    # Shift by draw 0 before the moments: identical draws then give σ exactly 0, not rounding.
    ref = preds[:, :1]
    shifted = preds - ref
    return ref[:, 0] + shifted.mean(axis=1), shifted.std(axis=1)

  return jax.jit(mc)


def make_predict_fn(apply_fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array]) -> Callable:
  """``--mc=0``: the noiseless prediction alone, same signature as ``make_mc_fn``'s result.

  The standard deviation is NaN: no uncertainty was computed (the catalogue's σ columns say so).
  """

  def predict(params, inputs, noise_scale, star_index, key):
    del noise_scale, star_index, key
    z = apply_fn(params, inputs)
    return z, jnp.full_like(z, jnp.nan)

  return jax.jit(predict)


def make_ensemble_fn(member_fn: Callable, *, vectorize: bool = False) -> Callable:
  """K stacked members: ``fn(params (K, …), inputs, noise_scale, star_index, key)`` →
  ``(mean_z, sigma_noise_z, sigma_model_z)``, each (B, 3), from a ``make_mc_fn`` or
  ``make_predict_fn`` result (σ_noise NaN for the latter).

  Every member sees the same draws (the key does not depend on the member). The members run one
  after another in one jitted ``lax.map`` (device memory as for one network), or with
  ``vectorize`` in one ``vmap`` (memory K-fold). Both give identical numbers; on the 2-core CPU
  the vmap was 3× slower (K = 4, demo network, 16 stars × 100 draws: map 19.7 s, vmap 60.9 s,
  4 separate single-network calls 20.7 s; vmap turns every convolution after the first into a
  grouped one; ``benchmarks/mc_benchmark.py --ensemble_sizes=4 [--ensemble_vectorize]`` gives
  the same picture), so map is the default. No accelerator was available to time vmap there.
  """

  def ensemble(params, inputs, noise_scale, star_index, key):
    if vectorize:
      means, stds = jax.vmap(member_fn, in_axes=(0, None, None, None, None))(
          params, inputs, noise_scale, star_index, key)  # (K, B, 3) each
    else:
      means, stds = jax.lax.map(lambda p: member_fn(p, inputs, noise_scale, star_index, key),
                                params)
    return (means.mean(axis=0), jnp.sqrt(jnp.mean(jnp.square(stds), axis=0)),
            means.std(axis=0))

  return jax.jit(ensemble)


def _total(terms: list[jax.Array]) -> jax.Array:
  """The sum of ``terms`` (one per noisy input), the first one unchanged when it is alone."""
  return functools.reduce(jnp.add, terms)


def _per_star(x: jax.Array, star_axis: int) -> jax.Array:
  """Sums every axis of ``x`` after ``star_axis`` (an input's own axes)."""
  return jnp.sum(x, axis=tuple(range(star_axis + 1, x.ndim)))


def make_linear_fn(apply_fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array], *,
                   mode: str = 'vjp', num_draws: int = 0, pixel_chunk: int = 256) -> Callable:
  """σ by first-order propagation: same signature as ``make_mc_fn``'s result.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> (n, 3)``; rows must not interact (eval mode).
    mode: how the Jacobian is taken, all equal to float rounding:
      'vjp' (default): one batched forward pass, which is also the prediction, then the
        pull-back of the 3 unit cotangents vmapped, i.e. 3 backward passes of the whole batch;
      'jacrev': ``vmap(jacrev)`` over stars (the same passes, as fast within the noise);
      'jvp': forward mode, one tangent s_i·e_i per pixel in chunks of ``pixel_chunk``
        (8575 tangents per star: kept only to measure against; one noisy input only).
    num_draws: 0 (default): the delta method, the Jacobian J(x) at the spectrum itself.
      M ≥ 2: the noise-averaged Jacobian E[J] (statistical linearisation), from the Jacobians at
      x + ε_d·s for the MC's own noise draws d = 1…M (``draw_key``), estimated without bias:
      σ_k² = Σ_i s_i² (ḡ_ki² − v_ki / M), ḡ and v the mean and sample variance over the draws.
      For Gaussian noise Stein's lemma gives Cov(f(x+ε), ε) = E[J]·diag(s²), so this σ² is the
      part of the MC variance that is linear in the noise: a lower bound on it, where the delta
      method has no bound (``benchmarks/sigma_linearity.py`` measures both). 'vjp' only; costs M
      times the delta method plus the noiseless forward pass, with the M noisy copies of the
      batch in one call (device memory M× the delta method's).
    pixel_chunk: tangents per chunk in 'jvp' mode.

  The returned function takes the inputs {name: (B, …)}, ``noise_scale`` {name: (B, …)} of the
  perturbed inputs (the flux's from ``prepare_errors``, 0 where no noise; the others are held
  fixed), star_index (B,) and key (used only when ``num_draws`` ≥ 2, exactly as the MC uses
  them); it returns the noiseless prediction and σ (the sum over the noisy inputs), each (B, 3)
  standardised.
  """
  if mode not in LINEAR_MODES:
    raise UncertaintyError(f'linear mode {mode!r} is not one of {LINEAR_MODES}')
  if num_draws == 1 or num_draws < 0:
    raise UncertaintyError(f'linear num_draws must be 0 (Jacobian at the spectrum) or >= 2 '
                           f'(noise-averaged Jacobian; its unbiased estimate needs two), got '
                           f'{num_draws}')
  if num_draws and mode != 'vjp':
    raise UncertaintyError(f"linear num_draws={num_draws} needs mode 'vjp', got {mode!r}")

  def linear(params, inputs, noise_scale, star_index, key):
    names = sorted(noise_scale)
    fixed = {k: v for k, v in inputs.items() if k not in noise_scale}
    noisy = {k: inputs[k] for k in names}

    def f(x):
      return apply_fn(params, {**fixed, **x})

    if not names:  # Nothing perturbed: σ 0.
      z = f(noisy)
      return z, jnp.zeros_like(z)
    if num_draws:
      z = f(noisy)
      grads = _noisy_jacobian_rows(f, noisy, noise_scale, star_index, key, num_draws)
      terms = []
      for name in names:
        mean, var = grads[name].mean(axis=0), grads[name].var(axis=0, ddof=1)  # (3, B, …) each
        terms.append(_per_star((jnp.square(mean) - var / num_draws)
                               * jnp.square(noise_scale[name]), 1))
      var = jnp.maximum(_total(terms).T, 0.0)
    elif mode == 'vjp':
      z, grads = _jacobian_rows(f, noisy)
      var = _total([_per_star(jnp.square(grads[n] * noise_scale[n]), 1) for n in names]).T
    elif mode == 'jacrev':
      z = f(noisy)
      jac = jax.vmap(jax.jacrev(lambda x: f(jax.tree.map(lambda a: a[None], x))[0]))(noisy)
      var = _total([_per_star(jnp.square(jac[n] * noise_scale[n][:, None]), 1)
                    for n in names])  # (B, 3)
    else:
      if len(names) != 1:
        raise UncertaintyError(f"linear mode 'jvp' takes one noisy input, got {names}")
      (name,) = names
      z, var = _jvp_variance(lambda x: f({name: x}), noisy[name], noise_scale[name], pixel_chunk)
    return z, jnp.sqrt(var)

  return jax.jit(linear)


def _jacobian_rows(f, x):
  """(f(x) (B, 3), the rows ∂f_k(x_b)/∂x_b {name: (3, B, …)}): one forward, 3 backward passes."""
  z, pull_back = jax.vjp(f, x)
  units = jnp.eye(z.shape[-1], dtype=z.dtype)
  # Cotangent e_k on every row: row b of the pull-back is ∂f_k(x_b)/∂x_b alone.
  (grads,) = jax.vmap(lambda e: pull_back(jnp.broadcast_to(e, z.shape)))(units)
  return z, grads


def _noisy_jacobian_rows(f, x, noise_scale, star_index, key, num_draws):
  """{name: (M, 3, B, …)}: the Jacobian rows at the MC's noisy copies d = 1…M.

  The M copies go through as one batch of M·B rows (rows do not interact): XLA's CPU
  convolutions inside a loop (``lax.map``) ran ~7× slower than this in one call.
  """
  names = sorted(x)
  batch = star_index.shape[0]
  draws = jnp.arange(1, num_draws + 1, dtype=jnp.uint32)
  keys = jax.vmap(lambda d: jax.vmap(lambda i: draw_key(key, i, d))(star_index))(draws)
  noisy = {}
  for j, name in enumerate(names):
    tail = x[name].shape[1:]
    eps = _draw_noise(keys, j, tail, x[name].dtype)
    noisy[name] = (x[name][None] + eps * noise_scale[name][None]).reshape(num_draws * batch, *tail)
  _, grads = _jacobian_rows(f, noisy)  # {name: (3, M·B, …)}
  return {name: jnp.moveaxis(g.reshape(g.shape[0], num_draws, batch, *g.shape[2:]), 1, 0)
          for name, g in grads.items()}


def _jvp_variance(f, flux, noise_scale, pixel_chunk):
  """Forward mode (jvp via ``linearize``): Σ_i (J e_i s_i)² summed over pixel chunks."""
  n_pix = flux.shape[1]
  chunk = max(1, min(int(pixel_chunk), n_pix))
  n_chunks = -(-n_pix // chunk)
  starts = jnp.arange(n_chunks) * chunk
  z, push_forward = jax.linearize(f, flux)

  def one_chunk(var, start):
    pix = start + jnp.arange(chunk)
    # Tangent j of the chunk: s_i at pixel i = start + j of every row, 0 elsewhere (and beyond P).
    onehot = (pix[:, None] == jnp.arange(n_pix)[None, :]).astype(flux.dtype)  # (chunk, P)
    tangents = onehot[:, None, :] * noise_scale[None]  # (chunk, B, P)
    out = jax.vmap(push_forward)(tangents)  # (chunk, B, 3)
    return var + jnp.sum(jnp.square(out), axis=0), None

  var, _ = jax.lax.scan(one_chunk, jnp.zeros_like(z), starts)
  return z, var


def model_apply_fn(model) -> Callable[[Any, Mapping[str, jax.Array]], jax.Array]:
  """``(params, inputs) -> standardised predictions`` of a flax linen module of any family,
  eval mode, its named inputs passed as keywords. ``params``: the parameter tree, or for a
  network with state its Flax variables {'params': …, 'batch_stats': …} (``checkpoint.load_params``
  returns them so): eval mode uses the running statistics, a deterministic function."""
  return functools.partial(_apply, model)


def _apply(model, params, inputs):
  variables = params if 'params' in params else {'params': params}
  return model.apply(variables, **inputs, train=False)


# ------------------------------------------------------------------------------------------------
# The σ estimators and the settings of a run. Adding an estimator: its ``make_*_fn`` above, one
# ``Estimator`` in ``ESTIMATORS`` and, if it has a setting of its own, a field of ``MCSettings``
# named in ``Estimator.fields`` (and evaluate.py's flag for it). The flag choices, the
# catalogue's column descriptions, the run header and the calibration record follow from here.


@dataclasses.dataclass(frozen=True)
class Estimator:
  """One way of making σ_noise.

  make_fn: (settings, apply_fn) → ``fn(params, inputs, noise_scale, star_index, key)`` → (z, σ_z).
  pred_desc, err_desc: what the catalogue's *_PRED and *_ERR_NOISE columns then hold.
  fields: the ``MCSettings`` fields of its own that change its numbers (recorded with the run).
  draws: whether ``MCSettings.mc`` noisy draws are made (else 'mc' is recorded as 0).
  """
  make_fn: Callable[['MCSettings', Callable], Callable]
  pred_desc: str
  err_desc: str
  fields: tuple[str, ...] = ()
  draws: bool = False


# --uncertainty's choices; 'mc' (§3.5, the default) first.
ESTIMATORS: Mapping[str, Estimator] = {
    'mc': Estimator(
        lambda s, f: make_mc_fn(f, num_draws=s.mc, draw_chunk=s.draw_chunk,
                                noiseless_first=(s.error_cap == 'median')),
        'mean over ensemble members and MC draws',
        'std of the MC noise draws, averaged over members (empty: no MC run)', draws=True),
    'linear': Estimator(
        lambda s, f: make_linear_fn(f, num_draws=s.linear_draws),
        'noiseless prediction, mean over ensemble members',
        'first-order propagation of the flux errors, averaged over members',
        fields=('linear_draws',)),
}
# --mc=0: no σ at all, whatever the estimator.
NO_SIGMA = 'none'
_NOISELESS = Estimator(lambda s, f: make_predict_fn(f),
                       'noiseless prediction, mean over ensemble members', 'not computed (empty)')
# What can produce the σ columns (header keyword SIGMA) → its Estimator.
SIGMA_SOURCES: Mapping[str, Estimator] = {**ESTIMATORS, NO_SIGMA: _NOISELESS}


@dataclasses.dataclass(frozen=True)
class MCSettings:
  """How the prediction and its σ_noise are made (§3.5); the same settings, the same numbers.

  mc: noisy draws per star (paper: 100); 0: the noiseless prediction, no σ.
  estimator: a key of ``ESTIMATORS``: 'mc' (the draws) or 'linear' (first-order propagation of
    the same capped errors; ``mc`` then only says whether a σ is wanted).
  error_cap: 'median' (authors' code, draw 0 noiseless) or 'mean' (paper text).
  seed: PRNG seed of the draws. draw_chunk: draws evaluated together (device memory).
  linear_draws: 'linear' only: M ≥ 2 (default 2) = the noise-averaged Jacobian from M of the
    MC's draws; 0 = the Jacobian at the spectrum (delta method) (``make_linear_fn``).
  photometry_noise: also perturb a family's 'metadata' input (APOGEE Net II's photometry) by its
    catalogue errors 'metadata_err' (beyond the authors, who perturb the flux only); values
    that are missing (non-finite or ≥ 98) or have no finite error get none.
  """
  mc: int = PAPER_NUM_DRAWS
  estimator: str = 'mc'
  error_cap: str = 'median'
  seed: int = 0
  draw_chunk: int = DEFAULT_DRAW_CHUNK
  linear_draws: int = DEFAULT_LINEAR_DRAWS
  photometry_noise: bool = False

  def __post_init__(self):
    problems = [f'--{name} must be >= {least}, got {value}'
                for name, value, least in (('mc', self.mc, 0), ('draw_chunk', self.draw_chunk, 1))
                if value < least]
    if self.mc == 1 and self.estimator == 'mc':
      problems.append('--mc must be 0 (no σ) or >= 2: the σ of one draw is 0')
    if self.linear_draws == 1 or self.linear_draws < 0 or self.linear_draws > MAX_LINEAR_DRAWS:
      problems.append(f'--linear_draws must be 0 or 2 … {MAX_LINEAR_DRAWS} (the draws are held '
                      f'at once), got {self.linear_draws}')
    problems += [f'--{name} must be one of {tuple(choices)}, got {value!r}'
                 for name, value, choices in (('uncertainty', self.estimator, ESTIMATORS),
                                              ('error_cap', self.error_cap, ERROR_CAP_MODES))
                 if value not in choices]
    if problems:
      raise UncertaintyError('; '.join(problems))

  @property
  def sigma(self) -> str:
    """What produced the σ columns: a key of ``SIGMA_SOURCES`` ('none' when mc == 0)."""
    return NO_SIGMA if self.mc == 0 else self.estimator

  def record(self) -> dict[str, Any]:
    """The settings that define the numbers, as one JSON dict (the run header, the
    calibration record): 'sigma', 'mc' (draws actually made), 'error_cap', 'seed' and the
    estimator's own fields."""
    source = SIGMA_SOURCES[self.sigma]
    out = {'sigma': self.sigma, 'mc': int(self.mc) if source.draws else 0,
           'error_cap': self.error_cap, 'seed': int(self.seed),
           **{name: getattr(self, name) for name in source.fields}}
    if self.photometry_noise:  # Recorded only when on: records made before it stay equal.
      out['photometry_noise'] = True
    return out

  def noise_scale(self, batch: Mapping[str, np.ndarray], input_names: Sequence[str]
                  ) -> dict[str, np.ndarray]:
    """The noise scale of a batch by input name: the flux's per pixel (``prepare_errors`` of
    'flux_err'), and with ``photometry_noise`` the metadata's (``photometry_errors``) when the
    model reads it; zeros when no σ is wanted."""
    scales = {}
    if 'flux' in input_names:
      scales['flux'] = (np.zeros(np.shape(batch['flux']), np.float32) if self.sigma == NO_SIGMA
                        else prepare_errors(batch['flux_err'], self.error_cap))
    if self.photometry_noise and 'metadata' in input_names and self.sigma != NO_SIGMA:
      if 'metadata_err' not in batch:
        raise UncertaintyError('--photometry_noise needs the photometric errors (*_ERR columns '
                               'in the catalogue or the --metadata table)')
      scales['metadata'] = photometry_errors(batch['metadata'], batch['metadata_err'])
    return scales

  def make_fn(self, apply_fn: Callable, ensemble_size: int = 1) -> Callable:
    """The jitted ``fn(params, inputs, noise_scale, star_index, key)`` of these settings."""
    fn = SIGMA_SOURCES[self.sigma].make_fn(self, apply_fn)
    return make_ensemble_fn(fn) if ensemble_size > 1 else fn
