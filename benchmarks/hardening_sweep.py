r"""The hostile-user sweep: every case of the third hardening pass, on a fresh clone, one line each.
Usage: python benchmarks/hardening_sweep.py [--repo=.] [--work=/tmp/sweep] [--timeout=180].
Clones ``--repo`` (its checked-out commit) into ``--work``, writes a small synthetic survey, builds
it, makes a tiny checkpoint, then runs each command of the pass — special files named like apStar
files, a failed ``--overwrite``, outputs that are not the program's, empty or absurd spectra, NaN
pixels, bad config fields, bad flags, a killed build, … — each in its own process with a time
limit and an 8 GB memory limit, and prints ``OK`` or ``FAIL``, the case and what it saw: one line
per case, then the count. Every process that fails must end with one ``FATAL``/flag-error line
and no traceback; nothing may hang. Special files are made inside ``--work`` (a link to /dev/zero,
FIFOs); an output over a device node is tried on a FIFO, never on /dev/full. Real apStar files
(``APOGEENET_APSTAR_DIR``, default ../shared/data/apstar beside the checkout, where the tests
find them) add the information_limit case.
Prints figures; asserts nothing.
"""

import argparse
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

_MEMORY_LIMIT, _RESULTS = 8 << 30, []


def _limit_memory():
  resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, _MEMORY_LIMIT))


