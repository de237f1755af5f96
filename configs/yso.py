r"""The YSO photometric network of paper §2.4, trained on synthetic stars from isochrones.

    python -m apogeenet_jax.make_labels --isochrones=gaia.dat,2mass_wise.dat \
        --yso_members=members.fits --yso_workdir=workdirs/yso --output=M/labels.fits \
        --yso_config=configs/yso.py

The paper: ~42,000 synthetic training stars; on held-out synthetic stars log g to 0.01 dex and
log Teff to 0.003 dex. It gives no widths, optimiser or schedule: the values in
``yso_photometric.default_config`` are ours. Accuracy and time on the FAKE test grid:
``python benchmarks/yso_photometric_benchmark.py`` (figures in docs/data.md).
"""

from apogeenet_jax import yso_photometric


def get_config():
  return yso_photometric.default_config()
