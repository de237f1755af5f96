r"""Builds the `apogee` TFDS data set without TensorFlow (array_record by default).

  python -m tfds_apogee.build --manual_dir=M --data_dir=D \
      [--file_format=array_record|tfrecord] [--split_seed=0] [--num_workers=N] [--overwrite] \
      [--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,...]

Calls the same Builder.download_and_prepare as `tfds build tfds_apogee/apogee` (which needs
TensorFlow), then logs where the data set went and how many files or rows were skipped; the list
is in <data set dir>/skipped.csv. tfrecord writing needs TensorFlow installed.

With --beam_pipeline_options (comma-separated Beam flags without the leading --, as for `tfds
build`) the files are read in an Apache Beam pipeline instead of --num_workers local processes:
the DirectRunner here, or Dataflow/Spark/Flink; this needs the `tfds` extra (apache-beam). See
docs/building_at_scale.md.

A data set already in data_dir is reused only if it was built from the same inputs (catalogue
bytes, split seed, size and mtime of each apStar file used); otherwise the build stops with
StaleDatasetError, and --overwrite deletes the old data set and builds it again. A build that
yields nothing usable (no catalogue row matches a file, a split without one readable file) stops
with one line, and the skip report goes to <data_dir>/skipped-failed-build.csv. Reader processes
exit with the build process, however it ends (SIGTERM, kill -9).
"""

import logging as std_logging
import os
import re
import signal

import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath

from apogeenet_jax import labels
from tfds_apogee.apogee import apogee_dataset_builder


def beam_options(beam_pipeline_options: str):
  """'runner=DirectRunner,direct_num_workers=2' → Beam PipelineOptions, as `tfds build` parses
  its --beam_pipeline_options. Imports apache_beam: only called on the Beam path."""
  try:
    from apache_beam.options import pipeline_options
  except ImportError as e:
    raise ImportError(f'--beam_pipeline_options={beam_pipeline_options!r} needs Apache Beam: '
                      f"pip install 'apogeenet-jax[tfds]' ({e})") from e
  opts = [opt.strip() for opt in beam_pipeline_options.split(',') if opt.strip()]
  bad = [opt for opt in opts if not _BEAM_OPTION.match(opt)]
  if bad or not opts:
    raise ValueError(f'--beam_pipeline_options={beam_pipeline_options!r}: '
                     + (f'{bad} not of the form name=value' if bad else 'no option given')
                     + ', e.g. runner=DirectRunner,direct_num_workers=2')
  options = pipeline_options.PipelineOptions(flags=[f'--{opt}' for opt in opts])
  runner_name = options.view_as(pipeline_options.StandardOptions).runner
  if runner_name:
    from apache_beam.runners import runner
    try:  # Now, not after the catalogue and the file scan.
      runner.create_runner(runner_name)
    except (ValueError, ImportError) as e:
      raise ValueError(f'--beam_pipeline_options: {e}') from None
  return options


_BEAM_OPTION = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(=.*)?$')


def build(manual_dir: str, data_dir: str, file_format: str = 'array_record',
          split_seed: int = 0, num_workers: int = 1, overwrite: bool = False,
          beam_pipeline_options: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds (or reuses, when its inputs are unchanged) the data set and returns its builder.

  overwrite: delete a data set already in data_dir and build it again.
  beam_pipeline_options: read the files in an Apache Beam pipeline with these options
    (tfds.download.DownloadConfig(beam_options=...)) instead of num_workers local processes.
  manual_dir is a local folder (or a mounted bucket): astropy reads the apStar files by path, on
  the Beam path in the Beam workers, which must see it at the same path. data_dir too, for
  array_record, whose writer opens local files only; a gs:// data_dir needs tfrecord (and
  TensorFlow). The skip report is read through etils.epath like the rest of TFDS's files.
  """
  builder = apogee_dataset_builder.Builder(data_dir=data_dir, split_seed=split_seed,
                                           num_workers=num_workers, file_format=file_format)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir,
          download_mode=(tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
                         else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS),
          beam_options=(beam_options(beam_pipeline_options) if beam_pipeline_options
                        else None)))
  return builder


class Terminated(BaseException):
  """SIGTERM during a build: raised in the main thread so that every cleanup runs (TFDS removes
  its incomplete.* folder, and the Beam work files in it; --overwrite puts the old data set
  back). BaseException: no ``except Exception`` on the way may swallow it."""


_SIGTERM_SEEN = []  # Beam wraps the exception it meets in its own: the flag says it was ours.


def _raise_terminated(signum, frame):
  del signum, frame
  _SIGTERM_SEEN.append(True)
  # What the pipeline logs as it unwinds (Beam logs the exception with its traceback before it
  # wraps it) says nothing the FATAL line does not: the build is stopping.
  std_logging.disable(std_logging.ERROR)
  raise Terminated()


def _check_flags(f) -> None:
  """The flags' own problems, before anything is read: one line each."""
  if f.beam_pipeline_options:
    try:
      beam_options(f.beam_pipeline_options)
    except (ImportError, ValueError) as e:
      raise SystemExit(f'FATAL {e}') from None
  if not os.path.isdir(f.manual_dir):
    raise SystemExit(f'FATAL --manual_dir {f.manual_dir}: '
                     f'{"not a directory" if os.path.exists(f.manual_dir) else "no such directory"}')
  if '://' not in f.data_dir and os.path.exists(f.data_dir) and not os.path.isdir(f.data_dir):
    raise SystemExit(f'FATAL --data_dir {f.data_dir}: exists and is not a directory')


