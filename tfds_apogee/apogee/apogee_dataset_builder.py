"""TFDS builder `apogee`: APOGEE apStar spectra + a label catalogue → sharded records.

Reads a manual_dir (the label catalogue labels.{fits,ecsv,csv} at its top, apStar files anywhere
below; see apogeenet_jax/labels.py) and writes array_record shards by default, so training reads
them without TensorFlow through `tfds.data_source('apogee', data_dir=D)` and grain. Flux and
error are stored RAW, exactly as in the files (preprocessing happens at read time).

Splits train/dev/test: the catalogue's SPLIT column where given, else a hash of (split_seed,
APOGEE ID) with the paper's fractions per data type (Payne 80/10/10, MStar and YSO 60/20/20, §3).
A file that cannot be read is skipped, never fatal: every skipped file or catalogue row and its
reason goes to `skipped.csv` in the data set version directory, and the count is logged.

Two ways to read the files, same examples, same skip report, same metadata:
  * locally (the default): a process pool on this machine, TensorFlow-free;
  * through Apache Beam, when the download config names a Beam runner or Beam options
    (`tfds build ... --beam_pipeline_options=...`, or `python -m tfds_apogee.build
    --beam_pipeline_options=...`): each split is a Beam pipeline, so the DirectRunner spreads the
    reading over local processes and Dataflow/Spark/Flink over many machines. See
    docs/building_at_scale.md.
"""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import pathlib
import threading
import time
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from apogeenet_jax import apstar, constants, file_io, labels, workdir_lock

SKIP_REPORT = 'skipped.csv'
# Beam path: task lists and unreadable-file reports, inside TFDS's temporary data directory (so
# on gs:// when data_dir is), merged into SKIP_REPORT and deleted once the pipeline has run.
_BEAM_WORK_DIR = '_beam_work'
DEFAULT_FILE_FORMAT = 'array_record'
# Files handed to the reader processes at a time, per process (bounds memory, keeps them busy).
_WINDOW_PER_WORKER = 256

_EXACT = tfds.features.Encoding.BYTES

# Largest |flux| a spectrum may hold: one of the rules of ``apstar.spectrum_problem``, which the
# build and inference share. Such a file is skipped, with the reason.
FLUX_LIMIT = apstar.FLUX_LIMIT
# Where a build that fails for want of readable files leaves its report, in data_dir.
FAILED_SKIP_REPORT = 'skipped-failed-build.csv'
# The photometric features of APOGEE Net II (version 1.1.0 on): (7,) float32 each, in
# constants.METADATA_COLUMNS order, NaN where the catalogue has no value or no such column.
METADATA_FEATURE, METADATA_ERR_FEATURE = 'metadata', 'metadata_err'


class StaleDatasetError(RuntimeError):
  """A data set exists in data_dir but was built from other inputs than manual_dir holds now."""


class BuildError(RuntimeError):
  """The inputs make no usable data set: no catalogue row matches a file, or a split has no
  readable file."""


def input_fingerprint(catalog: pathlib.Path, matched: list[tuple[labels.LabelledStar, str]],
                      root: pathlib.Path, split_seed: int) -> str:
  """sha256 of what a build reads: catalogue bytes, split seed, each used file's size and mtime.

  Sizes and mtimes, not contents: hashing a survey's 650k files would cost as much as the build.
  """
  h = hashlib.sha256()
  h.update(catalog.read_bytes())
  files = []
  for _, path in matched:
    stat = pathlib.Path(path).stat()  # not os.stat: builder code stays filesystem-agnostic
    # relpath, not labels.relative_path: string work only, no resolve() per file.
    files.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns))
  h.update(json.dumps({'split_seed': split_seed, 'files': files}).encode())
  return h.hexdigest()


def exit_with_parent(parent: int) -> None:
  """Reader-process initializer: exits when the build process is gone (SIGTERM, kill -9), so no
  reader is left behind, and with the readers gone multiprocessing's resource tracker exits too."""

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(target=watch, daemon=True, name='exit-with-parent').start()


