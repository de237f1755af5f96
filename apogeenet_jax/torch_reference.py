"""The paper's PyTorch APOGEE Net (Appendix B), the reference for parity tests and benchmarks.

Transcribed from Olney et al. 2020, Appendix B (the extraction's typos fixed: ``super().__init__``,
``num_flat_features``). Test and benchmark support: nothing in the package imports this module,
and importing it does not import torch — the class is built on first access of
``torch_reference.TorchAPOGEENet``, which needs the optional ``torch`` extra.
"""

import functools


def __getattr__(name: str):
  if name == 'TorchAPOGEENet':
    return _torch_apogeenet()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      """x (batch, 1, 8575) raw flux → (batch, 3) standardised (log g, Teff, [Fe/H])."""
      x = F.max_pool1d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
      x = F.max_pool1d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
      x = F.max_pool1d(F.relu(self.conv6(F.relu(self.conv5(x)))), 2)
      x = F.max_pool1d(F.relu(self.conv8(F.relu(self.conv7(x)))), 2)
      x = F.max_pool1d(F.relu(self.conv10(F.relu(self.conv9(x)))), 2)
      x = F.max_pool1d(F.relu(self.conv12(F.relu(self.conv11(x)))), 2)
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
