r"""APOGEE Net III, a variant a 2-core CPU trains on the demo survey in minutes.

    python train.py --config=configs/net3_small.py --workdir=workdirs/net3_small \
        --config.data_dir=data/demo/tfds

The authors' layout (configs/net3.py) with a shorter kernel, fewer channels and a narrower head:
the k=30 convolutions over 4288 pixels and the 65,536 × 1024 dense layer are what a CPU cannot
afford. What changed and the cost of a training step are in docs/model_families.md.
"""

from configs import net3


def get_config():
  config = net3.get_config()
  config.model.model_dim = 4
  config.model.dim_mults = (1, 2, 4, 8)  # first conv 4 channels; blocks 4→8→16→32
  config.model.kernel_size = 9
  config.model.pool_size = 128
  config.model.linear_depth = 2
  config.model.linear_width = 256
  config.batch_size = 16
  config.max_epochs = 8
  config.early_stopping_from_epoch = 0
  config.data_dir = 'data/demo/tfds'
  return config
