r"""Makes the builder's labels.fits from published catalogues, as the paper did (§2.2–2.4).

    python -m apogeenet_jax.make_labels --output=M/labels.fits \
        --payne=ThePayne_dr14_catalog.fits \
        --photometry=mdwarf_photometry.fits --feh_relation=hejazi2015.json \
        --yso_members=kounkel2019_members.fits --isochrones=parsec_gaia.dat,parsec_2mass_wise.dat \
        --yso_workdir=workdirs/yso

Any subset of the three sources may be given. What is implemented, what the user supplies, and
how far each relation can be trusted:
  Payne (§2.2, ``label_sources.payne``): quality flag, −9999 values dropped and counted, kept
    where Teff > 4000 K or log g < 3.5. The catalogue is the user's download (layout of Leung &
    Bovy's repackaging; names configurable). Trust: the cut is the paper's words.
  MStar (§2.3, ``label_sources.mstar`` + ``relations``): the colour/M_K/parallax cuts and the
    star-forming-region exclusion as printed; Teff by solving Mann 2015's R(M_K) = R(Teff)
    (coefficients: high trust; the solve: our inference); log g from a reconstruction of
    Veyette 2017 (fit to the authors' grid, rms 0.003 dex), cross-checked against
    log(G·M/R²) from Mann's M(M_K), R(M_K). [Fe/H]: Hejazi 2015 is NOT shipped — the user
    supplies it (--feh_relation); without it the tool stops.
  YSO (§2.4, ``yso_photometric`` + ``label_sources.isochrones``): the photometric CNN, trained
    on synthetic stars drawn from the USER's PARSEC isochrones (never downloaded here) with the
    paper's distributions and limits; architecture widths, optimiser and extinction law are
    ours (the paper gives none). A trained network in --yso_workdir is reused.
  Merge (``label_sources.merge``): one row per APOGEE_ID, precedence YSO > MStar > Payne, with
    PROVENANCE and ALSO_IN columns; validated with ``apogeenet_jax.labels.read_label_catalog``.
Outputs: --output (FITS), and beside it labels_report.csv (rows each cut removed) and
labels_summary.json (counts, the MStar log g cross-check, the YSO network's synthetic test).
The three are written to a staging folder and validated first, then moved into place together
(``file_io.staged_outputs``): a failed run leaves an earlier catalogue and its reports as they
were. An --output that is also one of the inputs is refused.
"""

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from astropy.table import Table

from apogeenet_jax import file_io
from apogeenet_jax import labels as label_catalog
from apogeenet_jax.label_sources import common, isochrones, merge, mstar, relations
from apogeenet_jax.label_sources import payne as payne_source

REPORT_NAME = 'labels_report.csv'
SUMMARY_NAME = 'labels_summary.json'
PAPER_REGIONS = 'paper'


@dataclasses.dataclass
class LabelRequest:
  """Everything ``make_labels`` needs; None leaves a source out."""
  output: str
  payne: str | None = None
  payne_columns: payne_source.PayneColumns = dataclasses.field(default_factory=payne_source.PayneColumns)
  photometry: str | None = None
  feh_relation: relations.FehRelation | str | None = None
  photometry_columns: mstar.PhotometryColumns = dataclasses.field(
      default_factory=mstar.PhotometryColumns)
  regions: mstar.StarFormingRegions = dataclasses.field(default_factory=mstar.StarFormingRegions)
  teff_relation: str = mstar.TEFF_FROM_MK
  yso_members: str | None = None
  isochrones: Sequence[str] = ()
  yso_workdir: str | None = None
  yso_config: ml_collections.ConfigDict | None = None
  yso_fe_h: float = 0.0


def _yso_network(request: LabelRequest) -> dict[str, Any]:
  """Reuses the trained network in yso_workdir, else trains one on the user's isochrones."""
  from apogeenet_jax import checkpoint, yso_photometric  # JAX only when needed.

  if not request.yso_workdir:
    raise ValueError('--yso_members needs --yso_workdir (where the YSO network lives)')
  if os.path.isdir(os.path.join(request.yso_workdir, checkpoint.CHECKPOINT_DIR)):
    # A broken or foreign checkpoint raises CheckpointError here rather than being overwritten.
    _, meta = yso_photometric.load(request.yso_workdir)
    logging.info('Using the YSO network in %s (step %d).', request.yso_workdir, meta['step'])
    return yso_photometric.test_scores(request.yso_workdir)
  if not request.isochrones:
    raise isochrones.MissingIsochronesError(
        f'{request.yso_workdir}: no trained YSO network and no isochrone files given. '
        f'{isochrones.PARSEC_HELP}')
  iso = isochrones.read_isochrones(request.isochrones)
  config = request.yso_config or yso_photometric.default_config()
  return yso_photometric.train(iso, request.yso_workdir, config)


