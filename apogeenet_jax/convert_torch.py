r"""Import the authors' PyTorch APOGEE Net weights into an orbax checkpoint.

    python -m apogeenet_jax.convert_torch --state_dict=model.pt --output=/abs/or/rel/ckpt_dir

The input is the ``state_dict`` of a family that declares a PyTorch importer (``models.Family``:
``torch_keys``, ``from_torch``, ``authors_labels``), e.g. APOGEE Net I (paper Appendix B: keys
conv1.weight … conv12.bias, fc1.weight … fc3.bias); the family is detected from the keys, or
named with ``--family``. PyTorch → Flax layouts:
  Conv1d weight (out, in, k) → kernel (k, in, out);  Linear weight (out, in) → kernel (in, out).
The checkpoint carries the normalisation (the family's authors' μ, σ by default) and the model
config with the family's name, so ``evaluate.py --checkpoint=DIR`` loads it like any trained
checkpoint.
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags, logging

from apogeenet_jax import checkpoint, file_io, models
from apogeenet_jax.models import apogee_net
from apogeenet_jax.models.apogee_net import APOGEENet
from apogeenet_jax.normalization import Standardizer


class ConversionError(ValueError):
  """The state_dict does not match the family's architecture."""


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops a common 'module.' / 'model.' prefix (DataParallel or wrapper modules)."""
  out = dict(state_dict)
  for prefix in ('module.', 'model.'):
    if out and all(k.startswith(prefix) for k in out):
      out = {k[len(prefix):]: v for k, v in out.items()}
  return out


def state_dict_arrays(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A state_dict of tensors or arrays → float32 NumPy arrays, wrapper prefixes dropped."""
  return {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v,
                        dtype=np.float32)
          for k, v in _strip_prefix(state_dict).items()}


def torch_to_flax_params(state_dict: Mapping[str, Any], model: APOGEENet | None = None
                         ) -> dict[str, Any]:
  """A PyTorch APOGEE Net I state_dict (tensors or arrays) → Flax params for ``model``.

  Raises ConversionError listing every missing, unexpected or mis-shaped key.
  """
  try:
    return apogee_net.params_from_torch(state_dict_arrays(state_dict), model)
  except models.ModelError as e:
    raise ConversionError(str(e)) from None


def import_state_dict(state_dict: Mapping[str, Any], family: str | None = None
                      ) -> tuple[Any, dict[str, Any], Standardizer]:
  """(module, Flax variables, the authors' label normalisation) of a state_dict, its family
  detected from the keys (``models.family_of_state_dict``) unless named."""
  arrays = state_dict_arrays(state_dict)
  try:
    fam = models.get(family) if family else models.family_of_state_dict(arrays)
    if fam.from_torch is None:
      raise models.ModelError(f'family {fam.name!r} has no PyTorch importer')
    model, variables = fam.from_torch(arrays)
  except models.ModelError as e:
    raise ConversionError(str(e)) from None
  mean, std = fam.authors_labels
  return model, variables, Standardizer(mean=np.asarray(mean), std=np.asarray(std))


def load_state_dict(path: str) -> Mapping[str, Any]:
  """Reads a ``.pt`` file holding a state_dict (or a dict wrapping one under 'state_dict')."""
  try:
    import torch
  except ImportError as e:
    raise ImportError('reading a .pt file needs PyTorch: pip install "apogeenet-jax[torch]"') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for unreadable files
    raise ConversionError(f'{path}: not a readable PyTorch state_dict file ({e})') from e
  for key in ('state_dict', 'model_state_dict', 'model'):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path}: holds a {type(obj).__name__}, not a state_dict')
  return obj


def convert(state_dict_path: str, output_dir: file_io.PathLike,
            standardizer: Standardizer | None = None, family: str | None = None) -> str:
  """Converts ``state_dict_path`` into a checkpoint directory (local or gs://…); returns its
  absolute path. ``family``: None = detected from the keys; ``standardizer``: None = the
  authors' label μ, σ of that family."""
  output_dir = file_io.as_path(output_dir)
  if output_dir.is_dir() and any(output_dir.iterdir()):
    raise FileExistsError(f'{output_dir}: exists and is not empty; choose a new --output')
  try:
    model, variables, authors = import_state_dict(load_state_dict(state_dict_path), family)
  except ConversionError as e:
    raise ConversionError(f'{state_dict_path}: {e}') from None
  meta = checkpoint.make_meta(model, standardizer or authors,
                              source=f'converted from PyTorch state_dict {state_dict_path}')
  manager = checkpoint.make_manager(output_dir)
  model_state = {k: v for k, v in variables.items() if k != 'params'}  # batch norm's statistics
  checkpoint.save(manager, 0, checkpoint.params_only(variables['params'], model_state), meta)
  manager.close()
  return os.fspath(output_dir)


_STATE_DICT = flags.DEFINE_string('state_dict', None, 'PyTorch APOGEE Net state_dict (.pt).')
_OUTPUT = flags.DEFINE_string('output', None, 'New checkpoint directory to write.')
_FAMILY = flags.DEFINE_string('family', None, 'Model family of the state dict (default: detected '
                              'from its keys): ' + ', '.join(models.names()))


def main(argv):
  del argv
  out = convert(_STATE_DICT.value, _OUTPUT.value, family=_FAMILY.value)
  logging.info('Wrote checkpoint %s (normalisation: the authors\' μ, σ; paper Table 1)', out)
  print(f'Checkpoint written to {out}\nPredict with: python evaluate.py --checkpoint={out} ...')


def run():
  flags.mark_flags_as_required(['state_dict', 'output'])
  app.run(main)


if __name__ == '__main__':
  run()
