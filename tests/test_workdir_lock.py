"""apogeenet_jax.workdir_lock: one run per workdir; a dead holder never blocks (issue 13 item 2)."""

import os
import signal
import subprocess
import sys

import pytest

from apogeenet_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOLDER = """
import sys, time
from apogeenet_jax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print('held', flush=True)
  time.sleep(120)
"""


def test_second_holder_fails_at_once_naming_the_first(tmp_path):
  with workdir_lock.hold(tmp_path):
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf'{tmp_path}: another training run .*pid {os.getpid()} on host'):
      with workdir_lock.hold(tmp_path):
        pass
  with workdir_lock.hold(tmp_path):  # Released at the end of the first run.
    pass
  with workdir_lock.hold(tmp_path, enabled=False), workdir_lock.hold(tmp_path):
    pass  # Processes other than 0 of a multi-host run do not take it.


def test_lock_of_a_process_killed_with_sigkill_does_not_block(tmp_path):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f'pid {holder.pid} '):
      with workdir_lock.hold(tmp_path):
        pass
  finally:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
  assert (tmp_path / workdir_lock.LOCK_FILE).exists()  # Left behind, and harmless:
  with workdir_lock.hold(tmp_path):
    pass
