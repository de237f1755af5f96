"""Target standardisation (paper §3.1, Table 1)."""

import numpy as np
import pytest

from apogeenet_jax.normalization import PAPER_STANDARDIZER, Standardizer


def test_paper_preset_matches_table_1():
  # Table 1 rounds the released values: log g 2.88/1.16, Teff 4716.92/733.01, [Fe/H] −0.22/0.30.
  np.testing.assert_allclose(PAPER_STANDARDIZER.mean, [2.88, 4716.92, -0.22], atol=0.005)
  np.testing.assert_allclose(PAPER_STANDARDIZER.std, [1.16, 733.01, 0.30], atol=0.005)


def test_fit_transform_inverse_round_trip():
  rng = np.random.default_rng(0)
  labels = np.stack([rng.normal(3, 1, 500), rng.normal(4800, 700, 500),
                     rng.normal(-0.2, 0.3, 500)], axis=1)
  s = Standardizer.fit(labels)
  z = s.transform(labels)
  np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
  np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-5)
  # z is float32: the round trip holds to float32 precision in units of σ.
  np.testing.assert_allclose((s.inverse(z) - labels) / s.std, 0, atol=1e-6)
  np.testing.assert_allclose(s.inverse_scale(np.ones(3)), labels.std(axis=0))


def test_dict_round_trip_and_label_order_check():
  d = PAPER_STANDARDIZER.to_dict()
  again = Standardizer.from_dict(d)
  np.testing.assert_array_equal(again.mean, PAPER_STANDARDIZER.mean)
  with pytest.raises(ValueError, match='label order'):
    Standardizer.from_dict({**d, 'label_names': ['TEFF', 'LOGG', 'FE_H']})
  with pytest.raises(ValueError, match='positive'):
    Standardizer(mean=[0, 0, 0], std=[1, 0, 1])
