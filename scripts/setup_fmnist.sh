#!/usr/bin/env bash
# Put Fashion-MNIST's decompressed IDX files into ${DATASET_CACHE:-./dataset_cache}/FashionMNIST/raw/.
# Sources, in order: files already there; the gzipped IDX files in ${FMNIST_GZ_DIR:-/usr/share/datasets/fashion-mnist}
# (Debian's dataset-fashion-mnist package, installed with apt-get when possible); torchvision's download. Idempotent.
set -euo pipefail
PY=${PY:-.venv/bin/python}
ROOT=${DATASET_CACHE:-./dataset_cache}
RAW="$ROOT/FashionMNIST/raw"
DEBIAN=${FMNIST_GZ_DIR:-/usr/share/datasets/fashion-mnist}
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

have_all() { for f in $FILES; do [ -s "$RAW/$f" ] || return 1; done; }
have_all && exit 0

if [ ! -f "$DEBIAN/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's dataset-fashion-mnist" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "apt-get could not install dataset-fashion-mnist; trying torchvision's download" >&2
fi

if [ -f "$DEBIAN/train-images-idx3-ubyte.gz" ]; then
  mkdir -p "$RAW"
  for f in $FILES; do
    [ -s "$RAW/$f" ] || { gzip -dc "$DEBIAN/$f.gz" > "$RAW/$f.tmp" && mv "$RAW/$f.tmp" "$RAW/$f"; }
  done
else
  "$PY" -c "import sys; from torchvision.datasets import FashionMNIST
for train in (True, False): FashionMNIST(sys.argv[1], train=train, download=True)" "$ROOT" >/dev/null 2>&1 || true
fi

if ! have_all; then
  echo "error: Fashion-MNIST not found; install Debian's package (apt-get install dataset-fashion-mnist) or put the decompressed IDX files ($FILES) into $RAW" >&2
  exit 1
fi
