"""The one data-parallel mesh of training and evaluation: a 1-D mesh whose axis is DATA_AXIS.

Training (``steps.make_train_step``) and prediction (``prediction.predict_batches``) both shard
the batch over this axis, and the loss / predictions reduce over it by name, so the name lives
here once, with the placement of host data on the mesh: replicated (``replicate``) or split over
the axis (``shard_batch``).
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'
# A device batch (``shard_batch``): the model's named inputs under INPUTS_KEY, passed through
# whatever keys they hold (``models.Family.inputs``); beside them the standardised targets, data
# types and mask, and, when a run trains with noise augmentation, NOISE_KEY: the per-pixel noise
# scale of each noisy input, by the same names. Strings and catalogue columns stay on the host.
INPUTS_KEY = 'inputs'
NOISE_KEY = 'noise'
DEVICE_KEYS = (INPUTS_KEY, 'targets', 'data_type', 'mask')
# A split resident on the devices: every input (and noise scale) in one block of rows per
# device, the small arrays on all.
RESIDENT_SPECS = {INPUTS_KEY: P(DATA_AXIS), 'targets': P(), 'data_type': P()}


def resident_specs(with_noise: bool = False) -> dict[str, P]:
  """The shard_map specs of a resident split (``train_inputs.place_split``)."""
  return {**RESIDENT_SPECS, NOISE_KEY: P(DATA_AXIS)} if with_noise else dict(RESIDENT_SPECS)


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


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree fully replicated on the mesh (a no-op for arrays already there).

  Host-side values (NumPy, Python scalars, single-device arrays from host bookkeeping) go through
  NumPy: every process holds the same value, which is what a replicated global array needs
  across hosts.
  """
  sharding = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array):
      if x.sharding == sharding:
        return x
      if x.is_fully_addressable and jax.process_count() > 1:
        x = np.asarray(x)
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
  """This process's rows → one global array per leaf of the device keys (``device_keys``),
  split over 'data'."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch[k])
          for k in device_keys(batch)}


def device_keys(batch: Mapping[str, Any]) -> tuple[str, ...]:
  """The keys of a host batch that go to the devices: ``DEVICE_KEYS``, and the noise scales when
  the batch carries them (noise augmentation)."""
  return (*DEVICE_KEYS, NOISE_KEY) if NOISE_KEY in batch else DEVICE_KEYS
