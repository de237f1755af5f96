r"""Predict log g, Teff, [Fe/H] with Monte Carlo uncertainties and write the catalogue (§3.5–§4).

Labelled stars of the built data set (writes metrics.json, Tables 2–3, and all figures):

    python evaluate.py --workdir=workdirs/demo --data_dir=data/demo/tfds --split=test \
        --mc=100 --output_dir=workdirs/demo/eval

New, unlabelled apStar files (the common use; unreadable files go to OUT/skipped.csv):

    python evaluate.py --checkpoint=checkpoints/paper --apstar_dir=DIR --mc=100 --output_dir=OUT

Calibrate the σ on the dev split first (stored in the checkpoint directory as calibration.json;
every later run on that checkpoint applies it, ``--calibration=none`` shows the raw σ; the floor
b follows the star's predicted labels where cross-validation on dev asks for it,
``--calibration_floor=constant`` keeps one b per label):

    python evaluate.py --workdir=workdirs/demo --data_dir=data/demo/tfds --calibrate --mc=100

``--workdir`` takes the best checkpoint of a training run, ``--checkpoint`` any orbax checkpoint
directory (e.g. one from ``python -m apogeenet_jax.convert_torch``). ``--error_cap=median`` (the
authors' code, default) or ``mean`` (the paper's text); ``--mc=0`` gives noiseless predictions and
empty σ columns. ``--uncertainty=linear`` replaces the draws by first-order propagation of the
same capped errors through the noise-averaged Jacobian of ``--linear_draws`` (2) draws, ~9× faster
than 100 draws, or the Jacobian at the spectrum with ``--linear_draws=0``, ~18× (prediction = the
noiseless forward pass).
``--split`` takes a comma-separated list (``train,dev,test``). OUT receives catalog.fits,
catalog.csv, metrics.json (labelled runs) and figures/*.png.

Survey scale, on many hosts under ``jax.distributed`` (one process per host; the coordinator comes
from the cluster environment or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID:
``sharding.initialize_distributed``): each process predicts its own contiguous shard of the stars,
process 0 writes the catalogue:

    python evaluate.py --checkpoint=C --apstar_dir=DIR --output_dir=OUT --multihost

On a batch scheduler without ``jax.distributed``, one job per shard writes OUT/part-K-of-N.npz, then
one merge writes the catalogue and metrics (equal, bit for bit, to a single run's):

    python evaluate.py --checkpoint=C --apstar_dir=DIR --output_dir=OUT --shard_index=K --num_shards=N
    python evaluate.py --merge=OUT --output_dir=OUT          # also --merge=DIR1,DIR2,FILE,…

Intentionally short: the logic lives in ``apogeenet_jax.evaluation``.
"""

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from apogeenet_jax import (
    calibration,
    catalog,
    checkpoint,
    config_validation,
    evaluation,
    file_io,
    input_pipeline,
    labels,
    metrics,
    prediction,
    sharding,
    uncertainty,
)

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training run: its best checkpoint is used.')
flags.DEFINE_string('checkpoint', None, 'Any orbax checkpoint directory of this package.')
flags.DEFINE_list('merge', None, 'Part files of a --num_shards run, or folders holding them: '
                  'writes their catalogue, metrics and figures to --output_dir.')
flags.DEFINE_list('split', None, 'Split(s) of the built data set, comma-separated.')
flags.DEFINE_string('data_dir', None, 'tfds data dir of the built data set (default: the '
                    "--config's data_dir).")
flags.DEFINE_string('apstar_dir', None, 'Directory searched recursively for apStar files.')
flags.DEFINE_string('apstar_list', None, 'Text file with one apStar path per line.')
flags.DEFINE_integer('mc', uncertainty.PAPER_NUM_DRAWS, 'Monte Carlo draws per star; 0: none.',
                     lower_bound=0)
flags.DEFINE_enum('uncertainty', 'mc', list(uncertainty.ESTIMATORS),
                  'mc: --mc noisy draws (paper); linear: first-order propagation of the same '
                  'capped errors, one forward + 3 backward passes (--mc unused unless 0).')
flags.DEFINE_integer('linear_draws', uncertainty.DEFAULT_LINEAR_DRAWS,
                     '--uncertainty=linear: M >= 2 = the noise-averaged Jacobian from M noise '
                     'draws (a lower bound on the MC σ; M times the cost); 0 = the Jacobian at '
                     'the spectrum (delta method, deterministic).', lower_bound=0,
                     upper_bound=uncertainty.MAX_LINEAR_DRAWS)
flags.DEFINE_enum('error_cap', 'median', list(uncertainty.ERROR_CAP_MODES),
                  'median: authors\' code (5× median, draw 0 noiseless); mean: paper text.')
