r"""The paper's network on the embedded SYNTHETIC survey, end to end in minutes on 2 CPU cores.

    python -m apogeenet_jax.synthetic --output_dir=data/demo/raw --num_stars=2500
    python -m tfds_apogee.build --manual_dir=data/demo/raw --data_dir=data/demo/tfds
    python train.py --config=configs/demo.py --workdir=workdirs/demo

The default recipe (configs/default.py) and the full Appendix-B network — channels
8,8,16,16,16,16,32,32,32,32,64,64, hidden 512,512 — with an epoch cap sized to a CPU demo.
Measured (2,500 stars, 2 CPU cores): test MSE 0.021, scatter 0.16 dex / 94 K / 0.033 dex; best
dev MSE 0.017 at step 196; the whole demo 159 s on 2 quiet cores (README "Results").
Leaves the best checkpoint in workdirs/demo/checkpoints for ``evaluate.py --workdir=workdirs/demo``.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data_dir = 'data/demo/tfds'
  # ~14 steps of 128 per epoch on the 2500-star demo survey; the cap keeps the demo within
  # minutes on 2 CPU cores (early stopping rarely triggers this early).
  config.max_epochs = 16
  config.log_every_steps = 10
  return config