def read_example(task: tuple[str, str, tuple, str]) -> tuple[str, dict | None, str | None]:
  """Reads one apStar file into a TFDS example; never raises.

  Args:
    task: (absolute path, path relative to manual_dir, catalogue row fields (APOGEE ID, labels,
      data type, metadata, metadata error; the last two may be absent: NaN), split).

  Returns:
    (apogee_id, example or None, reason or None).
  """
  path, relative, fields, _ = task
  apogee_id, star_labels, data_type = fields[:3]
  metadata, metadata_err = (*fields[3:5], *[None] * (5 - max(len(fields), 3)))
  try:
    spectrum = apstar.read_apstar(path)
  except apstar.ApStarError as e:
    return apogee_id, None, str(e)
  except Exception as e:  # One odd file must never kill a survey-sized build.
    return apogee_id, None, f'{path}: unexpected {type(e).__name__}: {e}'
  if problem := apstar.spectrum_problem(spectrum.flux, spectrum.flux_err):
    return apogee_id, None, f'{path}: {problem}'  # The same rules as at inference.
  if spectrum.apogee_id != apogee_id:
    return apogee_id, None, (f'{path}: header APOGEE ID {spectrum.apogee_id} differs from the '
                             f'catalogue APOGEE_ID {apogee_id}')
  example = {
      'flux': spectrum.flux,
      'flux_err': spectrum.flux_err,
      'labels': np.asarray(star_labels, np.float32),
      'apogee_id': apogee_id,
      'data_type': data_type,
      'snr': np.float32(spectrum.snr),
      'ra': np.float64(spectrum.ra),
      'dec': np.float64(spectrum.dec),
      'telescope': spectrum.telescope,
      'field': spectrum.field,
      'file': relative,
      'metadata': _metadata_vector(metadata),
      'metadata_err': _metadata_vector(metadata_err),
  }
  return apogee_id, example, None


def _metadata_vector(values) -> np.ndarray:
  """(7,) float32 in METADATA_COLUMNS order; all NaN when the catalogue had none (None)."""
  if values is None:
    return np.full(len(constants.METADATA_COLUMNS), np.nan, np.float32)
  return np.asarray(values, np.float32).reshape(len(constants.METADATA_COLUMNS))


def _floats(values) -> tuple[float, ...] | None:
  """A catalogue row's metadata as plain floats (the Beam path's task lines are JSON)."""
  return None if values is None else tuple(float(x) for x in values)


def _photometry_metadata(stars) -> dict[str, list[str]]:
  """metadata.json's record of the photometry columns, and which of them hold any value."""
  with_values = [any(s.metadata is not None and np.isfinite(s.metadata[j]) for s in stars)
                 for j in range(len(constants.METADATA_COLUMNS))]
  return {'metadata_columns': list(constants.METADATA_COLUMNS),
          'metadata_columns_with_values': [
              c for c, v in zip(constants.METADATA_COLUMNS, with_values, strict=True) if v]}


