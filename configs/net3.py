r"""APOGEE Net III (the APOGEE model of BOSS Net, Sizemore et al. 2024) at the authors' size.

    python train.py --config=configs/net3.py --workdir=workdirs/net3 --config.data_dir=data/tfds

The authors' architecture (``apogeenet_jax/models/apogee_net_3.py``: a 1-D ResNet with batch norm
on the log of the flux, clipped at its 95th percentile + 1, with a positional sin(i) channel; 72.6
million parameters, 65,536 × 1024 in its first dense layer) with the project's recipe
(configs/default.py: Adam, global batch 32, cosine decay, loss weights, noise augmentation, early
stopping). The flux preprocessing is the module's own (recorded in the checkpoint), so no
flux_scaling here; the label standardiser works in log10 Teff. Batch norm's running statistics
travel in the train state, the checkpoints and every ensemble member. Sized for a GPU: on a
2-core CPU one epoch of 3,600 spectra takes far too long (docs/model_families.md);
configs/net3_small.py is the variant a CPU trains in minutes.
"""

import ml_collections

from apogeenet_jax.models import apogee_net_3
from configs import default


def get_config():
  config = default.get_config()
  config.model = ml_collections.ConfigDict({
      'name': 'apogee_net_3',
      'model_dim': apogee_net_3.AUTHORS_MODEL_DIM,
      'dim_mults': apogee_net_3.AUTHORS_DIM_MULTS,
      'kernel_size': apogee_net_3.AUTHORS_KERNEL,
      'pool_size': apogee_net_3.AUTHORS_POOL,
      'linear_depth': apogee_net_3.AUTHORS_LINEAR_DEPTH,
      'linear_width': apogee_net_3.AUTHORS_LINEAR_WIDTH,
      'dropout_rate': 0.0,  # the authors' network has none
  })
  return config
