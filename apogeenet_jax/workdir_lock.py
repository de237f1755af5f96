"""One training run per workdir: an advisory lock on WORKDIR/.lock.

Two runs on one workdir interleave their checkpoints and metrics rows (one died inside orbax;
another wrote every epoch twice). ``hold`` takes an exclusive ``fcntl.flock`` on the lock file
for the length of the run, and a second run fails at once with ``WorkdirLockedError`` naming the
holder (pid, host, start time, as the holder wrote them into the file).

flock, not "the file exists": the kernel drops the lock when its holder dies, however it dies
(kill -9, the OOM killer, a crash), so a lock left by a dead run never blocks a rerun and there
is no stale-lock heuristic. The file itself stays (deleting it would let two runs lock two
different files of the same name). flock is for local file systems (on NFS, Linux emulates it
with byte-range locks); a workdir given as a URL (gs://…) is not locked, with a warning. In a
multi-host run only process 0 takes the lock (``enabled``). Standard library only.
"""

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

LOCK_FILE = '.lock'


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir. The message names the workdir and the holder."""


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, enabled: bool = True,
         what: str = 'training run', change: str = 'give another --workdir') -> Iterator[None]:
  """Holds WORKDIR/.lock for the body; raises WorkdirLockedError at once if another run has it.

  ``what`` and ``change`` name the kind of run and the way out in the message (the data set
  build locks its data folder the same way)."""
  workdir = os.fspath(workdir)
  if not enabled:
    yield
    return
  if '://' in workdir:
    logging.warning('%s: not a local path, so it is not locked against a second run.', workdir)
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 1024, 0).decode(errors='replace').strip() or 'a process'
      raise WorkdirLockedError(
          f'{workdir}: another {what} is using this folder ({holder}). Wait for it to end or '
          f'stop it, or {change}.') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f'pid {os.getpid()} on host {socket.gethostname()}, started '
                   f'{time.strftime("%Y-%m-%d %H:%M:%S %Z")}\n').encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the flock (if held).