flags.DEFINE_integer('seed', 0, 'PRNG seed of the draws: same seed, same catalogue.')
flags.DEFINE_string('metadata', None, 'APOGEE Net II with --apstar_dir/--apstar_list: a table '
                    '(.fits, .ecsv, .csv) keyed by APOGEE_ID with the photometry columns PLX, G, '
                    'BP, RP, J, H, K (and *_ERR); a star without a row is predicted from its '
                    'spectrum and flagged FLAG_NO_PHOTOMETRY.')
flags.DEFINE_bool('photometry_noise', False, 'APOGEE Net II: the draws also perturb the '
                  'photometry by its catalogue errors (*_ERR; the authors perturb the flux only).')
flags.DEFINE_string('output_dir', None, 'Where the catalogue, metrics and figures go '
                    '(default: WORKDIR/eval).')
flags.DEFINE_integer('batch_size', prediction.DEFAULT_BATCH_SIZE, 'Stars per device batch.',
                     lower_bound=1)
flags.DEFINE_integer('draw_chunk', uncertainty.DEFAULT_DRAW_CHUNK,
                     'Draws evaluated together; device holds batch_size × draw_chunk spectra.',
                     lower_bound=1)
flags.DEFINE_bool('figures', True, 'Draw the PNG figures.')
flags.DEFINE_bool('calibrate', False, 'Fit σ_cal² = (a σ)² + b² per label on the dev split and '
                  'store it with the checkpoint (then evaluate --split, if given).')
flags.DEFINE_enum('calibration_floor', 'auto', list(calibration.FLOOR_CHOICES),
                  '--calibrate: auto = b constant or a function of the predicted labels, '
                  'chosen per label by cross-validation on dev; constant = one b per label.')
flags.DEFINE_enum('calibration', 'auto', list(evaluation.CALIBRATION_MODES),
                  "auto: apply the checkpoint's calibration when it has one; none: raw σ.")
flags.DEFINE_bool('multihost', False, 'Run under jax.distributed (also --config.multihost): '
                  'every process predicts its shard, process 0 writes the catalogue.')
flags.DEFINE_integer('num_shards', 1, 'Split the stars into this many shards (separate jobs; '
                     'merge the parts with --merge).', lower_bound=1)
flags.DEFINE_integer('shard_index', 0, 'The shard this job predicts, 0 … --num_shards − 1.',
                     lower_bound=0)
config_flags.DEFINE_config_file('config', None, 'Optional training config: supplies data_dir.')
# All checked when the flags are parsed, before the checkpoint is loaded or a folder is made.
flags.mark_flags_as_mutual_exclusive(['workdir', 'checkpoint', 'merge'], required=True)
flags.mark_flags_as_mutual_exclusive(['merge', 'split'])
flags.mark_flags_as_mutual_exclusive(['merge', 'apstar_dir'])
flags.mark_flags_as_mutual_exclusive(['merge', 'apstar_list'])


@flags.validator('output_dir')
def _check_output_dir(value):
  problem = value and evaluation.output_dir_problem(value)
  if problem:
    raise flags.ValidationError(problem)
  return True


@flags.multi_flags_validator(['output_dir', 'workdir'],
                             message='--output_dir is required with --checkpoint or --merge.')
def _output_dir_known(values):
  return bool(values['output_dir'] or values['workdir'])


@flags.multi_flags_validator(['shard_index', 'num_shards', 'multihost', 'calibrate'])
def _check_shards(values):
  if values['shard_index'] >= values['num_shards']:
    raise flags.ValidationError(f'--shard_index={values["shard_index"]} must be below '
                                f'--num_shards={values["num_shards"]}')
  if values['num_shards'] > 1 and (values['multihost'] or values['calibrate']):
    raise flags.ValidationError('--num_shards is for separate jobs: not with --multihost (which '
                                'shards by process) nor --calibrate (one fit on the whole dev split)')
  return True


