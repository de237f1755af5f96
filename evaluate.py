r"""Predict log g, Teff, [Fe/H] with Monte Carlo uncertainties and write the catalogue (§3.5–§4).

Labelled stars of the built data set (writes metrics.json, Tables 2–3, and all figures):

    python evaluate.py --workdir=workdirs/demo --data_dir=data/demo/tfds --split=test \
        --mc=100 --output_dir=workdirs/demo/eval

New, unlabelled apStar files (the common use; unreadable files go to OUT/skipped.csv):

    python evaluate.py --checkpoint=checkpoints/paper --apstar_dir=DIR --mc=100 --output_dir=OUT

Calibrate the σ on the dev split first (stored in the checkpoint directory as calibration.json;
every later run on that checkpoint applies it, ``--calibration=none`` shows the raw σ):

    python evaluate.py --workdir=workdirs/demo --data_dir=data/demo/tfds --calibrate --mc=100

``--workdir`` takes the best checkpoint of a training run, ``--checkpoint`` any orbax checkpoint
directory (e.g. one from ``python -m apogeenet_jax.convert_torch``). ``--error_cap=median`` (the
authors' code, default) or ``mean`` (the paper's text); ``--mc=0`` gives noiseless predictions and
empty σ columns. ``--uncertainty=linear`` replaces the draws by first-order propagation of the
same capped errors (12–20× faster than 100 draws; prediction = the noiseless forward pass).
``--split`` takes a comma-separated list (``train,dev,test``). OUT receives catalog.fits,
catalog.csv, metrics.json (labelled runs) and figures/*.png.
Intentionally short: the logic lives in ``apogeenet_jax.evaluation``.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from apogeenet_jax import checkpoint, evaluation, uncertainty

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training run: its best checkpoint is used.')
flags.DEFINE_string('checkpoint', None, 'Any orbax checkpoint directory of this package.')
flags.DEFINE_string('split', None, 'Split(s) of the built data set, comma-separated.')
flags.DEFINE_string('data_dir', None, 'tfds data dir of the built data set (default: the '
                    "--config's data_dir).")
flags.DEFINE_string('apstar_dir', None, 'Directory searched recursively for apStar files.')
flags.DEFINE_string('apstar_list', None, 'Text file with one apStar path per line.')
flags.DEFINE_integer('mc', uncertainty.PAPER_NUM_DRAWS, 'Monte Carlo draws per star; 0: none.')
flags.DEFINE_enum('uncertainty', 'mc', list(uncertainty.ESTIMATORS),
                  'mc: --mc noisy draws (paper); linear: first-order propagation of the same '
                  'capped errors, one forward + 3 backward passes (--mc unused unless 0).')
flags.DEFINE_enum('error_cap', 'median', list(uncertainty.ERROR_CAP_MODES),
                  'median: authors\' code (5× median, draw 0 noiseless); mean: paper text.')
flags.DEFINE_integer('seed', 0, 'PRNG seed of the draws: same seed, same catalogue.')
flags.DEFINE_string('output_dir', None, 'Where the catalogue, metrics and figures go '
                    '(default: WORKDIR/eval).')
flags.DEFINE_integer('batch_size', evaluation.DEFAULT_BATCH_SIZE, 'Stars per device batch.')
flags.DEFINE_integer('draw_chunk', evaluation.DEFAULT_DRAW_CHUNK,
                     'Draws evaluated together; device holds batch_size × draw_chunk spectra.')
flags.DEFINE_bool('figures', True, 'Draw the PNG figures.')
flags.DEFINE_bool('calibrate', False, 'Fit σ_cal² = (a σ)² + b² per label on the dev split and '
                  'store it with the checkpoint (then evaluate --split, if given).')
flags.DEFINE_enum('calibration', 'auto', list(evaluation.CALIBRATION_MODES),
                  "auto: apply the checkpoint's calibration when it has one; none: raw σ.")
config_flags.DEFINE_config_file('config', None, 'Optional training config: supplies data_dir.')
# Checked when the flags are parsed, before the checkpoint is loaded or a folder is made.
flags.register_validator('batch_size', lambda v: v >= 1, '--batch_size must be >= 1')
flags.register_validator('draw_chunk', lambda v: v >= 1, '--draw_chunk must be >= 1')
flags.register_validator('mc', lambda v: v >= 0, '--mc must be >= 0 (0: no Monte Carlo)')


@flags.validator('output_dir')
def _check_output_dir(value):
  problem = value and evaluation.output_dir_problem(value)
  if problem:
    raise flags.ValidationError(problem)
  return True


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
    raise app.UsageError('Give exactly one of --workdir or --checkpoint.')
  output_dir = FLAGS.output_dir or (os.path.join(FLAGS.workdir, 'eval') if FLAGS.workdir else None)
  if output_dir is None:
    raise app.UsageError('--output_dir is required with --checkpoint.')
  if problem := evaluation.output_dir_problem(output_dir):  # The WORKDIR/eval default.
    raise app.UsageError(f'--output_dir: {problem}')
  data_dir = FLAGS.data_dir or (FLAGS.config.data_dir if FLAGS.config else None)
  splits = [s.strip() for s in FLAGS.split.split(',') if s.strip()] if FLAGS.split else []
  files, skipped = evaluation.apstar_inputs(FLAGS.apstar_dir, FLAGS.apstar_list)
  if not splits and not files and not skipped and not FLAGS.calibrate:
    raise app.UsageError('Nothing to evaluate: give --split or --apstar_dir/--apstar_list '
                         '(an --apstar_dir without apStar-*.fits files counts as nothing), '
                         'or --calibrate.')
  try:
    params, meta = evaluation.load_checkpoint(workdir=FLAGS.workdir,
                                              checkpoint_dir=FLAGS.checkpoint)
  except checkpoint.CheckpointError as e:
    # A problem of the checkpoint, not a bug: one line that says what is wrong, no traceback.
    raise SystemExit(f'FATAL {e}') from None
  logging.info('Checkpoint %s, step %s, ensemble of %d.', meta['checkpoint_dir'],
               meta.get('step'), meta.get('ensemble_size', 1))
  if FLAGS.calibrate:
    record = evaluation.calibrate(
        params=params, meta=meta, data_dir=data_dir, mc=FLAGS.mc, error_cap=FLAGS.error_cap,
        seed=FLAGS.seed, batch_size=FLAGS.batch_size, draw_chunk=FLAGS.draw_chunk,
        estimator=FLAGS.uncertainty)
    meta['calibration'] = record
    print(f'Calibration on {record["split"]} ({record["n"]["TEFF"]} stars), '
          'σ_cal² = (a σ)² + b²: ' + ', '.join(
              f'{n} a={record["a"][n]:.3g} b={record["b"][n]:.3g}' for n in record['a']))
    print(f'           stored in {record["path"]}')
    if not splits and not files:
      return
  out = evaluation.evaluate(
      params=params, meta=meta, output_dir=output_dir, splits=splits, data_dir=data_dir,
      apstar_files=files, mc=FLAGS.mc, error_cap=FLAGS.error_cap, seed=FLAGS.seed,
      batch_size=FLAGS.batch_size, draw_chunk=FLAGS.draw_chunk, make_figures=FLAGS.figures,
      calibration_mode=FLAGS.calibration, estimator=FLAGS.uncertainty, skipped_files=skipped)
  if out['metrics'] is not None:
    print(evaluation.format_metrics(out['metrics']))
  draws = f', mc={FLAGS.mc}, seed={FLAGS.seed}' if out['sigma'] == 'mc' else ''
  print(f'{out["n_stars"]} stars in {out["seconds"]:.1f} s (sigma={out["sigma"]}{draws}, '
        f'error_cap={FLAGS.error_cap}, σ calibration: '
        f'{"dev" if out["calibrated"] else "none"})')
  print(f'Catalogue: {out["catalog_fits"]}\n           {out["catalog_csv"]}')
  if out['metrics_json']:
    print(f'Metrics:   {out["metrics_json"]}')
  if out['skipped_csv']:
    print(f'Skipped:   {out["n_skipped"]} files, listed in {out["skipped_csv"]}')
  for path in out['figures']:
    print(f'Figure:    {path}')


if __name__ == '__main__':
  app.run(main)
