"""Paths: local and object storage (gs://) through etils.epath.

No real bucket here: ``fake_gcs`` registers an in-process fsspec filesystem for the 'gs'/'gcs'
protocols, which is what ``etils.epath`` uses for gs:// when TensorFlow is absent (its fsspec
backend calls ``fsspec.filesystem('gcs')``; gcsfs would be the real one). The fake behaves like
an object store where it matters: an object appears only when its upload completes (close), a
cancelled upload (discard) leaves the old object, and there is no append.
orbax is not covered: it writes array data through TensorStore's own GCS driver, not fsspec.
"""

import gc
import io
import os

import fsspec
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import known_implementations

from apogeenet_jax import checkpoint, file_io, labels, metric_writer


class _Upload(io.BytesIO):
  """A pending object: invisible until close; discard cancels it."""

  def __init__(self, fs, path):
    super().__init__()
    self.fs, self.path, self.cancelled = fs, path, False

  def discard(self):
    self.cancelled = True

  def close(self):
    if not self.closed and not self.cancelled:
      FakeGCS.uploads += 1
      self.fs.store[self.path] = fsspec.implementations.memory.MemoryFile(
          self.fs, self.path, self.getvalue())
    super().close()


class FakeGCS(MemoryFileSystem):
  protocol = ('gs', 'gcs')
  store: dict = {}  # noqa: RUF012 (fsspec's own convention)
  pseudo_dirs: list = ['']  # noqa: RUF012
  uploads = 0
  fail_after_bytes = None  # an upload that breaks after this many bytes

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    del finalize_on_close  # gcsfs's option, passed by etils
    super().__init__(*args, **kwargs)

  def _open(self, path, mode='rb', **kwargs):
    path = self._strip_protocol(path)
    if 'a' in mode:
      raise NotImplementedError('object storage has no append')
    if 'w' not in mode:
      return super()._open(path, mode, **kwargs)
    upload = _Upload(self, path)
    if self.fail_after_bytes is not None:
      limit, real_write = self.fail_after_bytes, upload.write

      def write(data):
        if upload.tell() + len(data) > limit:
          real_write(data[:max(limit - upload.tell(), 0)])
          raise ConnectionError('upload broke')
        return real_write(data)
      upload.write = write
    return upload


@pytest.fixture
def fake_gcs():
  saved = {p: fsspec.registry.get(p) for p in ('gs', 'gcs')}
  for protocol in ('gs', 'gcs'):
    fsspec.register_implementation(protocol, FakeGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  FakeGCS.store.clear()
  FakeGCS.uploads, FakeGCS.fail_after_bytes = 0, None
  if type(epath.Path('gs://b/x')._backend) is not type(epath_backend.fsspec_backend):
    pytest.skip('etils.epath uses TensorFlow for gs:// here (tensorflow is installed)')
  yield FakeGCS
  for protocol, cls in saved.items():
    # Back to what fsspec had: the class, or the lazy 'gcsfs.GCSFileSystem' name.
    fsspec.register_implementation(
        protocol, cls or known_implementations[protocol]['class'], clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  FakeGCS.store.clear()


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
  FakeGCS.fail_after_bytes = 3
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
