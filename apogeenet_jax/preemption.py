"""Stopping at a step boundary on SIGTERM/SIGINT, the same step on every process, so that a
preempted run saves a checkpoint and the same command resumes it.
"""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
from absl import logging


class StopRequest:
  """Whether to stop at this step boundary, the same answer on every process.

  One process: SIGTERM or SIGINT sets a flag (a second signal raises KeyboardInterrupt: the user
  insists). Several processes (``jax.distributed``): a signal reaches one process, and a process
  that stopped on its own would leave the others waiting in the next collective, so the stop is
  agreed through orbax's ``CheckpointManager.reached_preemption(step)``. It is JAX's preemption
  service: ``jax.distributed.initialize`` installs a SIGTERM notifier that tells the coordination
  service, which picks one step (after every process's latest) at which every process's check
  returns True. This object therefore leaves SIGTERM to JAX and turns SIGINT into a SIGTERM to
  its own process. The check must run the same number of times on every process: once per call
  of the train steps.
  """

  def __init__(self, manager: Any = None):
    self.manager = manager
    self.coordinated = manager is not None and jax.process_count() > 1
    self.signum = None

  def __call__(self, step: int) -> bool:
    if self.coordinated:
      return self.manager.reached_preemption(step)
    return self.signum is not None

  def handler(self, signum, frame):
    del frame
    if self.coordinated:
      logging.warning('Received signal %d: passing it to JAX\'s preemption service as SIGTERM.',
                      signum)
      os.kill(os.getpid(), signal.SIGTERM)
      return
    if self.signum is not None:  # A second signal: the user insists.
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning('Received signal %d: saving a checkpoint after this step, then exiting.',
                    signum)

  @contextlib.contextmanager
  def installed(self) -> Iterator['StopRequest']:
    """Installs the handlers for the body (main thread only) and restores the old ones."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    signals = (signal.SIGINT,) if self.coordinated else (signal.SIGTERM, signal.SIGINT)
    old = {sig: signal.signal(sig, self.handler) for sig in signals}
    try:
      yield self
    finally:
      for sig, handler in old.items():
        signal.signal(sig, handler)
