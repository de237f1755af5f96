"""Numbers the paper and the apStar format define, named once (the paper's section in each
comment; docs/paper_facts.md collects them).

Plain Python: importable from I/O code that must not pull in JAX.
"""

# §2.1: every apStar spectrum sits on one log-linear grid,
# log10(λ/Å) = LOG10_WAVE_START + LOG10_WAVE_STEP · i, i = 0 … N_PIXELS − 1.
N_PIXELS = 8575
LOG10_WAVE_START = 4.179
LOG10_WAVE_STEP = 6e-6

# §3.1, Table 1 and the authors' released code: output order of the network and of every label array, Teff linear in K.
LABEL_NAMES = ('LOGG', 'TEFF', 'FE_H')
LABEL_UNITS = ('dex', 'K', 'dex')

# docs/paper_facts.md, "Real files": apStar marks the array ends and chip gaps with flux
# exactly 0 and error exactly 1e10 (exactly representable in float32); preprocessing gives every
# non-finite or negative error this value, so Monte Carlo draws leave those pixels alone.
BAD_PIXEL_ERROR = 1.0e10

# §2.2–2.4: the three label sources ("data types").
DATA_TYPES = ('Payne', 'MStar', 'YSO')

# §3: train/dev/test fractions per data type.
SPLITS = ('train', 'dev', 'test')
SPLIT_FRACTIONS = {
    'Payne': (0.8, 0.1, 0.1),
    'MStar': (0.6, 0.2, 0.2),
    'YSO': (0.6, 0.2, 0.2),
}

# APOGEE Net II (Sprague et al. 2022, and the authors' code hutchresearch/ApogeeNet2): the
# photometric "metadata" vector beside the spectrum, in this order: Gaia parallax (mas), Gaia G,
# BP, RP and 2MASS J, H, K (mag). The label catalogue's optional columns of these names (and
# <name>_ERR for their errors) become the records' `metadata` and `metadata_err` features.
# Catalogues write a missing magnitude as 99.999 (any value ≥ MISSING_MAGNITUDE, or non-finite,
# means "no value"): stored as given; the network's replacement rule and the bound treat it as
# missing.
METADATA_COLUMNS = ('PLX', 'G', 'BP', 'RP', 'J', 'H', 'K')
METADATA_ERR_COLUMNS = tuple(f'{name}_ERR' for name in METADATA_COLUMNS)
METADATA_UNITS = ('mas', 'mag', 'mag', 'mag', 'mag', 'mag', 'mag')
MISSING_MAGNITUDE = 98.0
# What APOGEE Net II's metadata MLP reads (its ``metadata_transform``), each column as (first,
# second) indices into METADATA_COLUMNS, read first − second (second −1: the value itself):
#   'magnitudes'  the 7 values as they are: the authors' network;
#   'colours'     PLX, G and the five colours of neighbouring bands in wavelength, BP − G, G − RP,
#                 RP − J, J − H, H − K: the same information (an invertible linear map), but
#                 Teff's signal is then one input, not a 0.1% difference between two z-scored
#                 magnitudes that each vary by ~2 mag with the distance.
METADATA_TRANSFORMS = {
    'magnitudes': tuple((j, -1) for j in range(len(METADATA_COLUMNS))),
    'colours': ((0, -1), (1, -1), (2, 1), (1, 3), (3, 4), (4, 5), (5, 6)),
}


def metadata_column_names(transform: str) -> tuple[str, ...]:
  """The names of a transform's columns: ('PLX', 'G', 'BP-G', …) for 'colours'."""
  return tuple(METADATA_COLUMNS[a] + (f'-{METADATA_COLUMNS[b]}' if b >= 0 else '')
               for a, b in METADATA_TRANSFORMS[transform])
