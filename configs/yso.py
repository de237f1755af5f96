r"""The YSO photometric network of paper §2.4, trained on synthetic stars from isochrones.

    python -m apogeenet_jax.make_labels --isochrones=gaia.dat,2mass_wise.dat \
        --yso_members=members.fits --yso_workdir=workdirs/yso --output=M/labels.fits

The paper: ~42,000 synthetic training stars; on held-out synthetic stars log g to 0.01 dex and
log Teff to 0.003 dex. It gives no architecture widths, optimiser or schedule: the values below
are ours (see ``apogeenet_jax/yso_photometric.py``). Timing and accuracy on the FAKE grid:
``python benchmarks/yso_photometric_benchmark.py``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.num_train = 42_000  # §2.4
  config.num_dev = 4_200
  config.num_test = 4_200
  config.seed = 0
  config.channels = (32, 64, 128)
  config.hidden = 256
  config.dropout_rate = 0.0
  config.batch_size = 128
  config.eval_batch_size = 1024
  config.learning_rate = 1e-3  # Adam
  config.max_epochs = 200
  config.patience = 10  # dev evaluations without improvement
  config.min_delta = 0.0
  config.num_devices = 1
  return config
