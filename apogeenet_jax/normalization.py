"""Target standardisation (paper §3.1, Table 1): z = (x − μ) / σ per label, μ, σ from training.

Label order everywhere in this package is (log g, Teff, [Fe/H]) with Teff linear in K, as in
the authors' released code.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from apogeenet_jax.constants import LABEL_NAMES

LN10 = float(np.log(10.0))


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """The labels a network predicts (before standardisation) and the catalogue's.

  names: the catalogue's label names, in the network's output order.
  log10: the names predicted as log10 of the catalogue's value (APOGEE Net II/III: 'TEFF').
  """
  names: tuple[str, ...] = LABEL_NAMES
  log10: tuple[str, ...] = ()

  def __post_init__(self):
    unknown = set(self.log10) - set(self.names)
    if unknown:
      raise ValueError(f'log10 labels {sorted(unknown)} are not among {self.names}')

  @property
  def name(self) -> str:
    """'linear' (every label in the catalogue's units) or e.g. 'log_teff'."""
    return '_'.join(['log', *(n.lower() for n in self.log10)]) if self.log10 else 'linear'

  def mask(self) -> np.ndarray:
    return np.asarray([n in self.log10 for n in self.names], bool)

  def from_catalogue(self, labels) -> np.ndarray:
    """(n, k) labels in catalogue units → this space (unchanged when no label is log10)."""
    if not self.log10:
      return np.asarray(labels)
    labels = np.asarray(labels, np.float64)
    with np.errstate(divide='ignore', invalid='ignore'):
      return np.where(self.mask(), np.log10(labels), labels)

  def to_catalogue(self, values) -> np.ndarray:
    """(n, k) values in this space → catalogue units (float64)."""
    values = np.asarray(values, np.float64)
    return np.where(self.mask(), 10.0 ** values, values) if self.log10 else values

  def sigma_from_catalogue(self, values, sigma) -> np.ndarray:
    """The inverse of ``sigma_to_catalogue``: a catalogue σ at ``values`` (this space) → this
    space (σ_log10 x = σ_x / (x · ln 10))."""
    sigma = np.asarray(sigma, np.float64)
    if not self.log10:
      return sigma
    return np.where(self.mask(), sigma / (self.to_catalogue(values) * LN10), sigma)

  def sigma_to_catalogue(self, values, sigma) -> np.ndarray:
    """A spread in this space at ``values`` (this space) → catalogue units: σ_x = x · ln 10 ·
    σ_log10 x for a log10 label (first order), unchanged otherwise."""
    sigma = np.asarray(sigma, np.float64)
    if not self.log10:
      return sigma
    return np.where(self.mask(), self.to_catalogue(values) * LN10 * sigma, sigma)


@dataclasses.dataclass(frozen=True)
class Standardizer:
  """Per-label mean and standard deviation, each of shape (3,) in LABEL_NAMES order, in the
  label space ``space`` (default: every label in the catalogue's units)."""

  mean: np.ndarray
  std: np.ndarray
  space: LabelSpace = LabelSpace()

  def __post_init__(self):
    mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
    std = np.asarray(self.std, dtype=np.float64).reshape(-1)
    if mean.shape != std.shape:
      raise ValueError(f'mean {mean.shape} and std {std.shape} differ in shape')
    if not (np.all(np.isfinite(std)) and np.all(std > 0)):
      raise ValueError(f'std must be finite and positive, got {std}')
    object.__setattr__(self, 'mean', mean)
    object.__setattr__(self, 'std', std)

  @classmethod
  def fit(cls, labels: np.ndarray, space: LabelSpace = LabelSpace()) -> 'Standardizer':
    """μ, σ of training labels (n, 3) in catalogue units, taken in ``space``; σ is the
    population standard deviation."""
    labels = np.asarray(space.from_catalogue(labels), dtype=np.float64)
    if labels.ndim != 2 or len(labels) < 2:
      raise ValueError(f'need labels of shape (n >= 2, k), got {labels.shape}')
    return cls(mean=labels.mean(axis=0), std=labels.std(axis=0), space=space)

  def transform(self, labels):
    """Catalogue units → standardised in this label space (float32)."""
    return ((self.space.from_catalogue(labels) - self.mean) / self.std).astype(np.float32)

  def inverse(self, z):
    """Standardised → catalogue units (float64)."""
    return self.space.to_catalogue(self.inverse_in_space(z))

  def inverse_in_space(self, z):
    """Standardised → this label space (float64): log10 Teff for a log-Teff family."""
    return np.asarray(z, dtype=np.float64) * self.std + self.mean

  def inverse_scale(self, sigma_z):
    """A spread in standardised units → this label space's units (no shift)."""
    return np.asarray(sigma_z, dtype=np.float64) * self.std

  def inverse_sigma(self, z, sigma_z):
    """A spread in standardised units at the prediction z → catalogue units (a log10 label's
    through the exponent, ``LabelSpace.sigma_to_catalogue``)."""
    return self.space.sigma_to_catalogue(self.inverse_in_space(z), self.inverse_scale(sigma_z))

  def to_dict(self) -> dict[str, Any]:
    out = {'label_names': list(LABEL_NAMES), 'mean': self.mean.tolist(),
           'std': self.std.tolist()}
    if self.space.log10:  # Written only when used: older readers and metas stay as they were.
      out['log10_labels'] = list(self.space.log10)
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Standardizer':
    names: Sequence[str] = tuple(d.get('label_names', LABEL_NAMES))
    if tuple(names) != LABEL_NAMES:
      raise ValueError(f'label order {names} is not {LABEL_NAMES}')
    return cls(mean=np.asarray(d['mean']), std=np.asarray(d['std']),
               space=LabelSpace(LABEL_NAMES, tuple(d.get('log10_labels', ()))))


# The authors' released values (docs/paper_facts.md, "Released code"; Table 1 rounds them to 2.88/1.16, 4716.92/733.01,
# −0.22/0.30).
PAPER_STANDARDIZER = Standardizer(
    mean=np.array([2.880541250669337, 4716.915128138449, -0.22329606176144642]),
    std=np.array([1.1648147820369943, 733.0099523547299, 0.3004270650813916]),
)