def _refuse_output_over_inputs(request: LabelRequest) -> None:
  """--output (or a report beside it) must not replace one of the tables it is made from."""
  directory = os.path.dirname(os.path.abspath(request.output))
  outputs = {os.path.realpath(p) for p in (request.output, os.path.join(directory, REPORT_NAME),
                                           os.path.join(directory, SUMMARY_NAME))}
  feh = request.feh_relation if isinstance(request.feh_relation, str | os.PathLike) else None
  for given in (request.payne, request.photometry, feh, request.yso_members,
                *request.isochrones):
    if given and os.path.realpath(given) in outputs:
      raise common.SourceTableError(f'{given}: the output {request.output} (or its report) is '
                                    'also an input; write the catalogue elsewhere')


def make_labels(request: LabelRequest) -> tuple[Table, list[common.Cut], dict[str, Any]]:
  """Builds, validates and writes the catalogue. Returns (table, cut report, summary).

  The catalogue, labels_report.csv and labels_summary.json appear together or not at all.
  """
  _refuse_output_over_inputs(request)
  # Fail on missing user data before any long step.
  feh = request.feh_relation
  if request.photometry is not None and not callable(feh):
    feh = relations.load_feh_relation(feh)
  if request.yso_members is not None and not request.isochrones and not (
      request.yso_workdir and os.path.isdir(request.yso_workdir)):
    raise isochrones.MissingIsochronesError(
        f'--yso_members given but no isochrone files and no trained network in '
        f'{request.yso_workdir!r}. {isochrones.PARSEC_HELP}')
  report: list[common.Cut] = []
  summary: dict[str, Any] = {}
  parts = []
  if request.payne is not None:
    parts.append(payne_source.payne_labels(request.payne, request.payne_columns, report))
  if request.photometry is not None:
    check: dict[str, float] = {}
    parts.append(mstar.mstar_labels(request.photometry, feh, columns=request.photometry_columns,
                                    regions=request.regions, teff_relation=request.teff_relation,
                                    report=report, crosscheck=check))
    summary['mstar_logg_crosscheck_veyette_minus_mann_mass_radius'] = check
  if request.yso_members is not None:
    from apogeenet_jax import yso_photometric

    summary['yso_network_synthetic_test'] = _yso_network(request)
    parts.append(yso_photometric.yso_labels(request.yso_members, request.yso_workdir,
                                            fe_h=request.yso_fe_h, report=report))
  table = merge.merge(parts, report)
  directory = os.path.dirname(os.path.abspath(request.output))
  with file_io.staged_outputs(directory) as stage:
    # Validated (read back) in the staging folder: a catalogue that fails never replaces one.
    staged = stage / os.path.basename(request.output)
    try:
      stars = merge.write_labels(table, staged)
    except label_catalog.LabelCatalogError as e:
      raise label_catalog.LabelCatalogError(
          f'{str(e).replace(str(staged), request.output)} (nothing was written)') from None
    common.write_cut_report(report, stage / REPORT_NAME)
    summary['counts'] = {t: int(sum(s.data_type == t for s in stars)) for t in merge.PRECEDENCE}
    summary['output'] = os.path.abspath(request.output)
    (stage / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
  logging.info('Wrote %s: %s', request.output, summary['counts'])
  return table, report, summary


def regions_from_flags(fields: str, circles: str | None) -> mstar.StarFormingRegions:
  """--sfr_fields ('paper', 'none' or comma-separated patterns) and --sfr_circles (CSV
  name,ra,dec,radius in degrees; default the paper's regions)."""
  default = mstar.StarFormingRegions()
  if fields == 'none':
    patterns: tuple[str, ...] = ()
  elif fields == PAPER_REGIONS:
    patterns = default.field_patterns
  else:
    patterns = tuple(p.strip() for p in fields.split(',') if p.strip())
  if circles is None or circles == PAPER_REGIONS:
    sky = default.circles
  elif circles == 'none':
    sky = ()
  else:
    try:
      with open(circles, newline='') as f:
        sky = tuple(mstar.SkyCircle(r['name'], float(r['ra']), float(r['dec']),
                                    float(r['radius'])) for r in csv.DictReader(f))
    except (OSError, KeyError, ValueError) as e:
      raise common.SourceTableError(f'{circles}: cannot read sky circles (CSV name,ra,dec,'
                                    f'radius): {e}') from e
  return mstar.StarFormingRegions(field_patterns=patterns, circles=sky)


def main(argv):
  del argv
  f = flags.FLAGS
  if not (f.payne or f.photometry or f.yso_members):
    raise app.UsageError('give at least one of --payne, --photometry, --yso_members')
  if f.yso_members and not f.yso_workdir:
    raise app.UsageError('--yso_members needs --yso_workdir (where the YSO network lives)')
  request = LabelRequest(
      output=f.output, payne=f.payne,
      payne_columns=payne_source.PayneColumns(array=f.payne_array or None, flag=f.payne_flag or None,
                                       teff_index=f.payne_teff_index,
                                       logg_index=f.payne_logg_index,
                                       fe_h_index=f.payne_fe_h_index),
      photometry=f.photometry, feh_relation=f.feh_relation,
      regions=regions_from_flags(f.sfr_fields, f.sfr_circles), teff_relation=f.mstar_teff,
      yso_members=f.yso_members, isochrones=[p for p in f.isochrones if p],
      yso_workdir=f.yso_workdir, yso_config=f.yso_config, yso_fe_h=f.yso_fe_h)
  try:
    _, _, summary = make_labels(request)
  except (common.MissingUserDataError, common.SourceTableError,
          label_catalog.LabelCatalogError, file_io.StagedOutputError) as e:
    # A problem of the data, not of the command line: one line, without the flags' help.
    raise SystemExit(f'FATAL {e}') from None
  print(json.dumps(summary['counts']))


def run():
  """Entry point; flags are defined here so that importing the module defines none."""
  from ml_collections import config_flags

  flags.DEFINE_string('output', None, 'labels.fits to write (the builder manual_dir).')
  flags.DEFINE_string('payne', None, 'Payne DR14 catalogue (FITS).')
  flags.DEFINE_string('payne_array', 'payne', "Array column [Teff, logg, …]; '' = scalar "
                      'TEFF/LOGG/FE_H columns.')
  flags.DEFINE_string('payne_flag', 'good_flag', "Quality flag column (1 = good); '' = none.")
  flags.DEFINE_integer('payne_teff_index', 0, 'Teff index in the array column.')
  flags.DEFINE_integer('payne_logg_index', 1, 'log g index in the array column.')
  flags.DEFINE_integer('payne_fe_h_index', 19, '[Fe/H] index in the array column.')
  flags.DEFINE_string('photometry', None, 'MStar photometry table (J, K, G, PARALLAX, '
                      'PARALLAX_ERROR, FIELD and/or RA/DEC).')
  flags.DEFINE_string('feh_relation', None, 'JSON [Fe/H](g−K, J−K) relation (Hejazi 2015 in '
                      'the paper; required with --photometry).')
  flags.DEFINE_string('mstar_teff', mstar.TEFF_FROM_MK, "MStar Teff: 'M_K' (solve Mann's "
                      "R(M_K) = R(Teff)) or a Mann 2015 colour relation, e.g. 'BP-RP,[Fe/H]'.")
  flags.DEFINE_string('sfr_fields', PAPER_REGIONS, "Star-forming-region field-name patterns: "
                      "'paper', 'none' or comma-separated.")
  flags.DEFINE_string('sfr_circles', PAPER_REGIONS, "Sky circles to exclude: 'paper', 'none' "
                      'or a CSV name,ra,dec,radius (deg).')
  flags.DEFINE_string('yso_members', None, 'YSO member table (G…W3, PARALLAX, RADIUS, LUM).')
  flags.DEFINE_list('isochrones', [], 'PARSEC CMD files (Gaia DR2; 2MASS + WISE).')
  flags.DEFINE_string('yso_workdir', None, 'Where the YSO network is (or will be) trained.')
  flags.DEFINE_float('yso_fe_h', 0.0, '[Fe/H] given to YSO labels (isochrone metallicity).')
  config_flags.DEFINE_config_file('yso_config', None, 'YSO network config (configs/yso.py; '
                                  'default yso_photometric.default_config()).')
  flags.mark_flags_as_required(['output'])
  app.run(main)


if __name__ == '__main__':
  run()
