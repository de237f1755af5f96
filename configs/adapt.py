r"""Adapt a converged default run to the M dwarfs and young stars (paper §3.4).

    python train.py --config=configs/adapt.py --workdir=workdirs/adapt \
        --config.data_dir=data/tfds --config.init_from=workdirs/default

Starts from the best checkpoint of ``init_from`` — a configs/default.py or configs/paper.py run:
its normalisation, architecture and input scale are kept, and this config's optimiser (the default
recipe's, with a fresh warm-up) and dropout apply —
then runs rounds: train on all MStar + all YSO training stars + a fresh random 5% of the Payne
training stars, early stopping on the MStar+YSO dev loss (patience 5); each new round reloads the
best model so far. Rounds continue until one ends without improving the MStar+YSO dev loss
(``adapt_patience=1``; the paper: "until MStar and YSO dev performance stops improving").
Expect MStar / YSO dev losses near the paper's 0.098 / 0.168 (Table 2). A round is ~16k spectra
per epoch: minutes per epoch on a CPU.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.adapt = True
  config.init_from = ''  # the workdir of a configs/default.py run (required)
  config.payne_fraction = 0.05
  # Early stopping inside a round; the epoch cap counts epochs over all rounds.
  config.patience = 5
  config.adapt_patience = 1
  config.max_adapt_rounds = 50
  # Rounds restart from the best checkpoint with its optimiser state, so a cosine over the run
  # would leave later rounds a rate near 0: adaptation keeps a constant rate and a loose cap.
  config.optim.lr_schedule = 'constant'
  config.max_epochs = 200
  return config
