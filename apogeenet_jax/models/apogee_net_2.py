"""APOGEE Net II as a Flax (linen) module: the spectrum and 7 photometric values (Sprague et al.
2022), Teff predicted as log10 Teff.

Layer for layer the authors' released PyTorch network (hutchresearch/ApogeeNet2, MIT), so that
their weights load with a transpose and nothing else (``convert_torch``):

    the Appendix-B conv stack of APOGEE Net I, unchanged (``spectrum_features``) → 64 × 133 = 8512
      features flattened channel-major;
    the metadata MLP ``metadata.l1`` … ``metadata.l5``: Dense 7 → 8 → 16 → 32 → 32 → 64, each
      followed by ReLU (the last one included) → 64 features;
    concatenate [8512 conv features, 64 metadata features] (that order: fc1's first 8512 input rows
      read the spectrum);
    Dense 8576 → 512 → dropout → ReLU → Dense 512 → dropout → ReLU → Dense 3.

4,691,963 parameters. Flax parameter tree: ``conv1`` … ``conv12``, ``fc1`` … ``fc3`` as in Net I,
and the nested ``metadata`` module with Dense ``l1`` … ``l5``, i.e. params['metadata']['l1'], so a
state-dict key 'metadata.l1.weight' is the path ('metadata', 'l1') and conversion is mechanical.

Inputs (batch, 8575) raw apStar flux, 1e-17 erg/s/cm²/Å, scaled as in Net I (``flux_scaling``,
``input_scale``; the authors: 'none', 1.0); (batch, 7) RAW metadata, [Gaia parallax (mas), G, BP,
RP, 2MASS J, H, K] in that order. The module prepares the metadata itself, with the authors' rule:
a value that is non-finite or ≥ 98 (the catalogues' 99.999-style "missing" placeholders) is replaced
by its column's ``metadata_fill``, then each column is z-scored with ``metadata_mean`` and
``metadata_std``. With ``metadata_transform='colours'`` (a recipe of this project, not the
authors') the columns are first PLX, G and five colours (``constants.METADATA_TRANSFORMS``), a
colour missing where either band is, and the fill, mean and std are of those columns. Being
module attributes, these are recorded in the checkpoint meta beside
``flux_scaling`` and ``input_scale``, so training, evaluation, the Monte Carlo draws and the linear
σ all see one function of the raw inputs. Defaults: the authors' constants.
Output: (batch, 3) standardised (log g, log10 Teff, [Fe/H]).
"""

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from apogeenet_jax.constants import (
  LABEL_NAMES,
  METADATA_TRANSFORMS,
  MISSING_MAGNITUDE,
  N_PIXELS,
  metadata_column_names,
)
from apogeenet_jax.models import Family, LabelSpace, ModelError, register
from apogeenet_jax.models.apogee_net import (
  APOGEENet,
  check_torch_shapes,
  expected_torch_shapes,
  spectrum_features,
  torch_layer,
)

METADATA_COLUMNS = ('GAIAEDR3_PARALLAX', 'GAIAEDR3_PHOT_G_MEAN_MAG', 'GAIAEDR3_PHOT_BP_MEAN_MAG',
                    'GAIAEDR3_PHOT_RP_MEAN_MAG', 'J', 'H', 'K')
N_METADATA = len(METADATA_COLUMNS)
METADATA_WIDTHS = (8, 16, 32, 32, 64)
# The authors' rule: a value at or above this is a catalogue's "missing" placeholder.
METADATA_CEILING = MISSING_MAGNITUDE
# The authors' constants (hutchresearch/ApogeeNet2, their dataset code), per column.
AUTHORS_METADATA_FILL = (-84.82700, 21.40844, 24.53892, 20.26276, 18.43900, 24.00000, 17.02500)
AUTHORS_METADATA_MEAN = (-0.6959113178296891, 13.630030428758845, 14.5224418320574,
                         12.832448427460813, 11.537019017423619, 10.858717523536697,
                         10.702106344460235)
AUTHORS_METADATA_STD = (14.572430555504504, 2.2762944923233883, 2.8342029214199704,
                        2.136884367623457, 1.6793628207779732, 1.4888102872755238,
                        1.5848713221149886)
# The authors' label (μ, σ) of (log g, log10 Teff, [Fe/H]) (their inference code).
AUTHORS_LABELS = ((2.925783395767212, 3.6705732345581055, -0.13088105618953705),
                  (1.1890668869018555, 0.0917675793170929, 0.25668784976005554))


