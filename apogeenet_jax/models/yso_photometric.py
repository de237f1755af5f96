"""The YSO photometric network of paper §2.4 as a registered family: photometry → (log age,
mass, A_V, log Teff, log g), the label network behind the YSO labels (``apogeenet_jax.yso_photometric``
trains it and makes the labels).

"A CNN with three convolutional layers using max pooling and two fully connected layers"; the
widths, kernel and input scaling are ours (the paper gives none): kernel 3 ('SAME'), a max-pool
of 2 after each conv (12 inputs → 6 → 3 → 1), channels (32, 64, 128), Dense 256 → ReLU → Dense 5.
"""

import flax.linen as nn
import jax.numpy as jnp

from apogeenet_jax.label_sources import isochrones
from apogeenet_jax.models import Family, LabelSpace, register
from apogeenet_jax.models.layers import max_pool2


class YSOPhotometricNet(nn.Module):
  """3 × (Conv1d k=3 + ReLU + max-pool 2) → Dense → ReLU → Dense(num_targets).

  Input ``features`` (batch, 12) scaled FEATURES (see ``isochrones.normalise_features``);
  output (batch, 5) standardised TARGETS.
  """
  channels: tuple[int, ...] = (32, 64, 128)
  hidden: int = 256
  num_targets: int = len(isochrones.TARGETS)
  dropout_rate: float = 0.0
  input_length: int = len(isochrones.FEATURES)

  @property
  def input_shapes(self) -> dict[str, tuple[int, ...]]:
    return {'features': (self.input_length,)}

  @nn.compact
  def __call__(self, features: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    x = features
    if x.ndim == 2:
      x = x[..., None]
    if x.shape[1:] != (self.input_length, 1):
      raise ValueError(f'YSOPhotometricNet expects (batch, {self.input_length}), got {x.shape}')
    for i, width in enumerate(self.channels):
      x = nn.relu(nn.Conv(width, kernel_size=(3,), padding='SAME', name=f'conv{i + 1}')(x))
      x = max_pool2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.hidden, name='fc1')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(x)
    return nn.Dense(self.num_targets, name='fc2')(x)


FAMILY = register(Family(
    name='yso_photometric', module=YSOPhotometricNet,
    inputs={'features': (len(isochrones.FEATURES),)}, noisy_inputs=(),
    label_space=LabelSpace(tuple(isochrones.TARGETS)),
    description='the YSO label network of §2.4: 12 photometric features → 5 isochrone targets'))
