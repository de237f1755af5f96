"""The `apogee` TFDS data set (importing this registers it)."""

from tfds_apogee.apogee.apogee_dataset_builder import Builder

__all__ = ['Builder']
