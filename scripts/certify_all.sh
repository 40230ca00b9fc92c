#!/usr/bin/env bash
# Certify every trained run of a dataset (N = 100,000, N0 = 100, alpha = 0.001, every test image).
# logs/{dataset}/{method path}/noise_{s}/{arch}/{id}/checkpoint.pth.tar
#   -> test/certify/{dataset}/{method path}/{id}/noise_{s}.tsv
# Usage: bash scripts/certify_all.sh DATASET [extra certify.py options, e.g. --skip=20]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_sweep_lib.sh
D=$1; shift
[ -d logs/$D ] || { echo "no training runs under logs/$D"; exit 0; }
find logs/$D -name checkpoint.pth.tar -path "*/noise_*" | sort | while read -r ckpt; do
  run_dir=$(dirname "$ckpt"); id=$(basename "$run_dir"); arch_dir=$(dirname "$run_dir")
  noise_dir=$(dirname "$arch_dir"); noise=$(basename "$noise_dir"); sigma=${noise#noise_}
  method=${noise_dir#logs/$D/}; method=$(dirname "$method")
  run $PY code/certify.py $D "$ckpt" "$sigma" "test/certify/$D/$method/$id/noise_$sigma.tsv" --N=100000 --skip=1 "$@"
done
