"""File-writing helpers shared by every output: the catalogue, metrics.json, figures, reports."""

import contextlib
import os
import stat
import tempfile


def _umask() -> int:
  # Reading the umask means setting it for an instant; every file writer here creates its files
  # from the main thread, so no other file is created in between.
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path beside ``path``; moves it over ``path`` only if the body succeeds.

  Every output file (catalogue, metrics, figures) is written through this: a crash never leaves
  half a file where a good one stood.
  """
  directory = os.path.dirname(os.path.abspath(path)) or '.'
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
