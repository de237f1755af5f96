"""Metric writer: one JSON line per record in WORKDIR/metrics.jsonl plus TensorBoard summaries.

tensorboardX writes event files without TensorFlow (clu.metric_writers would import it). NumPy and
the standard library only.
"""

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from absl import logging

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def _jsonable(v: Any) -> Any:
  v = float(v) if not isinstance(v, int | str | bool) else v
  # JSON has no NaN/inf; keep them readable rather than invalid.
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricWriter:
  """Appends scalars to ``metrics.jsonl`` and, when tensorboardX is importable, to TensorBoard.

  Only the main process (``enabled=True``) writes; on a resume the JSON-lines file is appended to.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
      except ImportError:
        logging.warning('tensorboardX is not installed: metrics go to %s only.', self.path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time(),
              **{k: _jsonable(v) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
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
    if not self.enabled or not os.path.exists(self.path):
      return 0
    records = read_metrics(os.path.dirname(self.path))
    keep = [r for r in records if step is not None and int(r['step']) <= step]
    if len(keep) == len(records):
      return 0
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in keep)
    os.replace(tmp, self.path)
    logging.info('%s: dropped %d record(s) after step %s, the step this run resumes from.',
                 self.path, len(records) - len(keep), step)
    return len(records) - len(keep)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of ``WORKDIR/metrics.jsonl`` (empty when absent)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
