"""Metric writer: one JSON line per record in WORKDIR/metrics.jsonl plus TensorBoard summaries.

tensorboardX writes event files without TensorFlow (clu.metric_writers would import it). NumPy and
the standard library only, plus ``etils.epath``: the workdir may be local or on object storage
(gs://…). Object stores cannot append, so there each record rewrites the (small) file in one
upload through ``file_io.atomic_path``; locally the record is appended. TensorBoard's event file
on object storage goes the same way (``_EpathEventFile``), instead of tensorboardX's own gs://
writer, which would need google-cloud-storage and bypass etils.epath.
"""

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from absl import logging

from apogeenet_jax import file_io

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


class _EpathEventFile:
  """A tensorboardX event file on object storage: kept in memory, and written whole through
  ``file_io.atomic_path`` (one upload) at every flush, as objects cannot be appended to.
  tensorboardX calls it from its one writer thread."""

  def __init__(self, path: str):
    self._path = file_io.as_path(path)
    self._data = bytearray()

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    with file_io.atomic_path(self._path) as tmp, open(tmp, 'wb') as f:
      f.write(self._data)

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX's writer factory interface (``record_writer.register_writer_factory``)."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # Object stores need no folders before their objects.


def _jsonable(v: Any) -> Any:
  v = float(v) if not isinstance(v, int | str | bool) else v
  # JSON has no NaN/inf; keep them readable rather than invalid.
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricWriter:
  """Appends scalars to ``metrics.jsonl`` and to TensorBoard (tensorboardX).

  Only the main process (``enabled=True``) writes; on a resume the JSON-lines file is appended to.
  """

  def __init__(self, workdir: file_io.PathLike, *, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    workdir = file_io.as_path(workdir)
    self.path = workdir / METRICS_FILE
    self._tb = None
    if not enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    if tensorboard:
      # Imported here: tensorboardX imports torch whenever torch is installed (1-2 s), which
      # no module of this package may do at import.
      from tensorboardX import SummaryWriter, record_writer
      logdir = os.fspath(workdir / TENSORBOARD_DIR)
      if file_io.is_remote(logdir):
        record_writer.register_writer_factory(logdir.split(':')[0], _EpathEventFiles())
      self._tb = SummaryWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time(),
              **{k: _jsonable(v) for k, v in scalars.items()}}
    line = json.dumps(record) + '\n'
    if file_io.is_remote(self.path):
      old = self.path.read_text() if self.path.exists() else ''
      with file_io.atomic_path(self.path) as tmp, open(tmp, 'w') as f:
        f.write(old + line)
    else:
      with open(self.path, 'a') as f:
        f.write(line)
    if self._tb is not None:
      for k, v in scalars.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def discard_after(self, step: int | None) -> int:
    """Drops the records of steps after ``step`` (all when None): the run resumes from ``step``.

    Rows are written before their checkpoint, so a kill between the two leaves a row whose
    epoch the resumed run does again; dropping it keeps every epoch exactly once. Returns the
    number of records dropped.
    """
    if not self.enabled or not self.path.exists():
      return 0
    records = read_metrics(self.path.parent)
    keep = [r for r in records if step is not None and int(r['step']) <= step]
    if len(keep) == len(records):
      return 0
    with file_io.atomic_path(self.path) as tmp, open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in keep)
    logging.info('%s: dropped %d record(s) after step %s, the step this run resumes from.',
                 self.path, len(records) - len(keep), step)
    return len(records) - len(keep)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: file_io.PathLike) -> list[dict[str, Any]]:
  """All records of ``WORKDIR/metrics.jsonl`` (empty when absent)."""
  path = file_io.as_path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