class Sweep:
  """The clone, its survey and checkpoint, and the way to run a command in them."""

  def __init__(self, repo: pathlib.Path, work: pathlib.Path, timeout: float):
    self.work, self.timeout = work, timeout
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    self.clone = work / 'clone'
    subprocess.run(['git', 'clone', '--quiet', str(repo), str(self.clone)], check=True)
    self.env = {**os.environ, 'PYTHONPATH': str(self.clone), 'JAX_PLATFORMS': 'cpu'}
    self.env.pop('XLA_FLAGS', None)

  def run(self, *args: str, timeout: float | None = None) -> dict:
    """Runs python ``args`` in the clone; {'rc', 'out', 'err', 'hung', 'seconds'}."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=self.clone, env=self.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_limit_memory, start_new_session=True)
    try:
      out, err = proc.communicate(timeout=timeout or self.timeout)
      hung = False
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      out, err = proc.communicate()
      hung = True
    return {'rc': proc.returncode, 'out': out, 'err': err, 'hung': hung,
            'seconds': time.perf_counter() - t0}


def report(name: str, ok: bool, detail: str) -> None:
  _RESULTS.append(ok)
  print(f'{"OK  " if ok else "FAIL"} {name}: {" ".join(detail.split())[:300]}', flush=True)


def one_line_error(result: dict) -> tuple[bool, str]:
  """A failed command that ends with one FATAL or flag-error line and no traceback."""
  lines = [line for line in result['err'].strip().splitlines() if line.strip()]
  last = lines[-1] if lines else ''
  fatal = sum(line.startswith('FATAL') for line in lines)
  ok = (not result['hung'] and result['rc'] not in (0, None) and 'Traceback' not in result['err']
        and (last.startswith('FATAL') or 'Flags parsing error' in result['err']
             or last.startswith('Pass --helpshort')) and fatal <= 1)
  why = 'hung' if result['hung'] else f'rc {result["rc"]}, {fatal} FATAL line(s)'
  return ok, f'{why}: {last}'


def expect_error(sweep: Sweep, name: str, args: list[str], message: str, **kwargs) -> None:
  result = sweep.run(*args, **kwargs)
  ok, detail = one_line_error(result)
  report(name, ok and message in result['err'], detail)


_MAKE_CHECKPOINT = '''
import jax, jax.numpy as jnp, sys
from apogeenet_jax import checkpoint
from apogeenet_jax.constants import N_PIXELS
from apogeenet_jax.models.apogee_net import APOGEENet
from apogeenet_jax.normalization import PAPER_STANDARDIZER
model = APOGEENet(channels=(4, 4), hidden=(16,), flux_scaling=sys.argv[2])
params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, N_PIXELS)))['params']
manager = checkpoint.make_manager(sys.argv[1])
checkpoint.save(manager, 1, {'params': params}, checkpoint.make_meta(model, PAPER_STANDARDIZER))
'''

_EDIT_SPECTRUM = '''
import sys, numpy as np
from astropy.io import fits
src, dst, new_id, mode = sys.argv[1:5]
with fits.open(src) as hdul:
  hdul = fits.HDUList([h.copy() for h in hdul])
flux = hdul[1].data[0] if hdul[1].data.ndim == 2 else hdul[1].data
err = hdul[2].data[0] if hdul[2].data.ndim == 2 else hdul[2].data
if mode == 'one_good':
  keep = flux[2000]; flux[:] = 0; flux[2000] = keep; e = err[2000]; err[:] = 1e10; err[2000] = e
elif mode == 'few3e38':
  flux[2000:2010] = 3e38
elif mode == 'negative':
  flux[:] = -np.abs(flux)
elif mode == 'nan_pixels':
  flux[::80] = np.nan
else:
  flux *= np.float32(float(mode)); err *= np.float32(abs(float(mode)))
hdul[0].header['OBJID'] = new_id
hdul.writeto(dst, overwrite=True)
'''


def setup(sweep: Sweep) -> dict:
  """Survey, data set, checkpoints and an apStar folder with odd files; their paths."""
  w = sweep.work
  paths = {'manual': w / 'manual', 'data': w / 'tfds', 'ckpt': w / 'ckpt',
           'ckpt_raw': w / 'ckpt_raw', 'odd': w / 'odd'}
  steps = [sweep.run('-m', 'apogeenet_jax.synthetic', f'--output_dir={paths["manual"]}',
                     '--num_stars=40'),
           sweep.run('-m', 'tfds_apogee.build', f'--manual_dir={paths["manual"]}',
                     f'--data_dir={paths["data"]}', '--num_workers=1'),
           sweep.run('-c', _MAKE_CHECKPOINT, str(paths['ckpt']), 'log_median'),
           sweep.run('-c', _MAKE_CHECKPOINT, str(paths['ckpt_raw']), 'none')]
  for step in steps:
    if step['rc'] != 0:
      raise SystemExit(f'sweep setup failed: {step["err"][-2000:]}')
  files = sorted(paths['manual'].rglob('apStar-*.fits'))
  paths['good'] = files[0]
  odd = paths['odd']
  (odd / 'run#2').mkdir(parents=True)
  os.symlink(files[0], odd / 'run#2' / files[0].name)
  os.symlink('/dev/zero', odd / 'apStar-x-2M99000001+0000000.fits')
  os.mkfifo(odd / 'apStar-x-2M99000002+0000000.fits')
  for k, mode in enumerate(('one_good', 'negative', '1e-40', '1e28', 'few3e38', '1e-30')):
    new_id = f'2M9900001{k}+0000000'
    sweep.run('-c', _EDIT_SPECTRUM, str(files[1]), str(odd / f'apStar-r8-{new_id}.fits'),
              new_id, mode)
  return paths


# ------------------------------------------------------------------------------------------------
# The cases.


def _skipped(path: pathlib.Path) -> dict[str, str]:
  import csv
  if not path.exists():
    return {}
  reasons = {}
  with open(path, newline='') as f:
    for row in csv.DictReader(f):  # A file may have several reasons: all of them, joined.
      name = os.path.basename(row['file'])
      reasons[name] = f'{reasons[name]}; {row["reason"]}' if name in reasons else row['reason']
  return reasons


def _version_dir(data_dir: pathlib.Path) -> pathlib.Path:
  """DATA_DIR/apogee/<version> of the one data set built there (any version)."""
  found = sorted(data_dir.glob('apogee/*/dataset_info.json'))
  return found[0].parent if found else data_dir / 'apogee' / 'missing'


def special_files(sweep: Sweep, paths: dict) -> None:
  """Severe 1: /dev/zero and FIFOs named like apStar files, in every reader."""
  manual = sweep.work / 'manual_zero'
  shutil.copytree(paths['manual'], manual, symlinks=True)
  victim = sorted(manual.rglob('apStar-*.fits'))[3]
  victim.unlink()
  os.symlink('/dev/zero', victim)
  result = sweep.run('-m', 'tfds_apogee.build', f'--manual_dir={manual}',
                     f'--data_dir={sweep.work}/tfds_zero', '--num_workers=2')
  reason = _skipped(_version_dir(sweep.work / 'tfds_zero') / 'skipped.csv').get(
      victim.name, '')
  report('build: /dev/zero link among the apStar files', result['rc'] == 0 and
         'character device' in reason, f'rc {result["rc"]}, {result["seconds"]:.0f} s: {reason}')
  out = sweep.work / 'eval_odd'
  result = sweep.run('evaluate.py', f'--checkpoint={paths["ckpt"]}', f'--apstar_dir={paths["odd"]}',
                     '--mc=4', f'--output_dir={out}', '--figures=false')
  skipped = _skipped(out / 'skipped.csv')
  for name, kind in (('apStar-x-2M99000001+0000000.fits', 'character device'),
                     ('apStar-x-2M99000002+0000000.fits', 'FIFO')):
    report(f'evaluate --apstar_dir: {kind} named like an apStar file',
           result['rc'] == 0 and kind in skipped.get(name, ''),
           f'rc {result["rc"]}: {skipped.get(name, result["err"][-200:])}')
  listing = sweep.work / 'list.txt'
  listing.write_text(f'{paths["odd"]}/apStar-x-2M99000001+0000000.fits\n{paths["good"]}\n')
  result = sweep.run('evaluate.py', f'--checkpoint={paths["ckpt"]}', f'--apstar_list={listing}',
                     '--mc=4', f'--output_dir={sweep.work}/eval_list', '--figures=false')
  reason = _skipped(sweep.work / 'eval_list' / 'skipped.csv').get(
      'apStar-x-2M99000001+0000000.fits', '')
  report('evaluate --apstar_list: /dev/zero', result['rc'] == 0 and 'character device' in reason,
         f'rc {result["rc"]}: {reason or result["err"][-200:]}')
  _absurd_spectra(skipped)


def _absurd_spectra(skipped: dict[str, str]) -> None:
  """Severe 4: empty or absurd spectra get no prediction, with the reason."""
  for k, (mode, words) in enumerate((('one good pixel', 'too little spectrum'),
                                     ('every good pixel negative', 'too little spectrum'),
                                     ('flux level 1e-40', 'below'), ('flux x 1e28', 'above 1e+10'),
                                     ('3e38 in ten pixels', 'above 1e+10'),
                                     ('flux level 1e-30 (linear NaN)', 'below'))):
    reason = skipped.get(f'apStar-r8-2M9900001{k}+0000000.fits', 'predicted, not skipped')
    report(f'evaluate: {mode}', words in reason, reason)


def failed_overwrite(sweep: Sweep, paths: dict) -> None:
  """Severe 2: a failed --overwrite keeps the good data set."""
  nomatch = sweep.work / 'nomatch'
  nomatch.mkdir()
  shutil.copy(paths['manual'] / 'labels.fits', nomatch / 'labels.fits')
  before = sorted(p.name for p in _version_dir(paths['data']).iterdir())
  result = sweep.run('-m', 'tfds_apogee.build', f'--manual_dir={nomatch}',
                     f'--data_dir={paths["data"]}', '--overwrite')
  ok, detail = one_line_error(result)
  after = sorted(p.name for p in _version_dir(paths['data']).iterdir())
  report('build --overwrite with NOMATCH keeps the data set', ok and before == after, detail)


def outputs_owned(sweep: Sweep, paths: dict) -> None:
  """Severe 3: evaluate removes only its own files; refuses a data set or checkpoint folder."""
  out = sweep.work / 'eval_owned'
  (out / 'figures').mkdir(parents=True)
  (out / 'figures' / 'my_plot.png').write_bytes(b'mine')
  ok = True
  for figures in ('true', 'false'):
    result = sweep.run('evaluate.py', f'--checkpoint={paths["ckpt"]}',
                       f'--apstar_dir={paths["good"].parent}', '--mc=0', f'--output_dir={out}',
                       f'--figures={figures}')
    ok &= result['rc'] == 0 and (out / 'figures' / 'my_plot.png').exists()
  report('evaluate keeps figures/my_plot.png (--figures true and false)', ok,
         f'my_plot.png {"kept" if ok else "lost or run failed"}')
  for folder, what in ((_version_dir(paths['data']), 'a built data set'),
                       (paths['ckpt'], 'a checkpoint folder')):
    expect_error(sweep, f'evaluate --output_dir = {what}',
                 ['evaluate.py', f'--checkpoint={paths["ckpt"]}',
                  f'--apstar_dir={paths["good"].parent}', '--mc=0', f'--output_dir={folder}'],
                 what)
  kept = (_version_dir(paths['data']) / 'skipped.csv').exists()
  report("the build's skipped.csv is still there", kept, str(kept))


def nan_pixels(sweep: Sweep, paths: dict) -> None:
  """Severe 5: NaN flux pixels with finite errors get no noise."""
  code = ('import numpy as np\n'
          'from apogeenet_jax import input_pipeline, uncertainty\n'
          'flux = np.full(8575, 100.0, np.float32); flux[::80] = np.nan\n'
          'e = input_pipeline.decode_example({"flux": flux, "flux_err": np.ones(8575)})\n'
          'b = input_pipeline.collate([e])\n'
          's = uncertainty.prepare_errors(b["flux_err"])\n'
          'print(int((s[0, ::80] > 0).sum()))\n')
  result = sweep.run('-c', code)
  report('NaN flux pixels with a finite error get no MC noise',
         result['rc'] == 0 and result['out'].strip() == '0',
         f'noisy NaN pixels: {result["out"].strip() or result["err"][-200:]}')


def bad_configs(sweep: Sweep, paths: dict) -> None:
  """Severe 6 and 7, and the misspelled and bogus fields: one line, no workdir."""
  cases = [('--config.loss_weights=(1.0,1.0,-1.0)', 'loss_weights'),
           ('--config.loss_weights=abc', 'loss_weights'),
           ('--config.loss_weights=(1.0,nan,1.0)', 'loss_weights'),
           ('--config.loss_weights=(1.0,1.0)', 'loss_weights'),
           ('--config.loss_weights=(1.0,1.0,1.0,1.0)', 'loss_weights'),
           ('--config.loss_weights=(0.0,0.0,0.0)', 'loss_weights'),
           ('--config.patience=0', 'patience'), ('--config.patience=-1', 'patience'),
           ('--config.noise_augmentaton=1', 'noise_augmentation'),
           ('--config.model.flux_scaling=bogus', 'flux_scaling')]
  for k, (flag, message) in enumerate(cases):
    workdir = sweep.work / f'train_bad{k}'
    result = sweep.run('train.py', '--config=configs/test.py', f'--workdir={workdir}',
                       f'--config.data_dir={paths["data"]}', flag)
    ok, detail = one_line_error(result)
    report(f'train.py {flag}', ok and message in result['err'] and not workdir.exists(), detail)


def resume_max_epochs(sweep: Sweep, paths: dict) -> None:
  """The docs' max_epochs on resume under a cosine to the end of the run."""
  import re
  base = ['train.py', '--config=configs/test.py', f'--workdir={sweep.work}/train_cos',
          f'--config.data_dir={paths["data"]}', '--config.optim.lr_schedule=cosine',
          '--config.model.flux_scaling=log_median', '--config.model.input_scale=0']
  first = sweep.run(*base, '--config.max_epochs=1')
  if first['rc'] != 0:
    report('resume with another max_epochs', False, first['err'][-300:])
    return
  refused = sweep.run(*base, '--config.max_epochs=2')
  ok, detail = one_line_error(refused)
  report('resume with another max_epochs names max_epochs',
         ok and 'set by max_epochs' in refused['err'], detail)
  keep = re.search(r'--config\.optim\.decay_steps=(\d+)', refused['err'])
  if keep:
    kept = sweep.run(*base, '--config.max_epochs=2', keep.group(0))
    report('resume with max_epochs and the old decay_steps', kept['rc'] == 0,
           kept['err'][-200:] if kept['rc'] else 'resumed')


