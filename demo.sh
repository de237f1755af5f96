#!/usr/bin/env bash
# The whole APOGEE Net chain on the embedded SYNTHETIC survey (not SDSS data), on a fresh machine:
#   generate the survey → build the TFDS records (no TensorFlow) → train → calibrate the σ on
#   the dev split and predict the test split with 100 Monte Carlo draws → catalogue, Tables 2–3,
#   coverage and figures.
#
#   python3 -m venv .venv && .venv/bin/pip install -q -e . && bash demo.sh
#
# Idempotent: a re-run skips the survey and the build when they exist, resumes (or finishes at
# once) the training run, refits the calibration and rewrites the evaluation outputs. Override
# with environment variables: PYTHON, NUM_STARS (5000), DEMO_DATA (data/demo), DEMO_WORKDIR (workdirs/demo), MC (100),
# TRAIN_FLAGS (extra train.py flags, e.g. "--config.optim.learning_rate=1e-4").
set -euo pipefail
cd "$(dirname "$0")"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# 5000 stars: dev and test splits of ~700, enough to measure the σ coverage to ±0.02.
NUM_STARS=${NUM_STARS:-5000}
DATA=${DEMO_DATA:-data/demo}
WORKDIR=${DEMO_WORKDIR:-workdirs/demo}
MC=${MC:-100}
OUT="$WORKDIR/eval"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
step() { echo; echo "=== [$((SECONDS - start)) s] $*"; }

step "1/4 synthetic survey: $NUM_STARS stars → $DATA/raw"
BUILD_FLAGS=()
if [[ -f "$DATA/raw/labels.fits" ]]; then
  echo "exists, skipped (delete $DATA/raw and $WORKDIR to regenerate and retrain)"
else
  # A new survey replaces any data set built from an old one (the build refuses stale inputs).
  BUILD_FLAGS=(--overwrite)
  rm -rf "$DATA/raw.partial"
  "$PYTHON" -m apogeenet_jax.synthetic --output_dir="$DATA/raw.partial" --num_stars="$NUM_STARS"
  mv "$DATA/raw.partial" "$DATA/raw"
fi

step "2/4 TFDS build (TensorFlow-free; 'tfds build tfds_apogee/apogee' is the TF alternative)"
"$PYTHON" -m tfds_apogee.build --manual_dir="$DATA/raw" --data_dir="$DATA/tfds" "${BUILD_FLAGS[@]}"

step "3/4 training: train.py --config=configs/demo.py --workdir=$WORKDIR"
# shellcheck disable=SC2086  # TRAIN_FLAGS holds several flags: word splitting wanted.
"$PYTHON" train.py --config=configs/demo.py --config.data_dir="$DATA/tfds" --workdir="$WORKDIR" \
  ${TRAIN_FLAGS:-}

step "4/4 evaluation: evaluate.py --calibrate (on dev) --mc=$MC --split=test"
"$PYTHON" evaluate.py --workdir="$WORKDIR" --data_dir="$DATA/tfds" --calibrate --split=test \
  --mc="$MC" --output_dir="$OUT"

step "done in $((SECONDS - start)) s. Outputs:"
echo "  catalogue: $OUT/catalog.fits, $OUT/catalog.csv"
echo "  Tables 2-3: $OUT/metrics.json"
echo "  figures:   $(ls "$OUT"/figures/*.png | tr '\n' ' ')"
echo "  training:  $WORKDIR/metrics.jsonl, TensorBoard logs in $WORKDIR/tensorboard"
