"""The one data-parallel mesh of training and evaluation: a 1-D mesh whose axis is DATA_AXIS.

Training (``training.make_train_step``) and evaluation (``evaluation.predict``) both shard the
batch over this axis, and the loss / predictions reduce over it by name, so the name lives here
once.
"""

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DATA_AXIS = 'data'


class MeshError(ValueError):
  """The requested devices cannot form the mesh."""


def make_mesh(num_devices: int | None = None, devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A 1-D (DATA_AXIS,) mesh over the first ``num_devices`` of ``devices`` (all when None or 0).

  ``devices`` defaults to ``jax.devices()``, which across hosts lists every process's devices,
  so the default mesh spans them all.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices:
    if num_devices > len(devices):
      raise MeshError(f'num_devices={num_devices} but only {len(devices)} devices exist')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def initialize_distributed() -> None:
  """``jax.distributed.initialize()`` for ``--multihost`` runs (train.py, evaluate.py).

  Clusters JAX knows (Cloud TPU, SLURM, Open MPI, Kubernetes) need nothing; elsewhere set
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every
  process. JAX itself reads only the first of the three, so the other two are passed here.
  """
  kwargs = {name: int(os.environ[var]) for name, var in (('num_processes', 'JAX_NUM_PROCESSES'),
                                                         ('process_id', 'JAX_PROCESS_ID'))
            if os.environ.get(var)}
  jax.distributed.initialize(**kwargs)
