"""File-writing helpers shared by every output: the catalogue, metrics, figures, reports.

Paths are ``str | os.PathLike | etils.epath.Path``: a local path, or a URL such as
``gs://bucket/run`` that ``etils.epath`` opens through fsspec (``pip install
'apogeenet-jax[gcs]'`` gives gcsfs for ``gs://``; orbax reads and writes checkpoints there
through TensorStore's own GCS driver).
"""

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike
# 'gs://…', 's3://…', 'memory://…': anything with a scheme is object storage, not a local path.
_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def is_remote(path: PathLike) -> bool:
  """True for a URL (gs://, s3://, …), False for a local path."""
  return bool(_URL.match(os.fspath(path)))


def as_path(path: PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``; a local one with ~ expanded and made absolute (orbax refuses
  relative directories), a URL unchanged."""
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.fspath(path)).expanduser().absolute()


def _umask() -> int:
  # Reading the umask means setting it for an instant; every file writer here creates its files
  # from the main thread, so no other file is created in between.
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
  """Yields a LOCAL temporary file name to write; ``path`` gets its contents only if the body
  succeeds, so a crash never leaves half a file where a good one stood.

  Locally: the temporary file sits beside ``path`` and ``os.replace`` moves it over ``path``
  (atomic on POSIX: a reader sees the old file or the new one).
  On object storage (gs://, s3://): objects have no rename, but one object upload is atomic —
  the object appears (or replaces the old one) when the upload completes, never partly written.
  The body writes a local temporary file, and after it succeeds that file is uploaded to
  ``path`` in one upload; a failed body uploads nothing, and an upload that fails midway is
  discarded (the old object stays). A reader may see the old or the new object, never a mix.
  """
  if is_remote(path):
    with _remote_atomic_path(epath.Path(path)) as tmp:
      yield tmp
    return
  path = os.fspath(as_path(path))
  if problem := _not_replaceable(path):
    raise StagedOutputError(problem)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp')
  os.close(fd)
  try:
    yield tmp
    # mkstemp's file is private (0600); the result must get the mode any file the user writes
    # gets (the umask's, or the mode of the file it replaces), so collaborators can read it.
    try:
      mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
      mode = 0o666 & ~_umask()
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def _remote_atomic_path(path: epath.Path) -> Iterator[str]:
  with tempfile.TemporaryDirectory(prefix='apogeenet-upload-') as local_dir:
    tmp = os.path.join(local_dir, path.name)
    yield tmp
    # No mkdir: object stores have no folders (and gcsfs would try to create a missing bucket).
    with open(tmp, 'rb') as src:
      dst = path.open('wb')
      if not hasattr(dst, 'write'):
        # etils' TensorFlow backend (used for gs:// when TensorFlow is installed) returns a
        # context manager around tf.io.gfile.GFile, which uploads the object on close.
        with dst as gfile:
          shutil.copyfileobj(src, gfile)
        return
      try:
        shutil.copyfileobj(src, dst)
      except BaseException:
        # fsspec's files commit on close, even after an error: cancel the upload instead.
        discard = getattr(dst, 'discard', None)
        if discard is not None:
          discard()
          # fsspec files also commit in __del__ unless marked closed.
          with contextlib.suppress(AttributeError):
            dst.closed = True
        raise
      dst.close()


_FILE_KINDS = ((stat.S_ISDIR, 'a directory'), (stat.S_ISCHR, 'a character device'),
               (stat.S_ISBLK, 'a block device'), (stat.S_ISFIFO, 'a named pipe (FIFO)'),
               (stat.S_ISSOCK, 'a socket'))


def special_file_kind(mode: int) -> str:
  """'a character device', 'a named pipe (FIFO)', … for an ``st_mode`` that is not a regular
  file ('' for a regular file)."""
  if stat.S_ISREG(mode):
    return ''
  return next((name for test, name in _FILE_KINDS if test(mode)), 'not a regular file')


def regular_file_problem(path: PathLike, max_bytes: int | None = None) -> str | None:
  """Why ``path`` must not be opened as an input, or None: it is missing, is not a regular file
  after following links (/dev/zero, a FIFO, a socket, a directory: reading them never ends or
  blocks), or is larger than ``max_bytes``. Only ``stat`` is called: nothing is opened. URLs
  (gs://…) are not checked here (None)."""
  if is_remote(path):
    return None
  try:
    info = os.stat(os.fspath(path))  # Follows symlinks: a link to /dev/zero is a device.
  except FileNotFoundError:
    return 'no such file' + (' (a broken link)' if os.path.islink(os.fspath(path)) else '')
  except OSError as e:
    return f'cannot stat ({type(e).__name__}: {e})'
  kind = special_file_kind(info.st_mode)
  if kind:
    return f'{kind}, not a regular file; only regular files are read'
  if max_bytes is not None and info.st_size > max_bytes:
    return f'{info.st_size} bytes, above the limit of {max_bytes} bytes for one file'
  return None


class StagedOutputError(OSError):
  """The outputs of a run cannot be moved into place (a folder or file is in the way)."""


def _files_below(root: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, name), root)
                for d, _, names in os.walk(root) for name in names)


def _not_replaceable(path: str) -> str | None:
  """Why an output must not replace what is at ``path`` (a device node such as /dev/full, a
  FIFO, a socket), or None: nothing there, or a regular file (links followed)."""
  try:
    kind = special_file_kind(os.stat(path).st_mode)
  except OSError:
    return None  # Nothing there (or a broken link): the output may go there.
  if kind and kind != 'a directory':
    return f'{path} is {kind}, not a regular file: an output never replaces one'
  return None


def _in_the_way(directory: epath.Path, relative: str) -> str | None:
  """Why ``directory / relative`` cannot receive a file (a folder there, a file above), or None."""
  target = directory / relative
  if target.is_dir():
    return f'{target} is a directory'
  if problem := _not_replaceable(os.fspath(target)):
    return problem
  for parent in target.parents:
    if parent == directory or len(str(parent)) < len(str(directory)):
      break
    if parent.exists() and not parent.is_dir():
      return f'{parent} is a file, not a directory'
  return None


@contextlib.contextmanager
def staged_outputs(directory: PathLike) -> Iterator[epath.Path]:
  """Yields an empty staging folder for ALL the outputs of one run; when the body succeeds, each
  file written below it moves to the same relative path under ``directory``. A body that fails
  (disk full, an unencodable name, a crash) leaves ``directory`` as it was: never half of one run
  beside half of another.

  Locally the staging folder is a hidden ``.staging-*`` folder inside ``directory`` (same file
  system: each move is an ``os.replace``), and every target is checked before the first move, so
  a folder in the way stops the run with nothing moved. On object storage the files are staged
  in a local temporary folder and uploaded one by one (each upload atomic, ``atomic_path``).
  Raises StagedOutputError naming the path in the way.
  """
  if is_remote(directory):
    remote = epath.Path(directory)
    with tempfile.TemporaryDirectory(prefix='apogeenet-stage-') as local:
      yield epath.Path(local)
      for relative in _files_below(local):
        with atomic_path(remote / relative) as tmp:
          shutil.copyfile(os.path.join(local, relative), tmp)
    return
  target = as_path(directory)
  target.mkdir(parents=True, exist_ok=True)
  stage = tempfile.mkdtemp(dir=os.fspath(target), prefix='.staging-')
  try:
    yield epath.Path(stage)
    written = _files_below(stage)
    problems = [p for p in (_in_the_way(target, r) for r in written) if p]
    if problems:
      raise StagedOutputError(f'{target}: cannot put the outputs in place, nothing was '
                              f'changed: {"; ".join(problems)}')
    for relative in written:
      os.makedirs(os.path.dirname(os.fspath(target / relative)), exist_ok=True)
      os.replace(os.path.join(stage, relative), os.fspath(target / relative))
  finally:
    shutil.rmtree(stage, ignore_errors=True)
