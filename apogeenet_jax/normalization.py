"""Target standardisation (paper §3.1, Table 1): z = (x − μ) / σ per label, μ, σ from training.

Label order everywhere in this package is (log g, Teff, [Fe/H]) with Teff linear in K, as in
the authors' released code.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from apogeenet_jax.constants import LABEL_NAMES


@dataclasses.dataclass(frozen=True)
class Standardizer:
  """Per-label mean and standard deviation, each of shape (3,) in LABEL_NAMES order."""

  mean: np.ndarray
  std: np.ndarray

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
  def fit(cls, labels: np.ndarray) -> 'Standardizer':
    """μ, σ of training labels (n, 3); σ is the population standard deviation."""
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or len(labels) < 2:
      raise ValueError(f'need labels of shape (n >= 2, k), got {labels.shape}')
    return cls(mean=labels.mean(axis=0), std=labels.std(axis=0))

  def transform(self, labels):
    """Native units → standardised (float32)."""
    return ((np.asarray(labels) - self.mean) / self.std).astype(np.float32)

  def inverse(self, z):
    """Standardised → native units (float64)."""
    return np.asarray(z, dtype=np.float64) * self.std + self.mean

  def inverse_scale(self, sigma_z):
    """A spread in standardised units → native units (no shift)."""
    return np.asarray(sigma_z, dtype=np.float64) * self.std

  def to_dict(self) -> dict[str, Any]:
    return {'label_names': list(LABEL_NAMES), 'mean': self.mean.tolist(),
            'std': self.std.tolist()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Standardizer':
    names: Sequence[str] = tuple(d.get('label_names', LABEL_NAMES))
    if tuple(names) != LABEL_NAMES:
      raise ValueError(f'label order {names} is not {LABEL_NAMES}')
    return cls(mean=np.asarray(d['mean']), std=np.asarray(d['std']))


# The authors' released values (docs/paper_facts.md, "Released code"; Table 1 rounds them to 2.88/1.16, 4716.92/733.01,
# −0.22/0.30).
PAPER_STANDARDIZER = Standardizer(
    mean=np.array([2.880541250669337, 4716.915128138449, -0.22329606176144642]),
    std=np.array([1.1648147820369943, 733.0099523547299, 0.3004270650813916]),
)
