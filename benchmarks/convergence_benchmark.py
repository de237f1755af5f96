r"""Convergence: how fast, and how far, each training recipe takes the paper's network.

    python benchmarks/convergence_benchmark.py [--num_stars=18000] [--recipes=default,paper]
        [--max_epochs=60] [--max_steps=0] [--root=data/convergence]

Generates the embedded SYNTHETIC survey (``--num_stars``; the default gives ≥ 100 steps of batch
128 per epoch), builds it TensorFlow-free, then trains the Appendix-B network with each recipe
(``configs/<recipe>.py``) through ``training.train_and_evaluate`` — the code users run, early
stopping included — and evaluates the best checkpoint on the test split (noiseless prediction,
``evaluate(mc=0)``). Prints one table: recipe, steps and training wall time to the first epoch
whose dev MSE is ≤ 0.5 / 0.2 / 0.1 (dev is evaluated once per epoch, so steps are epoch ends),
best dev MSE and its step, why the run ended, and the test MSE and scatter (log g, Teff, [Fe/H])
of the best checkpoint. Survey, build and runs are cached under ``--root``: a rerun resumes.
Figures, never assertions.
"""

import importlib
import pathlib
import subprocess
import sys

import numpy as np
from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/ at the top

from apogeenet_jax import (  # noqa: E402
    checkpoint,
    evaluation,
    input_pipeline,
    training,
    uncertainty,
)
from apogeenet_jax.metric_writer import read_metrics  # noqa: E402
from benchmarks.common import cpu_model  # noqa: E402

flags.DEFINE_integer('num_stars', 18000, 'Synthetic survey size (≈72% of it trains).')
flags.DEFINE_list('recipes', ['default', 'paper'], 'Config modules under configs/; '
                  'RECIPE:STEPS caps that recipe at the first epoch past STEPS steps.')
flags.DEFINE_integer('max_epochs', 60, 'Epoch cap per recipe (early stopping usually ends first).')
flags.DEFINE_integer('max_steps', 0, 'Stop a recipe after the first epoch past this many steps '
                     '(0 = no cap); for a quick look at the paper recipe, which barely moves.')
flags.DEFINE_string('root', 'data/convergence', 'Where the survey, build and workdirs live.')
flags.DEFINE_integer('seed', 0, 'Survey seed and training seed.')
FLAGS = flags.FLAGS

THRESHOLDS = (0.5, 0.2, 0.1)


def build_survey(root: pathlib.Path, num_stars: int, seed: int) -> pathlib.Path:
  """The synthetic survey and its TFDS build (skipped when already there)."""
  raw, tfds_dir = root / 'raw', root / 'tfds'
  python = sys.executable
  if not (raw / 'labels.fits').exists():
    subprocess.run([python, '-m', 'apogeenet_jax.synthetic', f'--output_dir={raw}',
                    f'--num_stars={num_stars}', f'--seed={seed}'], check=True, cwd=ROOT)
  if not (tfds_dir / 'apogee').exists():
    subprocess.run([python, '-m', 'tfds_apogee.build', f'--manual_dir={raw}',
                    f'--data_dir={tfds_dir}'], check=True, cwd=ROOT)
  return tfds_dir


def run_recipe(recipe: str, data_dir: pathlib.Path, workdir: pathlib.Path,
               max_steps: int = 0) -> dict:
  config = importlib.import_module(f'configs.{recipe}').get_config()
  config.data_dir = str(data_dir)
  config.max_epochs = FLAGS.max_epochs
  config.seed = FLAGS.seed
  config.log_every_steps = 0
  max_steps = max_steps or FLAGS.max_steps
  if max_steps:
    n_train = len(input_pipeline.open_split(str(data_dir), 'train'))
    steps_per_epoch = max(n_train // config.batch_size, 1)
    config.max_epochs = min(config.max_epochs, -(-max_steps // steps_per_epoch))
  training.train_and_evaluate(config, str(workdir))
  rows = [r for r in read_metrics(str(workdir)) if 'dev_loss' in r and r.get('epoch', 0) > 0]
  elapsed = np.cumsum([r['epoch_seconds'] for r in rows])
  out = {'recipe': recipe, 'epochs': len(rows), 'steps': rows[-1]['step'] if rows else 0}
  for t in THRESHOLDS:
    hit = next((i for i, r in enumerate(rows) if r['dev_loss'] <= t), None)
    out[t] = None if hit is None else (rows[hit]['step'], float(elapsed[hit]))
  best = min(rows, key=lambda r: r['dev_loss'])
  out['best_dev'], out['best_step'] = best['dev_loss'], best['step']
  out['ended'] = ('early stop' if len(rows) < config.max_epochs
                  else f'epoch cap {config.max_epochs}')
  params, meta = checkpoint.load_params(str(workdir / checkpoint.CHECKPOINT_DIR))
  result = evaluation.evaluate(params=params, meta=meta, output_dir=str(workdir / 'eval_test'),
                               splits=['test'], data_dir=str(data_dir),
                               settings=uncertainty.MCSettings(mc=0),
                               make_figures=False)
  full = result['metrics']['splits']['test']['Full']
  out['test_mse'], out['scatter'] = full['mse_standardised'], full['scatter']
  out['input_scale'] = meta['model'].get('input_scale', 1.0)
  return out


def main(argv):
  del argv
  root = pathlib.Path(FLAGS.root) / f'n{FLAGS.num_stars}_s{FLAGS.seed}'
  data_dir = build_survey(root, FLAGS.num_stars, FLAGS.seed)
  results = []
  for spec in FLAGS.recipes:
    recipe, _, cap = spec.partition(':')
    logging.info('=== recipe %s', spec)
    results.append(run_recipe(recipe, data_dir, root / 'runs' / recipe, int(cap or 0)))

  def reach(r, t):
    return '—' if r[t] is None else f'{r[t][0]} / {r[t][1]:.0f} s'

  print(f'\nConvergence of the Appendix-B network on the SYNTHETIC survey, {FLAGS.num_stars} '
        f'stars (CPU: {cpu_model()}; wall time = training epochs only, dev evaluations excluded)')
  head = ('| recipe | steps / time to dev ≤ 0.5 | ≤ 0.2 | ≤ 0.1 | best dev MSE (step) | ended '
          '| test MSE | test scatter log g, Teff, [Fe/H] |')
  print(head)
  print('|' + '---|' * 8)
  for r in results:
    s = r['scatter']
    print(f"| {r['recipe']} | {reach(r, 0.5)} | {reach(r, 0.2)} | {reach(r, 0.1)} | "
          f"{r['best_dev']:.4f} ({r['best_step']}) | {r['ended']} after {r['steps']} steps | "
          f"{r['test_mse']:.4f} | {s['LOGG']:.3f} dex, {s['TEFF']:.0f} K, {s['FE_H']:.3f} dex |")


if __name__ == '__main__':
  app.run(main)
