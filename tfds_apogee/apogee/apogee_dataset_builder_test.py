"""tfds.testing.DatasetBuilderTestCase for `apogee` on dummy_data (needs TensorFlow).

dummy_data/ holds 5 SYNTHETIC stars (SPLIT column: 3 train, 1 dev, 1 test), one catalogue row
whose file is not FITS and one without a file: the two must be skipped, not counted.
The TensorFlow-free test of the same builder is tests/test_dataset_builder.py.
"""

from typing import ClassVar

import pytest

pytest.importorskip('tensorflow')

import tensorflow_datasets as tfds

from tfds_apogee.apogee import apogee_dataset_builder


class ApogeeTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = apogee_dataset_builder.Builder
  SPLITS: ClassVar[dict[str, int]] = {'train': 3, 'dev': 1, 'test': 1}
  SKIP_CHECKSUMS = True

  @classmethod
  def setUpClass(cls):
    # DatasetBuilderTestCase reads back with as_dataset (tf.data), which array_record, the
    # TensorFlow-free default, does not support: these tests build tfrecord instead.
    cls._default_format = apogee_dataset_builder.DEFAULT_FILE_FORMAT
    apogee_dataset_builder.DEFAULT_FILE_FORMAT = 'tfrecord'
    super().setUpClass()

  @classmethod
  def tearDownClass(cls):
    apogee_dataset_builder.DEFAULT_FILE_FORMAT = cls._default_format
    super().tearDownClass()


if __name__ == '__main__':
  tfds.testing.test_main()