# Problems of the inputs, the checkpoint, the flags or the output folder, not bugs: one line.
_USER_ERRORS = (checkpoint.CheckpointError, prediction.EvaluationError,
                input_pipeline.InputPipelineError, calibration.CalibrationError,
                catalog.CatalogError, file_io.StagedOutputError, uncertainty.UncertaintyError,
                labels.LabelCatalogError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  try:
    _main()
  except _USER_ERRORS as e:
    raise SystemExit(f'FATAL {e}') from None


def _main():
  if FLAGS.merge:
    _report(_run_or_exit(evaluation.merge, FLAGS.merge, FLAGS.output_dir,
                         make_figures=FLAGS.figures))
    return
  if FLAGS.multihost or (FLAGS.config and FLAGS.config.get('multihost', False)):
    sharding.initialize_distributed()
  output_dir, data_dir, splits, files, skipped = _inputs()
  params, meta = _run_or_exit(evaluation.load_checkpoint, workdir=FLAGS.workdir,
                              checkpoint_dir=FLAGS.checkpoint)
  logging.info('Checkpoint %s, step %s, ensemble of %d.', meta['checkpoint_dir'],
               meta.get('step'), meta.get('ensemble_size', 1))
  settings = _run_or_exit(uncertainty.MCSettings, mc=FLAGS.mc, estimator=FLAGS.uncertainty,
                          error_cap=FLAGS.error_cap, seed=FLAGS.seed,
                          draw_chunk=FLAGS.draw_chunk, linear_draws=FLAGS.linear_draws,
                          photometry_noise=FLAGS.photometry_noise)
  if FLAGS.calibrate:
    meta['calibration'] = _calibrate(params, meta, data_dir, settings)
    if not splits and not files:
      return
  _report(evaluation.evaluate(
      params=params, meta=meta, output_dir=output_dir, splits=splits, data_dir=data_dir,
      apstar_files=files, skipped_files=skipped, settings=settings, batch_size=FLAGS.batch_size,
      make_figures=FLAGS.figures, calibration_mode=FLAGS.calibration,
      photometry=_run_or_exit(labels.read_photometry_table, FLAGS.metadata) if FLAGS.metadata
      else None,
      shard=(prediction.Shard(FLAGS.shard_index, FLAGS.num_shards) if FLAGS.num_shards > 1
             else None)))


def _inputs():
  """(output_dir, data_dir, splits, apStar files, files left out) from the flags."""
  output_dir = FLAGS.output_dir or str(epath.Path(FLAGS.workdir) / 'eval')
  data_dir = FLAGS.data_dir or (FLAGS.config.data_dir if FLAGS.config else None)
  splits = [s.strip() for s in FLAGS.split or () if s.strip()]
  files, skipped = evaluation.apstar_inputs(FLAGS.apstar_dir, FLAGS.apstar_list)
  if not splits and not files and not skipped:
    if not FLAGS.calibrate:
      raise app.UsageError('Nothing to evaluate: give --split or --apstar_dir/--apstar_list '
                           '(an --apstar_dir without apStar-*.fits files counts as nothing), '
                           'or --calibrate.')
  elif problem := evaluation.output_dir_problem(output_dir):  # The WORKDIR/eval default.
    # Checked only when a catalogue will be written there: --calibrate alone writes beside the
    # checkpoint.
    raise SystemExit(f'FATAL --output_dir {output_dir}: {problem}')
  return output_dir, data_dir, splits, files, skipped


def _run_or_exit(fn, *args, **kwargs):
  try:
    return fn(*args, **kwargs)
  except _USER_ERRORS as e:
    # A problem of the checkpoint, the parts or the σ settings, not a bug: one line that says what is wrong.
    raise SystemExit(f'FATAL {e}') from None


def _calibrate(params, meta, data_dir, settings):
  # Every process fits the same numbers (same draws); process 0 alone stores them.
  record = evaluation.calibrate(params=params, meta=meta, data_dir=data_dir, settings=settings,
                                batch_size=FLAGS.batch_size, save=jax.process_index() == 0,
                                floor=FLAGS.calibration_floor)
  if jax.process_index() == 0:
    print(f'Calibration on {record["split"]} ({record["n"]["TEFF"]} stars), '
          'σ_cal² = (a σ)² + b² (b: median floor, its model): ' + calibration.describe(record))
    print(f'           stored in {record["path"]}')
  return record


def _report(out):
  if out['part']:
    print(f'Part:      {out["part"]} ({out["n_stars"]} stars, {out["n_skipped"]} skipped, '
          f'{out["seconds"]:.1f} s); when every part is done: '
          f'python evaluate.py --merge={epath.Path(out["part"]).parent} --output_dir=OUT')
    return
  if out['catalog_fits'] is None:  # Another process than 0 of a jax.distributed run.
    logging.info('Predicted %d stars; process 0 writes the catalogue.', out['n_stars'])
    return
  if out['metrics'] is not None:
    print(metrics.format_metrics(out['metrics']))
  run = out['table'].meta  # The run's settings, as the catalogue header records them.
  draws = f', mc={run["MC"]}, seed={run["SEED"]}' if out['sigma'] == 'mc' else ''
  print(f'{out["n_stars"]} stars in {out["seconds"]:.1f} s (sigma={out["sigma"]}{draws}, '
        f'error_cap={run["ERROR_CA"]}, σ calibration: '
        f'{"dev" if out["calibrated"] else "none"})')
  print(f'Catalogue: {out["catalog_fits"]}\n           {out["catalog_csv"]}')
  if out['metrics_json']:
    print(f'Metrics:   {out["metrics_json"]}')
  if out['skipped_csv']:
    print(f'Skipped:   {out["n_skipped"]} files, listed in {out["skipped_csv"]}')
  for path in out['figures']:
    print(f'Figure:    {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=config_validation.parse_flags)