def flag_errors(sweep: Sweep, paths: dict) -> None:
  """Raw tracebacks for user errors, now one line each."""
  a_file = sweep.work / 'a_file'
  a_file.write_text('x')
  build = ['-m', 'tfds_apogee.build', f'--manual_dir={paths["manual"]}']
  evaluate = ['evaluate.py', f'--checkpoint={paths["ckpt"]}', f'--output_dir={sweep.work}/e']
  cases = [('build --beam_pipeline_options=runner=BogusRunner',
            [*build, f'--data_dir={sweep.work}/d1', '--beam_pipeline_options=runner=BogusRunner'],
            'BogusRunner'),
           ('build --beam_pipeline_options==,,=',
            [*build, f'--data_dir={sweep.work}/d2', '--beam_pipeline_options==,,='], 'name=value'),
           ('build --manual_dir=<a file>', ['-m', 'tfds_apogee.build', f'--manual_dir={a_file}',
                                            f'--data_dir={sweep.work}/d3'], 'not a directory'),
           ('build --data_dir=<a file>', [*build, f'--data_dir={a_file}'], 'not a directory'),
           ('evaluate --apstar_dir=<a file>', [*evaluate, f'--apstar_dir={a_file}'],
            'not a directory'),
           ('evaluate --apstar_dir=<missing>', [*evaluate, f'--apstar_dir={sweep.work}/none'],
            'not a directory'),
           ('evaluate --config.data_dirr=x', [*evaluate, '--config=configs/test.py',
                                              '--config.data_dirr=x', '--split=test'],
            'no field')]
  for name, args, message in cases:
    expect_error(sweep, name, args, message)


