#!/usr/bin/env bash
# Reproduce a paper table with the project's own runs: train every cell with the published settings
# (scripts/published_settings.tsv) and --seed 0, certify it (fixed-N CERTIFY on every 100th test image,
# the sequential radii mode on every 10th) and keep it in data/DATASET/ (see code/reproduce.py).
# Usage: bash scripts/reproduce.sh fmnist [reproduce.py options]
#   CELLS="cohen:0.25 stab:*"  run these cells only (method:sigma globs, or pretrain)
#   DRY_RUN=1                  print the commands without running them
# Resumable: run the same command again after an interruption; finished cells are skipped. Two
# commands may run at once (say, one per core with OMP_NUM_THREADS=1): each takes cells the other
# does not hold.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash scripts/reproduce.sh DATASET [options]  (DATASET: fmnist, mnist, cifar10, cifar100, imagenet)" >&2; exit 2; }
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "error: the Python interpreter '$PY' cannot import torch; run 'make install' (it creates .venv) or set PY to a python with requirements.txt installed" >&2
  exit 2
fi
exec "$PY" code/reproduce.py "$@"
