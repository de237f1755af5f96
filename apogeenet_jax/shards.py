"""Survey-scale prediction in shards: the part file of one shard, and the merge of all parts into one
run whose catalogue equals a one-shard run's bit for bit.

Each input is cut into contiguous runs of whole batches, one per ``prediction.Shard``. Under
``jax.distributed`` each process predicts shard ``process_index`` on its own devices (no collective
inside the prediction), the parts go to process 0 through ``multihost_utils.process_allgather``
(``gather_parts``). Without it (``--shard_index/--num_shards`` on a batch scheduler) each run
writes its part file (``part-00001-of-00003.npz``) and ``evaluation.merge`` reads them all. A part
carries the run header (``run_header``); a merge refuses parts of different runs or gaps.
"""

import dataclasses
import fnmatch
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from apogeenet_jax import checkpoint, input_pipeline
from apogeenet_jax.prediction import EvaluationError, Shard
from apogeenet_jax.uncertainty import MCSettings

PART_NAME = 'part-{index:05d}-of-{count:05d}.npz'


PART_GLOB = 'part-*-of-*.npz'


_PART_FORMAT = 1


def run_header(meta: Mapping[str, Any], settings: MCSettings, cal: Mapping[str, Any] | None,
                *, sources, splits: Sequence[str], apstar: bool, batch_size: int, shard: Shard
                ) -> dict[str, Any]:
  """What the catalogue and metrics need besides the per-star arrays; JSON, equal in all parts.

  'inputs' (name, number of stars, digest of the apStar file list or the build's input
  fingerprint: ``_digest``) lets a merge refuse parts that saw other inputs (another folder
  listing, another build of the data set, even with equal split sizes).
  """
  standardizer = checkpoint.standardizer_from_meta(meta)
  # The σ settings as one dict (``MCSettings.record``: 'mc' counts the draws actually made).
  run = {'checkpoint': str(meta.get('checkpoint_dir', '')), 'step': meta.get('step'),
         **settings.record(), 'ensemble': checkpoint.ensemble_size(meta)}
  # Without 'path': only the process that stored the calibration knows it, the rest agree.
  cal = None if cal is None else {k: v for k, v in cal.items() if k != 'path'}
  header = {'format': _PART_FORMAT, 'run': run, 'calibration': cal,
            'splits': list(splits), 'apstar': bool(apstar), 'batch_size': int(batch_size),
            'label_mean': standardizer.mean.tolist(), 'label_std': standardizer.std.tolist(),
            'inputs': [[name, len(source), _digest(source)] for name, _, source in sources],
            'shard': dataclasses.asdict(shard)}
  if standardizer.space.log10:  # μ, σ of log10 Teff (Nets II, III); absent: the catalogue's units
    header['label_log10'] = list(standardizer.space.log10)
  return header


def _digest(source) -> str:
  """What identifies an input: the apStar file list, or for a split of the built data set the
  build's input fingerprint (catalogue bytes, split seed, each file's size and mtime), so parts
  of two builds of the same stars with other labels are told apart."""
  if isinstance(source, input_pipeline.ApStarFiles):
    return hashlib.sha256('\n'.join(source.paths).encode()).hexdigest()[:16]
  info = getattr(source, 'dataset_info', None)
  metadata = getattr(info, 'metadata', None) or {}
  return str(metadata.get('input_fingerprint', ''))[:16]


def part_bytes(part: Mapping[str, np.ndarray], header: Mapping[str, Any]) -> bytes:
  buffer = io.BytesIO()
  # Prefixed names: a field called 'file' would clash with savez's own argument.
  np.savez(buffer, header=np.asarray(json.dumps(header)),
           **{f'star_{k}': v for k, v in part.items()})
  return buffer.getvalue()


def read_part(data: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      header = json.loads(str(z['header']))
      part = {k.removeprefix('star_'): z[k] for k in z.files if k.startswith('star_')}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    # A truncated or damaged file: BadZipFile names no file by itself.
    raise EvaluationError(f'{where}: not a part file of evaluate.py, or a damaged one '
                          f'({type(e).__name__}: {e}); rerun its shard') from e
  if header.get('format') != _PART_FORMAT:
    raise EvaluationError(f'{where}: part format {header.get("format")}, expected '
                          f'{_PART_FORMAT}')
  return part, header


def gather_parts(data: bytes) -> list[bytes] | None:
  """Every process's part (bytes) on process 0, in process order; None on the others."""
  from jax.experimental import multihost_utils  # Only multi-process runs need it.
  mine = np.frombuffer(data, np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(mine)))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(mine)] = mine
  everything = np.asarray(multihost_utils.process_allgather(padded))
  if jax.process_index() != 0:
    return None
  return [everything[k, :sizes[k]].tobytes() for k in range(len(sizes))]


def merge_parts(parts: Sequence[tuple[dict[str, np.ndarray], dict[str, Any]]]
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The parts of one sharded run, in star order: each input's rows, shard after shard."""
  header, ordered = _check_parts(parts)
  inputs = [*header['splits'], *([''] if header['apstar'] else [])]
  merged = {k: np.concatenate([p[k][p['data_set'] == name] for name in inputs for p in ordered])
            for k in ordered[0] if k != 'problems'}
  merged['problems'] = np.concatenate([p['problems'] for p in ordered])
  return merged, header


def _check_parts(parts: Sequence[tuple[dict[str, np.ndarray], dict[str, Any]]]
                 ) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
  """(the run's header, the parts in shard order); refuses parts of different runs or gaps."""
  headers = [{k: v for k, v in h.items() if k != 'shard'} for _, h in parts]
  shards = [h['shard'] for _, h in parts]
  for h, shard in zip(headers, shards, strict=True):
    differ = sorted(k for k in {*h, *headers[0]} if h.get(k) != headers[0].get(k))
    if shard['count'] != shards[0]['count']:
      differ.append('shard count')
    if differ:
      raise EvaluationError(f'the parts come from different runs: {", ".join(differ)} differ '
                            f'(shard {shards[0]} vs {shard})')
  count = shards[0]['count']
  indices = sorted(s['index'] for s in shards)
  if indices != list(range(count)):
    raise EvaluationError(f'expected parts 0–{count - 1} of {count} once each, got shards '
                          f'{indices}')
  by_index = {s['index']: part for (part, _), s in zip(parts, shards, strict=True)}
  return headers[0], [by_index[k] for k in range(count)]


def find_parts(paths: Sequence[str | epath.PathLike]) -> list[epath.Path]:
  found = []
  for path in map(epath.Path, paths):
    # iterdir + fnmatch: a listing every epath backend has (glob mangled gs:// names in a test).
    found += (sorted(p for p in path.iterdir() if fnmatch.fnmatch(p.name, PART_GLOB))
              if path.is_dir() else [path])
  if not found:
    raise EvaluationError(f'no {PART_GLOB} files in {", ".join(map(str, paths))}')
  return found


def part_name(shard: Shard) -> str:
  """The file name of ``shard``'s part: ``PART_NAME``."""
  return PART_NAME.format(index=shard.index, count=shard.count)