def transform_metadata(metadata, transform: str = 'magnitudes', xp=jnp):
  """Raw metadata (batch, 7) → (the transformed columns (batch, 7), where each is missing
  (batch, 7) bool): a raw value is missing when it is non-finite or ≥ 98 (the catalogues'
  99.999); a colour is missing when either of its bands is. Missing entries hold 0, never NaN or
  a placeholder. ``xp``: jax.numpy (the module) or numpy (the fit)."""
  if transform not in METADATA_TRANSFORMS:
    raise ModelError(f'metadata_transform {transform!r}: expected one of '
                     f'{sorted(METADATA_TRANSFORMS)}')
  bad = ~xp.isfinite(metadata) | (metadata >= METADATA_CEILING)
  x = xp.where(bad, 0, metadata)
  first, second = (np.array(c) for c in zip(*METADATA_TRANSFORMS[transform], strict=True))
  has_second = second >= 0
  second = np.where(has_second, second, 0)
  missing = bad[:, first] | (has_second & bad[:, second])
  return xp.where(missing, 0, x[:, first] - xp.where(has_second, x[:, second], 0)), missing


def prepare_metadata(metadata: jnp.ndarray, fill: Sequence[float], mean: Sequence[float],
                     std: Sequence[float], transform: str = 'magnitudes') -> jnp.ndarray:
  """Raw metadata (batch, 7) → z-scored (batch, 7): the ``transform``'s columns, each missing one
  replaced by its column's ``fill`` first (for 'magnitudes', the authors' rule). The replaced
  values pass no gradient (they are constants)."""
  dtype = metadata.dtype
  x, bad = transform_metadata(metadata, transform)
  x = jnp.where(bad, jnp.asarray(fill, dtype), x)
  return (x - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)


class MetadataNet(nn.Module):
  """Dense + ReLU per width (the authors' MetadataNet, ReLU after the last layer too)."""
  widths: Sequence[int] = METADATA_WIDTHS

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Dense(width, name=f'l{i + 1}')(x))
    return x


class APOGEENet2(APOGEENet):
  """The APOGEE Net II regression network (module docstring).

  Attributes: ``APOGEENet``'s (channels, hidden, num_targets, dropout_rate, input_length, pool,
    input_scale, flux_scaling: inherited, the same meaning), and
    metadata_widths: widths of the metadata MLP's layers (the last one joins fc1's input).
    metadata_fill, metadata_mean, metadata_std: per-column replacement of a bad value, mean and
      std of the 7 metadata columns (``prepare_metadata``); training may fit its own.
    metadata_transform: what the metadata MLP reads (``constants.METADATA_TRANSFORMS``):
      'magnitudes', the authors' 7 raw values, or 'colours'; fill, mean and std are of these
      columns.
  """

  metadata_widths: Sequence[int] = METADATA_WIDTHS
  metadata_transform: str = 'magnitudes'
  metadata_fill: Sequence[float] = AUTHORS_METADATA_FILL
  metadata_mean: Sequence[float] = AUTHORS_METADATA_MEAN
  metadata_std: Sequence[float] = AUTHORS_METADATA_STD

  @property
  def input_shapes(self) -> dict[str, tuple[int, ...]]:
    return {'flux': (self.input_length,), 'metadata': (N_METADATA,)}

  @nn.compact
  def __call__(self, flux: jnp.ndarray, metadata: jnp.ndarray, *, train: bool = False
               ) -> jnp.ndarray:
    """flux (batch, L) raw, metadata (batch, 7) raw → standardised targets (batch, 3)."""
    for name in ('metadata_fill', 'metadata_mean', 'metadata_std'):
      if len(getattr(self, name)) != N_METADATA:
        raise ValueError(f'APOGEENet2.{name} needs {N_METADATA} values (one per column of '
                         f'{METADATA_COLUMNS}), got {getattr(self, name)}')
    if metadata.shape != (flux.shape[0], N_METADATA):
      raise ValueError(f'APOGEENet2 expects metadata of shape (batch, {N_METADATA}) beside flux '
                       f'{flux.shape}, got {metadata.shape}')
    x = spectrum_features(self, flux)
    m = prepare_metadata(metadata.astype(x.dtype), self.metadata_fill, self.metadata_mean,
                         self.metadata_std, self.metadata_transform)
    # The authors' torch.hstack((x, m)): the spectrum's features first.
    x = jnp.concatenate([x, MetadataNet(self.metadata_widths, name='metadata')(m)], axis=1)
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, name=f'fc{i + 1}')(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_targets, name=f'fc{len(self.hidden) + 1}')(x)


