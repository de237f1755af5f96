"""The paper's PyTorch APOGEE Net (Appendix B), the reference for parity tests and benchmarks,
and APOGEE Net II's (Sprague et al. 2022; the layout of the authors' hutchresearch/ApogeeNet2).

Transcribed from Olney et al. 2020, Appendix B (the extraction's typos fixed: ``super().__init__``,
``num_flat_features``). Test and benchmark support: nothing in the package imports this module,
and importing it does not import torch — the class is built on first access of
``torch_reference.TorchAPOGEENet`` (or ``TorchAPOGEENet2``), which needs the optional ``torch``
extra. Neither class shares code with the Flax modules: they are the independent side of the parity
tests. It lives in ``models/`` with the networks it checks, but is not a registered family.
"""

import functools


def __getattr__(name: str):
  if name == 'TorchAPOGEENet':
    return _torch_apogeenet()
  if name == 'TorchAPOGEENet2':
    return _torch_apogeenet2()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


@functools.cache
def _torch_apogeenet() -> type:
  """Defines the torch module class (torch is imported here, not at module import)."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  class TorchAPOGEENet(nn.Module):
    """Appendix B verbatim: 12 Conv1d + 3 Linear, the state_dict the authors released."""

    def __init__(self, num_layers: int = 1, num_targets: int = 3, drop_p: float = 0.0):
      super().__init__()
      self.conv1 = nn.Conv1d(num_layers, 8, 3, padding=1)
      self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
      self.conv3 = nn.Conv1d(8, 16, 3, padding=1)
      self.conv4 = nn.Conv1d(16, 16, 3, padding=1)
      self.conv5 = nn.Conv1d(16, 16, 3, padding=1)
      self.conv6 = nn.Conv1d(16, 16, 3, padding=1)
      self.conv7 = nn.Conv1d(16, 32, 3, padding=1)
      self.conv8 = nn.Conv1d(32, 32, 3, padding=1)
      self.conv9 = nn.Conv1d(32, 32, 3, padding=1)
      self.conv10 = nn.Conv1d(32, 32, 3, padding=1)
      self.conv11 = nn.Conv1d(32, 64, 3, padding=1)
      self.conv12 = nn.Conv1d(64, 64, 3, padding=1)
      self.fc1 = nn.Linear(64 * 133 * 1, 512)
      self.fc1_dropout = nn.Dropout(p=drop_p)
      self.fc2 = nn.Linear(512, 512)
      self.fc3 = nn.Linear(512, num_targets)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
      """x (batch, 1, 8575) → (batch, 64, 133): Appendix B's conv stack (Net II reuses it)."""
      x = F.max_pool1d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
      x = F.max_pool1d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
      x = F.max_pool1d(F.relu(self.conv6(F.relu(self.conv5(x)))), 2)
      x = F.max_pool1d(F.relu(self.conv8(F.relu(self.conv7(x)))), 2)
      x = F.max_pool1d(F.relu(self.conv10(F.relu(self.conv9(x)))), 2)
      x = F.max_pool1d(F.relu(self.conv12(F.relu(self.conv11(x)))), 2)
      return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      """x (batch, 1, 8575) raw flux → (batch, 3) standardised (log g, Teff, [Fe/H])."""
      x = self.conv_features(x)
      x = x.view(-1, self.num_flat_features(x))
      x = F.relu(self.fc1_dropout(self.fc1(x)))
      x = F.relu(self.fc1_dropout(self.fc2(x)))
      return self.fc3(x)

    @staticmethod
    def num_flat_features(x: torch.Tensor) -> int:
      n = 1
      for s in x.size()[1:]:
        n *= s
      return n

  return TorchAPOGEENet


# The authors' metadata preparation (their dataset code), per column of [parallax, G, BP, RP, J, H,
# K]: a value ≥ 98 or non-finite is replaced, then z-scored.
_NET2_FILL = (-84.82700, 21.40844, 24.53892, 20.26276, 18.43900, 24.00000, 17.02500)
_NET2_MEAN = (-0.6959113178296891, 13.630030428758845, 14.5224418320574, 12.832448427460813,
              11.537019017423619, 10.858717523536697, 10.702106344460235)
_NET2_STD = (14.572430555504504, 2.2762944923233883, 2.8342029214199704, 2.136884367623457,
             1.6793628207779732, 1.4888102872755238, 1.5848713221149886)


@functools.cache
def _torch_apogeenet2() -> type:
  """APOGEE Net II in torch: Net I's convs (the same class body), the metadata MLP, fc1 on both."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  class MetadataNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.l1, self.l2, self.l3 = nn.Linear(7, 8), nn.Linear(8, 16), nn.Linear(16, 32)
      self.l4, self.l5 = nn.Linear(32, 32), nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      for layer in (self.l1, self.l2, self.l3, self.l4, self.l5):
        x = F.relu(layer(x))
      return x

  class TorchAPOGEENet2(_torch_apogeenet()):
    """State-dict keys conv1…conv12, metadata.l1…l5, fc1…fc3 (fc1: 64·133 + 64 inputs)."""

    def __init__(self, num_targets: int = 3, drop_p: float = 0.0):
      super().__init__(num_targets=num_targets, drop_p=drop_p)
      self.metadata = MetadataNet()
      self.fc1 = nn.Linear(64 * 133 + 64, 512)

    @staticmethod
    def prepare_metadata(m: torch.Tensor) -> torch.Tensor:
      """Raw (batch, 7) → the authors' normalised metadata (computed in float64, as they do)."""
      m = m.double()
      fill = torch.tensor(_NET2_FILL, dtype=torch.float64).expand_as(m)
      m = torch.where(m < 98, m, fill)
      m = torch.where(torch.isfinite(m), m, fill)
      mean, std = (torch.tensor(v, dtype=torch.float64) for v in (_NET2_MEAN, _NET2_STD))
      return ((m - mean) / std).float()

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
      """x (batch, 1, 8575) raw flux, m (batch, 7) RAW metadata → (batch, 3) standardised
      (log g, log10 Teff, [Fe/H])."""
      x = self.conv_features(x)
      x = torch.hstack((x.flatten(1), self.metadata(self.prepare_metadata(m))))
      x = F.relu(self.fc1_dropout(self.fc1(x)))
      x = F.relu(self.fc1_dropout(self.fc2(x)))
      return self.fc3(x)

  return TorchAPOGEENet2
