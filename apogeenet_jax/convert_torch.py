r"""Import the authors' PyTorch APOGEE Net weights into an orbax checkpoint.

    python -m apogeenet_jax.convert_torch --state_dict=model.pt --output=/abs/or/rel/ckpt_dir

The input is an APOGEE Net I ``state_dict`` (paper Appendix B: keys conv1.weight … conv12.bias,
fc1.weight … fc3.bias). PyTorch → Flax layouts:
  Conv1d weight (out, in, k) → kernel (k, in, out);  Linear weight (out, in) → kernel (in, out).
fc1 needs no row permutation because ``APOGEENet`` flattens channel-major, as PyTorch does.
The checkpoint carries the normalisation (the authors' μ, σ by default) and the model config, so
``evaluate.py --checkpoint=DIR`` loads it like any trained checkpoint.
"""

import itertools
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags, logging

from apogeenet_jax import checkpoint, file_io
from apogeenet_jax.models.apogee_net import APOGEENet
from apogeenet_jax.normalization import PAPER_STANDARDIZER, Standardizer

_LAYER = re.compile(r'^(conv|fc)(\d+)\.(weight|bias)$')


class ConversionError(ValueError):
  """The state_dict does not match the APOGEE Net architecture."""


def expected_torch_shapes(model: APOGEENet) -> dict[str, tuple[int, ...]]:
  """The state_dict keys and shapes of the PyTorch model that ``model`` mirrors."""
  shapes, c_in = {}, 1
  for i, c_out in enumerate(model.channels, start=1):
    shapes[f'conv{i}.weight'], shapes[f'conv{i}.bias'] = (c_out, c_in, 3), (c_out,)
    c_in = c_out
  length = model.input_length
  for _ in range(len(model.channels) // 2):
    length //= 2
  widths = [c_in * length, *model.hidden, model.num_targets]
  for i, (w_in, w_out) in enumerate(itertools.pairwise(widths), start=1):
    shapes[f'fc{i}.weight'], shapes[f'fc{i}.bias'] = (w_out, w_in), (w_out,)
  return shapes


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops a common 'module.' / 'model.' prefix (DataParallel or wrapper modules)."""
  out = dict(state_dict)
  for prefix in ('module.', 'model.'):
    if out and all(k.startswith(prefix) for k in out):
      out = {k[len(prefix):]: v for k, v in out.items()}
  return out


def torch_to_flax_params(state_dict: Mapping[str, Any], model: APOGEENet | None = None
                         ) -> dict[str, Any]:
  """A PyTorch APOGEE Net state_dict (tensors or arrays) → Flax params for ``model``.

  Raises ConversionError listing every missing, unexpected or mis-shaped key.
  """
  model = model or APOGEENet()
  arrays = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v,
                          dtype=np.float32)
            for k, v in _strip_prefix(state_dict).items()}
  expected = expected_torch_shapes(model)
  problems = []
  if missing := sorted(set(expected) - set(arrays)):
    problems.append(f'missing keys: {missing}')
  if unexpected := sorted(set(arrays) - set(expected)):
    problems.append(f'unexpected keys: {unexpected}')
  problems += [f'{k}: shape {arrays[k].shape}, expected {s}' for k, s in expected.items()
               if k in arrays and arrays[k].shape != s]
  if problems:
    raise ConversionError('state_dict does not match APOGEE Net (Appendix B): '
                          + '; '.join(problems))
  params: dict[str, dict[str, np.ndarray]] = {}
  for key, value in arrays.items():
    kind, index, what = _LAYER.match(key).groups()
    layer = params.setdefault(f'{kind}{index}', {})
    if what == 'bias':
      layer['bias'] = value
    elif kind == 'conv':
      layer['kernel'] = np.ascontiguousarray(value.transpose(2, 1, 0))  # (out,in,k) → (k,in,out)
    else:
      layer['kernel'] = np.ascontiguousarray(value.T)  # (out, in) → (in, out)
  return params


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
            standardizer: Standardizer = PAPER_STANDARDIZER) -> str:
  """Converts ``state_dict_path`` into a checkpoint directory (local or gs://…); returns its
  absolute path."""
  output_dir = file_io.as_path(output_dir)
  if output_dir.is_dir() and any(output_dir.iterdir()):
    raise FileExistsError(f'{output_dir}: exists and is not empty; choose a new --output')
  model = APOGEENet()
  try:
    params = torch_to_flax_params(load_state_dict(state_dict_path), model)
  except ConversionError as e:
    raise ConversionError(f'{state_dict_path}: {e}') from None
  meta = checkpoint.make_meta(model, standardizer,
                              source=f'converted from PyTorch state_dict {state_dict_path}')
  manager = checkpoint.make_manager(output_dir)
  checkpoint.save(manager, 0, checkpoint.params_only(params), meta)
  manager.close()
  return os.fspath(output_dir)


_STATE_DICT = flags.DEFINE_string('state_dict', None, 'PyTorch APOGEE Net state_dict (.pt).')
_OUTPUT = flags.DEFINE_string('output', None, 'New checkpoint directory to write.')


def main(argv):
  del argv
  out = convert(_STATE_DICT.value, _OUTPUT.value)
  logging.info('Wrote checkpoint %s (normalisation: the authors\' μ, σ; paper Table 1)', out)
  print(f'Checkpoint written to {out}\nPredict with: python evaluate.py --checkpoint={out} ...')


def run():
  flags.mark_flags_as_required(['state_dict', 'output'])
  app.run(main)


if __name__ == '__main__':
  run()