def expected_torch_shapes_2(model: APOGEENet2) -> dict[str, tuple[int, ...]]:
  """The state_dict keys and shapes of the PyTorch network that ``model`` mirrors: Net I's, with
  fc1 reading the metadata features too, and the metadata MLP's."""
  shapes = expected_torch_shapes(model)
  width, n_in = shapes['fc1.weight']
  shapes['fc1.weight'] = (width, n_in + model.metadata_widths[-1])
  widths = (N_METADATA, *model.metadata_widths)
  for i, (w_in, w_out) in enumerate(itertools.pairwise(widths), start=1):
    shapes[f'metadata.l{i}.weight'], shapes[f'metadata.l{i}.bias'] = (w_out, w_in), (w_out,)
  return shapes


def params_from_torch(arrays: Mapping[str, np.ndarray], model: APOGEENet2 | None = None
                      ) -> dict[str, Any]:
  """A PyTorch APOGEE Net II state_dict (float32 arrays) → Flax params for ``model`` (default:
  the authors'). A key's dotted layer name is its path in the tree: 'metadata.l1.weight' →
  params['metadata']['l1']['kernel']."""
  model = model or APOGEENet2()
  check_torch_shapes(arrays, expected_torch_shapes_2(model), 'APOGEE Net II')
  params: dict[str, Any] = {}
  for key, value in arrays.items():
    layer, leaf, array = torch_layer(key, value)
    node = params
    for part in layer.split('.'):
      node = node.setdefault(part, {})
    node[leaf] = array
  return params


def fit_metadata(model: APOGEENet2, vectors: Mapping[str, np.ndarray]) -> APOGEENet2:
  """``model`` with the metadata statistics of the training split, where its config leaves
  them empty (``metadata_fill = ()``): the authors' rule fitted anew. A column's fill is the
  value beyond everything seen, as the authors' constants are (the smallest parallax, the
  faintest magnitude: a missing value reads as "more distant / fainter than any star"); mean
  and std are those of the filled column. Raises ModelError when the split has no metadata."""
  if len(model.metadata_fill) and len(model.metadata_mean) and len(model.metadata_std):
    return model
  if 'metadata' not in vectors:
    raise ModelError('APOGEE Net II fits its metadata statistics on the training split, whose '
                     'records carry no metadata (rebuild the data set from a catalogue with the '
                     'photometry columns, docs/data.md)')
  values, bad = transform_metadata(np.asarray(vectors['metadata'], np.float64),
                                   model.metadata_transform, xp=np)
  good = ~bad
  if not good.any(axis=0).all():
    names = metadata_column_names(model.metadata_transform)
    empty = [names[j] for j in np.flatnonzero(~good.any(axis=0))]
    raise ModelError(f'the training split has no value of the metadata columns {empty}')
  low = np.where(good, values, np.inf).min(axis=0)
  high = np.where(good, values, -np.inf).max(axis=0)
  fill = np.where(np.arange(N_METADATA) == 0, low, high)  # parallax: smallest; magnitudes: faintest
  filled = np.where(good, values, fill)
  std = filled.std(axis=0)
  return model.clone(metadata_fill=tuple(map(float, fill)),
                     metadata_mean=tuple(map(float, filled.mean(axis=0))),
                     metadata_std=tuple(map(float, np.where(std > 0, std, 1.0))))


def _from_torch(arrays: Mapping[str, np.ndarray]) -> tuple[APOGEENet2, dict[str, Any]]:
  model = APOGEENet2()  # the authors' network: raw flux, their metadata constants
  return model, {'params': params_from_torch(arrays, model)}


FAMILY = register(Family(
    name='apogee_net_2', module=APOGEENet2,
    inputs={'flux': (N_PIXELS,), 'metadata': (N_METADATA,)}, noisy_inputs=('flux', 'metadata'),
    label_space=LabelSpace(LABEL_NAMES, log10=('TEFF',)),
    description='APOGEE Net II (Sprague et al. 2022): spectrum + Gaia/2MASS photometry, log10 Teff',
    # Net I's keys and the metadata MLP's: a superset, so detection prefers Net II.
    torch_keys=frozenset({'conv1.weight', 'conv12.weight', 'fc3.weight', 'metadata.l1.weight',
                          'metadata.l5.weight'}),
    from_torch=_from_torch, authors_labels=AUTHORS_LABELS, fit_inputs=fit_metadata))