class Builder(tfds.core.GeneratorBasedBuilder):
  """APOGEE apStar spectra with (log g, Teff, [Fe/H]) labels."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      '1.0.0': 'Initial release: raw flux, flux error, labels, metadata.',
      '1.1.0': ('Photometry for APOGEE Net II: features `metadata` and `metadata_err` (7 float32: '
                'PLX mas, G, BP, RP, J, H, K mag) from the optional catalogue columns PLX … K and '
                'PLX_ERR … K_ERR; NaN where missing, 99.999 kept as given. 1.0.0 records (without '
                'them) still read for APOGEE Net I.'),
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the label catalogue at the top of manual_dir as labels.fits, labels.ecsv or labels.csv with
  columns APOGEE_ID, LOGG, TEFF, FE_H, DATA_TYPE (Payne/MStar/YSO) and optionally SPLIT
  (train/dev/test), FILE (apStar path relative to manual_dir) and the photometry of APOGEE Net II
  (PLX, G, BP, RP, J, H, K and PLX_ERR … K_ERR). Put the apStar files
  (apStar-<reduction>-<APOGEE_ID>.fits[.gz] or asStar-…) anywhere below manual_dir, e.g. as
  SDSS lays them out: <telescope>/<field>/apStar-r8-2M….fits. No data at hand?
  `python -m apogeenet_jax.synthetic --output_dir=M` writes a SYNTHETIC survey in this layout.
  """

  @tfds_utils.classproperty
  @classmethod
  def _checksums_path(cls):
    # Nothing is downloaded (manual data only), so there are no checksums to look up; TFDS's
    # lookup would import importlib_resources, which is not a dependency without TensorFlow.
    return None

  def __init__(self, *, split_seed: int = 0, num_workers: int = 1,
               file_format: str | None = None, **kwargs):
    """split_seed: seed of the hashed split assignment; num_workers: reader processes."""
    self._split_seed = int(split_seed)
    self._num_workers = max(int(num_workers), 1)
    self._explicit_file_format = file_format
    self._problems: list[labels.Problem] = []
    self._n_unreadable = 0
    self._use_beam = False
    self._task_rank: dict[str, int] = {}
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    n = constants.N_PIXELS
    # Description and citation: README.md and CITATIONS.bib beside this module.
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'flux': tfds.features.Tensor(shape=(n,), dtype=np.float32,
                                         doc='raw combined flux, 1e-17 erg/s/cm^2/Angstrom'),
            'flux_err': tfds.features.Tensor(shape=(n,), dtype=np.float32,
                                             doc='raw flux error; 1e10 marks bad pixels'),
            'labels': tfds.features.Tensor(shape=(len(constants.LABEL_NAMES),),
                                           dtype=np.float32,
                                           doc='LOGG (dex), TEFF (K), FE_H (dex)'),
            'apogee_id': tfds.features.Text(),
            'data_type': tfds.features.ClassLabel(names=constants.DATA_TYPES),
            'snr': tfds.features.Scalar(dtype=np.float32, doc='header SNR'),
            # BYTES: the default encoding goes through a float32 proto field and would round RA
            # and Dec to ~0.05 arcsec; raw bytes keep float64 exact.
            'ra': tfds.features.Tensor(shape=(), dtype=np.float64, encoding=_EXACT,
                                       doc='deg J2000'),
            'dec': tfds.features.Tensor(shape=(), dtype=np.float64, encoding=_EXACT,
                                        doc='deg J2000'),
            'telescope': tfds.features.Text(),
            'field': tfds.features.Text(),
            'file': tfds.features.Text(doc='apStar path relative to manual_dir'),
            METADATA_FEATURE: tfds.features.Tensor(
                shape=(len(constants.METADATA_COLUMNS),), dtype=np.float32,
                doc='PLX (mas), G, BP, RP, J, H, K (mag); NaN missing, >= 98 catalogue missing'),
            METADATA_ERR_FEATURE: tfds.features.Tensor(
                shape=(len(constants.METADATA_COLUMNS),), dtype=np.float32,
                doc='errors of metadata, same order and units; NaN where missing'),
        }),
        supervised_keys=('flux', 'labels'),
        homepage='https://www.sdss4.org/dr14/irspec/',
        metadata=tfds.core.MetadataDict(),
    )

  def download_and_prepare(self, *, file_format=None, **kwargs):
    # TFDS defaults to tfrecord, which needs TensorFlow to write and to read; array_record does
    # not, so it is this data set's default unless the caller asked for a format.
    if file_format is None and self._explicit_file_format is None:
      file_format = DEFAULT_FILE_FORMAT
    config = kwargs.get('download_config')
    if config is None or not config.manual_dir or file_io.is_remote(self._data_dir_root):
      return super().download_and_prepare(file_format=file_format, **kwargs)
    # One build per data folder at a time: a second one stops at once, naming the first.
    try:
      lock = workdir_lock.hold(os.fspath(self.data_path.parent), what='data set build',
                               change='give another --data_dir')
      lock.__enter__()
    except workdir_lock.WorkdirLockedError as e:
      raise BuildError(str(e)) from None
    except OSError as e:
      raise BuildError(f'{self.data_path.parent}: cannot create the data folder ({e})') from None
    try:
      if not self.data_path.exists():
        return super().download_and_prepare(file_format=file_format, **kwargs)
      if not config.download_mode.overwrite_dataset:
        self._check_inputs_unchanged(pathlib.Path(config.manual_dir))
        return super().download_and_prepare(file_format=file_format, **kwargs)
      return self._replace_keeping_the_old_until_done(file_format, kwargs)
    finally:
      lock.__exit__(None, None, None)

  def _replace_keeping_the_old_until_done(self, file_format, kwargs):
    """--overwrite: the inputs are checked first, then the old data set moves aside and comes
    back if the new build fails for any reason; it is deleted only once the new one is in
    place. A failed build never removes a good one."""
    manual_dir = pathlib.Path(kwargs['download_config'].manual_dir)
    catalog = labels.find_catalog(manual_dir)
    stars = labels.read_label_catalog(catalog)
    if not labels.match_files(stars, manual_dir)[0]:
      raise BuildError(f'{catalog}: none of the {len(stars)} catalogue rows matched an apStar '
                       f'file below {manual_dir}; the data set in {self.data_path} is kept')
    old = self.data_path.parent / f'.{self.data_path.name}.replaced-{os.getpid()}'
    self.data_path.rename(old)
    try:
      result = super().download_and_prepare(file_format=file_format, **kwargs)
    except BaseException:
      if self.data_path.exists():
        self.data_path.rmtree()
      old.rename(self.data_path)
      logging.warning('apogee: the build failed; the earlier data set is back in %s',
                      self.data_path)
      raise
    old.rmtree()
    return result

  def _check_inputs_unchanged(self, manual_dir: pathlib.Path) -> None:
    """TFDS reuses any data set it finds; refuse one whose inputs have changed since."""
    catalog = labels.find_catalog(manual_dir)
    matched, _ = labels.match_files(labels.read_label_catalog(catalog), manual_dir)
    now = input_fingerprint(catalog, matched, manual_dir.resolve(), self._split_seed)
    built = self.info.metadata.get('input_fingerprint') if self.info.metadata else None
    if now != built:
      why = ('has no record of its inputs' if built is None else
             'was built from other inputs (label catalogue, apStar files or split seed) than')
      raise StaleDatasetError(
          f'{self.data_path}: this data set {why} {manual_dir} now holds. Rebuild it with '
          f'--overwrite (python -m tfds_apogee.build ... --overwrite), which deletes it, or '
          f'give another --data_dir.')

  def _download_and_prepare(self, dl_manager, download_config=None):
    self._problems = []
    self._n_unreadable = 0
    # TFDS runs a Beam pipeline when the caller gave a runner or options (`tfds build
    # --beam_pipeline_options=...`); _generate_examples then returns Beam transforms.
    self._use_beam = download_config is not None and bool(
        download_config.beam_runner or download_config.beam_options)
    self._task_rank = {}
    super()._download_and_prepare(dl_manager, download_config)
    if self._use_beam:  # The pipeline has run: gather what its workers could not read.
      self._collect_beam_skips()
    # Still inside TFDS's temporary data directory: the report moves with the finished data set.
    report = epath.Path(self.data_dir) / SKIP_REPORT  # data_dir may be gs://…
    labels.write_problems(self._problems, report)
    # DatasetInfo (metadata.json) is written after this method returns, so the counts land there.
    self.info.metadata['n_problems'] = len(self._problems)
    self.info.metadata['n_unreadable_files'] = self._n_unreadable
    logging.info('apogee: %d problem(s) (skipped files or rows), %d of them unreadable files; '
                 'report: %s', len(self._problems), self._n_unreadable, report.name)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    catalog = labels.find_catalog(manual_dir)
    stars = labels.read_label_catalog(catalog)
    matched, problems = labels.match_files(stars, manual_dir)
    self._problems.extend(problems)
    if not matched:
      report = self._write_failed_report()
      raise BuildError(f'{catalog}: none of the {len(stars)} catalogue rows matched an apStar file '
                       f'below {manual_dir} (by FILE or by the ID in the file name); the reasons '
                       f'are in {report}')
    logging.info('apogee: catalogue %s: %d rows, %d matched to files, %d problem(s) in matching',
                 catalog, len(stars), len(matched), len(problems))
    tasks = {split: [] for split in constants.SPLITS}
    root = manual_dir.resolve()
    for star, path in matched:
      split = star.split or labels.assign_split(star.apogee_id, star.data_type, self._split_seed)
      tasks[split].append((path, labels.relative_path(path, root),
                           (star.apogee_id, tuple(float(x) for x in star.labels),
                            star.data_type, _floats(star.metadata), _floats(star.metadata_err)),
                           split))
    # The order in which the local path meets unreadable files (split by split, catalogue order
    # within each): the Beam path's reports come back in any order and are sorted by it.
    self._task_rank = {task[1]: i for i, task in
                       enumerate(t for split in constants.SPLITS for t in tasks[split])}
    self.info.metadata['split_seed'] = self._split_seed
    self.info.metadata['catalog'] = catalog.name
    self.info.metadata['input_fingerprint'] = input_fingerprint(catalog, matched, root,
                                                                self._split_seed)
    self.info.metadata['label_names'] = list(constants.LABEL_NAMES)
    self.info.metadata['label_units'] = list(constants.LABEL_UNITS)
    self.info.metadata.update(_photometry_metadata([star for star, _ in matched]))
    empty = [s for s, t in tasks.items() if not t]
    if empty:
      logging.warning('apogee: no stars in split(s) %s; they are left out (training and '
                      'evaluate.py --calibrate need a dev split)', empty)
    self.info.metadata['empty_splits'] = empty
    return {split: self._generate_examples(t, split) for split, t in tasks.items() if t}

  def _write_failed_report(self) -> epath.Path:
    """The skip report of a build that stops: in data_dir, as TFDS removes its temporary
    folder."""
    report = epath.Path(self._data_dir_root) / FAILED_SKIP_REPORT
    labels.write_problems(self._problems, report)
    return report

  def _generate_examples(self, tasks, split: str = ''):
    """(APOGEE ID, example) pairs of one split; unreadable files land in the skip report instead.

    A generator (local reader processes), or with Beam a PTransform that TFDS runs in its
    pipeline.
    """
    if self._use_beam:
      return self._beam_generate(tasks, split)
    return self._generate_local(tasks, split)

  def _beam_generate(self, tasks, split: str):
    work = epath.Path(self.data_dir) / _BEAM_WORK_DIR  # data_dir may be gs://…: workers see it.
    work.mkdir(parents=True, exist_ok=True)
    tasks_file = work / f'tasks-{split}.jsonl'
    tasks_file.write_text(''.join(json.dumps(task) + '\n' for task in tasks))
    logging.info('apogee: split %s: %d files to read through Beam', split, len(tasks))
    # Imported here: only the Beam path imports apache_beam. And by its package name, whatever
    # name this module was loaded under (`tfds build tfds_apogee/apogee` loads it as
    # `apogee.apogee_dataset_builder`): Beam's workers import what it pickles by that name.
    from tfds_apogee import beam_generation

    return beam_generation.read_split(os.fspath(tasks_file), os.fspath(work / f'skipped-{split}'))

  def _collect_beam_skips(self) -> None:
    """Unreadable files reported by the Beam workers → self._problems, in the local path's order."""
    work = epath.Path(self.data_dir) / _BEAM_WORK_DIR
    skipped = []
    for shard in sorted(work.glob('skipped-*.jsonl')):
      for line in shard.read_text().splitlines():
        if line:
          skipped.append(labels.Problem(*json.loads(line)))
    skipped.sort(key=lambda p: self._task_rank[p.file])
    self._problems.extend(skipped)
    self._n_unreadable += len(skipped)
    work.rmtree()

  def _generate_local(self, tasks, split: str):
    """Yields (APOGEE ID, example) from the local reader processes."""
    n = 0
    for key_example in self._read_all(tasks):
      n += 1
      yield key_example
    if n == 0:
      # TFDS would stop with a bare AssertionError on the empty split, and no report.
      report = self._write_failed_report()
      raise BuildError(f'the {split!r} split has no readable file: none of its {len(tasks)} '
                       f'file(s) could be read; the reasons are in {report}')

  def _read_all(self, tasks):
    if self._num_workers > 1 and len(tasks) > 1:
      # Parsing FITS is CPU-bound Python: processes, not threads. 'spawn', not 'fork': the
      # caller may have started JAX's or TensorFlow's threads, and forking a multithreaded
      # process can deadlock the child.
      context = multiprocessing.get_context('spawn')
      with concurrent.futures.ProcessPoolExecutor(
          self._num_workers, mp_context=context, initializer=exit_with_parent,
          initargs=(os.getpid(),)) as pool:
        # Executor.map would submit every file at once and hold every finished spectrum in
        # memory (~70 kB each: 18 GB for DR14) while the writer catches up: go window by window.
        window = _WINDOW_PER_WORKER * self._num_workers
        for start in range(0, len(tasks), window):
          chunk = tasks[start:start + window]
          results = pool.map(read_example, chunk, chunksize=16)
          yield from self._keep_good(chunk, results)
    else:
      yield from self._keep_good(tasks, map(read_example, tasks))

  def _keep_good(self, tasks, results):
    for task, (apogee_id, example, reason) in zip(tasks, results, strict=True):
      if example is None:
        self._problems.append(labels.Problem(task[1], apogee_id, reason))
        self._n_unreadable += 1
        logging.warning('apogee: skipped %s', reason)
        continue
      yield apogee_id, example