def concurrent_builds(sweep: Sweep, paths: dict) -> None:
  """Two builds into one data folder: the second stops in one line (or both succeed)."""
  args = [sys.executable, '-m', 'tfds_apogee.build', f'--manual_dir={paths["manual"]}',
          f'--data_dir={sweep.work}/tfds_twice', '--num_workers=1']
  procs = [subprocess.Popen(args, cwd=sweep.clone, env=sweep.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=sweep.timeout)
    results.append({'rc': proc.returncode, 'out': out, 'err': err, 'hung': False})
  ok = all(r['rc'] == 0 or one_line_error(r)[0] for r in results) and any(
      r['rc'] == 0 for r in results)
  report('two concurrent builds into one data folder', ok,
         '; '.join(f'rc {r["rc"]}' + ('' if r['rc'] == 0 else f': {one_line_error(r)[1]}')
                   for r in results))


def device_output(sweep: Sweep, paths: dict) -> None:
  """make_labels over a non-regular file (a FIFO standing in for /dev/full)."""
  import numpy as np
  from astropy.table import Table
  arr = np.zeros((2, 22))
  arr[:, 0], arr[:, 1] = (5000.0, 4800.0), 2.5
  payne = sweep.work / 'payne.fits'
  Table({'APOGEE_ID': ['2M00000001+0000000', '2M00000002+0000000'], 'payne': arr,
         'good_flag': [1, 1]}).write(payne)
  target = sweep.work / 'dev' / 'full'
  target.parent.mkdir()
  os.mkfifo(target)
  result = sweep.run('-m', 'apogeenet_jax.make_labels', f'--output={target}', f'--payne={payne}')
  ok, detail = one_line_error(result)
  intact = target.is_fifo() and sorted(os.listdir(target.parent)) == ['full']
  report('make_labels --output=<FIFO, like /dev/full>', ok and intact, detail)


def hash_in_paths(sweep: Sweep, paths: dict) -> None:
  """A '#' in a FILE path: the documented CSV reader keeps the row whole."""
  out = sweep.work / 'eval_hash'
  result = sweep.run('evaluate.py', f'--checkpoint={paths["ckpt"]}',
                     f'--apstar_dir={paths["odd"]}/run#2', '--mc=0', f'--output_dir={out}',
                     '--figures=false')
  code = ('import sys\nfrom astropy.table import Table\n'
          'f = Table.read(sys.argv[1], format="ascii.ecsv").to_pandas()\n'
          'print(f["FILE"][0], f["TEFF_PRED"][0])\n')
  read = sweep.run('-c', code, str(out / 'catalog.csv'))
  report("a '#' in a FILE path (docs' reader)", result['rc'] == 0 and 'run#2/' in read['out']
         and 'nan' not in read['out'].lower(), read['out'].strip() or read['err'][-200:])


def calibration_corners(sweep: Sweep, paths: dict) -> None:
  """The labels_quadratic floor at the corners of the clipped box stays in its dev range."""
  code = ('import itertools, numpy as np\nfrom apogeenet_jax import calibration\n'
          'rng = np.random.default_rng(0); n = 1500\n'
          'labels = np.stack([rng.normal(3, 1, n), rng.normal(4800, 600, n), '
          'rng.normal(-0.2, 0.3, n)], 1)\n'
          'std = np.array([1.0, 600.0, 0.3]); sigma = rng.uniform(0.01, 0.1, (n, 3)) * std\n'
          'pred = labels + rng.normal(size=(n, 3)) * std * 0.1 * (1 + (labels[:, :1] > 4))\n'
          'rec = calibration.fit(pred, labels, sigma, std, floor="labels_quadratic")\n'
          'g = rec["features"]["LOGG"]\n'
          'corners = np.array(list(itertools.product(*zip(g["lo"], g["hi"]))))\n'
          'b = calibration.floor_sigma(rec, corners, len(corners))\n'
          'dev = calibration.floor_sigma(rec, pred, n)\n'
          'print(bool(np.all(b >= dev.min(0)) and np.all(b <= dev.max(0))), b.min(), b.max())\n')
  result = sweep.run('-c', code)
  report('labels_quadratic floor at the corners', result['out'].startswith('True'),
         result['out'].strip() or result['err'][-200:])


def raw_flux_checkpoint(sweep: Sweep, paths: dict) -> None:
  """A raw-flux checkpoint on the absurd spectra: skipped, never a Teff of 1.8 K."""
  out = sweep.work / 'eval_raw'
  result = sweep.run('evaluate.py', f'--checkpoint={paths["ckpt_raw"]}',
                     f'--apstar_dir={paths["odd"]}', '--mc=4', f'--output_dir={out}',
                     '--figures=false', '--uncertainty=linear')
  skipped = _skipped(out / 'skipped.csv')
  n = sum(name.startswith('apStar-r8-2M990000') for name in skipped)
  report('raw-flux checkpoint, --uncertainty=linear: absurd spectra skipped', result['rc'] == 0
         and n == 6, f'rc {result["rc"]}, {n} of 6 skipped')


def information_limit(sweep: Sweep, paths: dict) -> None:
  """The bound is refused on real apStar files; user errors are one line."""
  default = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'apstar'
  real = pathlib.Path(os.environ.get('APOGEENET_APSTAR_DIR', default))
  script = 'benchmarks/information_limit.py'
  expect_error(sweep, 'information_limit --split=<missing>',
               [script, f'--data_dir={sweep.work}/none'], 'no built dataset')
  expect_error(sweep, 'information_limit --nuisances=bogus',
               [script, f'--data_dir={paths["data"]}', '--nuisances=bogus'], 'unknown nuisance')
  expect_error(sweep, 'information_limit --workdir=<no checkpoint>',
               [script, f'--data_dir={paths["data"]}', f'--workdir={sweep.work}/none',
                '--max_stars=2', '--ml_fit_stars=0'], 'checkpoint')
  expect_error(sweep, 'information_limit --batch_size=0',
               [script, f'--data_dir={paths["data"]}', '--batch_size=0'], 'batch_size')
  files = sorted(real.glob('apStar-*.fits'))[:4] if real.is_dir() else []
  if len(files) < 4:
    print(f'skip information_limit on real files: none in {real}')
    return
  manual = sweep.work / 'manual_real'
  manual.mkdir()
  for path in files:
    os.symlink(path, manual / path.name)
  code = ('import sys, numpy as np\nfrom astropy.table import Table\n'
          'ids = [a.split("-", 2)[2].rsplit(".fits", 1)[0] for a in sys.argv[2:]]\n'
          'Table({"APOGEE_ID": ids, "LOGG": np.full(4, 4.5), "TEFF": np.full(4, 4000.0), '
          '"FE_H": np.zeros(4), "DATA_TYPE": ["MStar"] * 4, '
          '"SPLIT": ["train", "train", "dev", "test"]}).write(sys.argv[1] + "/labels.fits")\n')
  sweep.run('-c', code, str(manual), *(p.name for p in files))
  sweep.run('-m', 'tfds_apogee.build', f'--manual_dir={manual}', f'--data_dir={sweep.work}/real')
  expect_error(sweep, 'information_limit on a survey of real apStar files',
               [script, f'--data_dir={sweep.work}/real'], 'synthetic forward model')


def killed_build(sweep: Sweep, paths: dict) -> None:
  """SIGTERM in the middle of a build (local readers, and Beam where it is installed)."""
  slow = ('import sys, time\nfrom tfds_apogee.apogee import apogee_dataset_builder as b\n'
          'read = b.read_example\n'
          'def slow(task):\n  print("reading", flush=True); time.sleep(1); return read(task)\n'
          'b.read_example = slow\nfrom tfds_apogee import build\n'
          'sys.argv = ["build"] + sys.argv[1:]\nbuild.run()\n')
  variants = [('local', ['--num_workers=1'])]
  if subprocess.run([sys.executable, '-c', 'import apache_beam'], env=sweep.env,
                    capture_output=True).returncode == 0:
    variants.append(('Beam', ['--beam_pipeline_options=runner=DirectRunner']))
  for name, extra in variants:
    data = sweep.work / f'tfds_killed_{name}'
    proc = subprocess.Popen([sys.executable, '-c', slow, f'--manual_dir={paths["manual"]}',
                             f'--data_dir={data}', *extra], cwd=sweep.clone, env=sweep.env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(8 if name == 'Beam' else 3)
    proc.send_signal(signal.SIGTERM)
    try:
      _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      proc.kill()
      _, err = proc.communicate()
    left = [p.name for p in (data / 'apogee').glob('incomplete*')] if data.exists() else []
    tracebacks = err.count('Traceback')
    last = (err.strip().splitlines() or [''])[-1]
    report(f'SIGTERM during a {name} build', not left and tracebacks == 0,
           f'rc {proc.returncode}, {tracebacks} traceback(s), left {left}: {last}')


CASES = (special_files, failed_overwrite, outputs_owned, nan_pixels, bad_configs,
         resume_max_epochs, flag_errors, concurrent_builds, device_output, hash_in_paths,
         calibration_corners, raw_flux_checkpoint, information_limit, killed_build)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repo', default=str(pathlib.Path(__file__).resolve().parents[1]))
  parser.add_argument('--work', default='/tmp/apogeenet-hardening-sweep')
  parser.add_argument('--timeout', type=float, default=180.0, help='seconds per command')
  args = parser.parse_args()
  t0 = time.perf_counter()
  sweep = Sweep(pathlib.Path(args.repo), pathlib.Path(args.work), args.timeout)
  commit = subprocess.run(['git', 'log', '-1', '--format=%h %s'], cwd=sweep.clone, text=True,
                          capture_output=True).stdout.strip()[:100]
  print(f'hardening sweep on a fresh clone of {args.repo} at {commit}')
  paths = setup(sweep)
  for case in CASES:
    try:
      case(sweep, paths)
    except Exception as e:  # A case that breaks is a failed case, and the sweep goes on.
      report(case.__name__, False, f'the case itself failed: {type(e).__name__}: {e}')
  print(f'{sum(_RESULTS)} OK, {len(_RESULTS) - sum(_RESULTS)} FAIL of {len(_RESULTS)} cases in '
        f'{time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
  main()
