"""Paths: local and object storage (gs://) through etils.epath.

No real bucket here: ``fake_gcs`` (tests/fake_gcs.py) serves gs:// in-process, to etils.epath
through fsspec and to TensorStore (orbax's arrays) over a local HTTP JSON API. Training on a
gs:// workdir is tested in test_training.py.
"""

import gc
import os
import pathlib

import fake_gcs as fake_gcs_lib
import pytest
from etils import epath

from apogeenet_jax import checkpoint, file_io, labels, metric_writer


@pytest.fixture
def fake_gcs():
  with fake_gcs_lib.installed() as fs:
    yield fs


def test_atomic_path_gs_uploads_once_and_never_half(fake_gcs):
  target = 'gs://bucket/run/catalog.csv'
  with file_io.atomic_path(target) as tmp:
    assert not file_io.is_remote(tmp)  # writers (astropy, matplotlib) get a local file
    with open(tmp, 'w') as f:
      f.write('old\n')
  assert epath.Path(target).read_text() == 'old\n'
  assert fake_gcs.uploads == 1
  with pytest.raises(RuntimeError, match='writer died'), file_io.atomic_path(target) as tmp:
    with open(tmp, 'w') as f:
      f.write('half')
    raise RuntimeError('writer died')
  assert epath.Path(target).read_text() == 'old\n' and fake_gcs.uploads == 1
  fake_gcs.fail_after_bytes = 3
  with pytest.raises(ConnectionError), file_io.atomic_path(target) as tmp:
    with open(tmp, 'w') as f:
      f.write('new contents\n')
  gc.collect()  # An upload that was merely dropped would commit its bytes when collected.
  assert epath.Path(target).read_text() == 'old\n'  # The broken upload was discarded.
  assert [p.name for p in epath.Path('gs://bucket/run').iterdir()] == ['catalog.csv']


def test_atomic_path_local_accepts_epath_and_pathlike(tmp_path):
  for target in (epath.Path(tmp_path) / 'a.txt', tmp_path / 'b.txt', str(tmp_path / 'c.txt')):
    with file_io.atomic_path(target) as tmp, open(tmp, 'w') as f:
      f.write('x')
    assert epath.Path(target).read_text() == 'x'
  assert sorted(os.listdir(tmp_path)) == ['a.txt', 'b.txt', 'c.txt']  # no temporary left


def test_metric_writer_on_gs(fake_gcs):
  workdir = 'gs://bucket/run'
  writer = metric_writer.MetricWriter(workdir, tensorboard=False)
  for step in (4, 8, 12):
    writer.write_scalars(step, {'dev_loss': 1.0 / step})
  assert [r['step'] for r in metric_writer.read_metrics(workdir)] == [4, 8, 12]
  assert writer.discard_after(8) == 1
  assert [r['step'] for r in metric_writer.read_metrics(workdir)] == [4, 8]
  writer.write_scalars(12, {'dev_loss': 0.5})
  records = metric_writer.read_metrics(epath.Path(workdir))
  assert [r['step'] for r in records] == [4, 8, 12] and records[-1]['dev_loss'] == 0.5


def test_skip_report_on_gs(fake_gcs):
  problems = [labels.Problem('a/apStar-r8-2M1.fits', '2M1', 'truncated, "quoted", a,b')]
  labels.write_problems(problems, 'gs://bucket/data/skipped.csv')
  assert labels.read_problems('gs://bucket/data/skipped.csv') == problems


def test_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
  assert os.fspath(checkpoint.workdir_checkpoints('gs://bucket/run')) == 'gs://bucket/run/checkpoints'
  monkeypatch.chdir(tmp_path)
  assert os.fspath(checkpoint.workdir_checkpoints('run')) == str(tmp_path / 'run' / 'checkpoints')
  assert file_io.as_path('~/x') == epath.Path(os.path.expanduser('~/x'))
  assert file_io.is_remote('gs://b/x') and file_io.is_remote(epath.Path('s3://b/x'))
  assert not file_io.is_remote(tmp_path) and not file_io.is_remote('rel/gs:/x')


def test_outputs_never_replace_a_device_node_or_a_fifo(tmp_path):
  """A staged move or an atomic write over /dev/full (or any non-regular file) is refused with
  nothing moved: run as root, os.replace would swap the device node for a file."""
  import stat as stat_lib

  fifo = tmp_path / 'labels.fits'
  os.mkfifo(fifo)
  with pytest.raises(file_io.StagedOutputError, match=r'named pipe.*not a regular file'):
    with file_io.staged_outputs(tmp_path) as stage:
      (stage / 'labels.fits').write_bytes(b'fits')
      (stage / 'labels_report.csv').write_text('report')
  assert stat_lib.S_ISFIFO(os.stat(fifo).st_mode)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['labels.fits']  # no report moved
  with pytest.raises(file_io.StagedOutputError, match=r'not a regular file'):
    with file_io.atomic_path(fifo) as tmp:
      pathlib.Path(tmp).write_bytes(b'fits')
  assert stat_lib.S_ISFIFO(os.stat(fifo).st_mode)
  with pytest.raises(file_io.StagedOutputError, match=r'character device'):
    with file_io.atomic_path('/dev/full'):
      pass