def main(argv):
  del argv
  f = flags.FLAGS
  signal.signal(signal.SIGTERM, _raise_terminated)
  _check_flags(f)
  try:
    builder = build(f.manual_dir, f.data_dir, f.file_format, f.split_seed, f.num_workers,
                    overwrite=f.overwrite, beam_pipeline_options=f.beam_pipeline_options)
  except apogee_dataset_builder.StaleDatasetError as e:
    raise app.UsageError(str(e)) from None
  except (apogee_dataset_builder.BuildError, labels.LabelCatalogError) as e:
    # Problems of the inputs, not bugs: one line that says what is wrong.
    raise SystemExit(f'FATAL {e}') from None
  except BaseException:
    if not _SIGTERM_SEEN:
      raise
    raise SystemExit(f'FATAL build stopped by SIGTERM: its temporary files were removed and '
                     f'{f.data_dir} holds what it held before') from None
  report = epath.Path(builder.data_dir) / apogee_dataset_builder.SKIP_REPORT
  n_skipped = len(labels.read_problems(report)) if report.exists() else 0
  counts = {name: split.num_examples for name, split in builder.info.splits.items()}
  logging.info('apogee data set at %s: %s examples; %d skipped file(s)/row(s), see %s',
               builder.data_dir, counts, n_skipped, report)
  print(f'apogee data set: {builder.data_dir}\nexamples: {counts}\n'
        f'skipped: {n_skipped} (report: {report})')
  missing = [s for s in ('train', 'dev') if s not in counts]
  if missing:
    print(f'warning: no {" and no ".join(missing)} split: train.py and evaluate.py --calibrate '
          f'need both; add stars (or SPLIT values) to the catalogue and rebuild with --overwrite')


def run():
  """Entry point. Flags are defined here, not at import, so library users can import build()."""
  flags.DEFINE_string('manual_dir', None, 'Catalogue + apStar files (docs/data.md).')
  flags.DEFINE_string('data_dir', None, 'Where TFDS data sets go.')
  flags.DEFINE_enum('file_format', apogee_dataset_builder.DEFAULT_FILE_FORMAT,
                    ['array_record', 'tfrecord'], 'Record file format (tfrecord needs TensorFlow).')
  flags.DEFINE_integer('split_seed', 0, 'Seed of the hashed train/dev/test split.')
  flags.DEFINE_integer('num_workers', os.cpu_count() or 1, 'Processes reading apStar files.')
  flags.DEFINE_bool('overwrite', False, 'Delete a data set already in data_dir and rebuild it '
                    '(needed when the catalogue or the apStar files changed since it was built).')
  flags.DEFINE_string('beam_pipeline_options', None,
                      'Read the files in an Apache Beam pipeline with these comma-separated Beam '
                      'options, as for `tfds build`, e.g. "runner=DirectRunner,direct_num_workers=2,'
                      'direct_running_mode=multi_processing" (needs the tfds extra); without it, '
                      '--num_workers local processes.')
  flags.mark_flags_as_required(['manual_dir', 'data_dir'])
  app.run(main)


if __name__ == '__main__':
  run()
