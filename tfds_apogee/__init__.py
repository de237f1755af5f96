"""TFDS data sets of apogeenet-jax: `import tfds_apogee` registers `apogee` with TFDS."""

from tfds_apogee import apogee

__all__ = ['apogee']
