r"""Train APOGEE Net (paper §3.3–3.4).

    python train.py --config=configs/default.py --workdir=workdirs/default \
        [--config.data_dir=data/tfds] [--config.batch_size=256 …]

Rerunning the same command on an existing workdir resumes from its latest checkpoint (the
newest one that restores); a second run on a workdir in use stops at once, naming the holder.
Multi-host (one process per host, each with its own devices and data shard):

    python train.py --config=configs/default.py --workdir=gs://…/run --config.multihost=True

on every host; ``jax.distributed.initialize()`` reads the coordinator from the cluster environment
(Cloud TPU, SLURM, Open MPI) or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
SIGTERM (a preemption notice) to any one host stops every host at the same step, where they save
one checkpoint together; rerunning the command resumes from it. Paths may be gs://… with the
``gcs`` extra.
Intentionally short: the logic lives in ``apogeenet_jax.training``.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from apogeenet_jax import (
  checkpoint,
  config_validation,
  file_io,
  input_pipeline,
  sharding,
  train_state,
  training,
  workdir_lock,
)

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory (local or gs://…) for checkpoints, metrics and '
                    'TensorBoard logs.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  config = FLAGS.config
  try:
    config_validation.validate(config)  # Before the workdir is looked at or made.
  except config_validation.ConfigError as e:
    raise SystemExit(f'FATAL {e}') from None
  workdir = file_io.as_path(FLAGS.workdir)
  if not file_io.is_remote(workdir) and workdir.exists() and not workdir.is_dir():
    raise SystemExit(f'FATAL --workdir {workdir} is a file, not a directory')
  if config.multihost:
    sharding.initialize_distributed()
  logging.info('JAX process %d/%d, local devices %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    training.train_and_evaluate(config, FLAGS.workdir)
  except (workdir_lock.WorkdirLockedError, checkpoint.CheckpointError,
          train_state.TrainingError, input_pipeline.InputPipelineError) as e:
    # Problems of the workdir, the config or the data, not bugs: one line that says what to do,
    # not a traceback.
    raise SystemExit(f'FATAL {e}') from None


if __name__ == '__main__':
  app.run(main, flags_parser=config_validation.parse_flags)
