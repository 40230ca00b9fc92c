#!/usr/bin/env bash
# One short GPU window spent on the Fashion-MNIST table: certification throughput first, then every
# unfinished cell at once (LeNet leaves a GPU mostly idle), the work brought back before the time is up.
#
#   bash scripts/gpu_window.sh prepare        here, before the window: wheels and data to carry
#   OUT=DIR bash scripts/gpu_window.sh run [SECONDS]
#                                             on the GPU machine (SECONDS: the whole run, default 510)
#   bash scripts/gpu_window.sh unpack DIR     here, after it: the cells continue from what came back
#
# Before a window, stop the CPU drivers and save their work (reproduce.sh fmnist --save-progress): the
# window starts from data/fmnist/progress/ and data/fmnist/, and returns DIR/window.tar.gz (split into
# window.tar.gz.part-* above 15 MB) with the updated progress folder, the cells it kept, the benchmark
# and the drivers' logs. `unpack` puts them in place, makes this checkout's cells continue from them
# (reproduce.py --take-saved; the files it replaces go under test/reproduce/fmnist/superseded/), and
# leaves the logs in logs/gpu_window/. A second window continues where the first stopped.
#
# Settings (environment): CELLS (default: every unfinished cell; CAT-RS cells start once the pretrain
# is kept), BENCH_SECONDS (default 60; 0 skips the benchmark), SAVE_SECONDS (kept for stopping and
# saving, default 45), BENCH_N (samples per image, default 100,000), BENCH_MODELS (default
# "lenet cifar_resnet110"), REPRODUCE_ARGS (extra reproduce.py
# options, e.g. a toy scale), PY.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi   # the GPU machine has no .venv
fi
MODE=${1:-}
CARRY=.carry
eval "EXTRA=(${REPRODUCE_ARGS:-})"   # shell words, so that a quoted --train-args value stays one argument

prepare() {
  # wheels the GPU image lacks (its Python is 3.12), and the gzipped Fashion-MNIST files
  mkdir -p "$CARRY/fashion-mnist" .whl   # both git-ignored: they travel only as carried paths
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    src=${FMNIST_GZ_DIR:-/usr/share/datasets/fashion-mnist}/$f.gz
    [ -s "$CARRY/fashion-mnist/$f.gz" ] || cp "$src" "$CARRY/fashion-mnist/$f.gz" || {
      echo "error: $src not found; run 'make data' (it installs Debian's dataset-fashion-mnist) first" >&2; exit 2; }
  done
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    "tensorboardX==2.6.2.2" "setGPU==0.0.7" || echo "warning: wheels not downloaded; the window runs without them" >&2
  echo "carry: .carry .whl   (device run: carry [\".carry\", \".whl\"])"
}

stop_drivers() {
  for pid in "$@"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for _ in $(seq 1 30); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return
    sleep 1
  done
  for pid in "$@"; do kill -KILL -- "-$pid" 2>/dev/null; done
}

run() {
  local budget=${1:-510}
  local start; start=$(date +%s)
  local out=${OUT:?set OUT to the folder whose files come back}
  local stage=$out/stage
  mkdir -p "$stage"
  export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  FMNIST_GZ_DIR=$CARRY/fashion-mnist PY=$PY bash scripts/setup_fmnist.sh
  { date -u; nvidia-smi 2>/dev/null | head -15; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$stage/machine.txt" 2>&1
  local device; device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

  # 1. certification throughput (never measured on a GPU): LeNet and ResNet-110, ours beside the published loop
  local bench=${BENCH_SECONDS:-60}
  if [ "$bench" -gt 0 ]; then
    local n=${BENCH_N:-100000} models=(${BENCH_MODELS:-lenet cifar_resnet110})
    for model in "${models[@]}"; do
      timeout $((bench / ${#models[@]})) "$PY" benchmarks/bench_certify.py --model "$model" --N "$n" --images 2 \
        --repeats 2 --device "$device" --bf16 --no-art > "$stage/bench_$model.txt" 2>&1
    done
  fi

  # 2. the cells, each its own driver; CAT-RS's wait for the pretrain
  local cells=${CELLS:-}
  if [ -z "$cells" ]; then
    cells=$("$PY" code/reproduce.py fmnist --dry-run ${EXTRA[@]+"${EXTRA[@]}"} | sed -n 's/^\[reproduce\] cell [0-9]* of [0-9]*: \([^ ]*\) .*/\1/p' | tr '\n' ' ')
  fi
  local deadline=$((start + budget - ${SAVE_SECONDS:-45}))
  local pids=() waiting=()
  launch() {
    setsid "$PY" code/reproduce.py fmnist --cells "$1" ${EXTRA[@]+"${EXTRA[@]}"} > "$stage/cell_${1/:/_}.log" 2>&1 &
    pids+=($!)
  }
  for cell in $cells; do
    case $cell in catrs:*) waiting+=("$cell") ;; *) launch "$cell" ;; esac
  done
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if [ ${#waiting[@]} -gt 0 ] && [ -f data/fmnist/pretrain/cell.json ]; then
      for cell in "${waiting[@]}"; do launch "$cell"; done
      waiting=()
    fi
    local running=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    [ $running = 0 ] && [ ${#waiting[@]} = 0 ] && break
    [ $running = 0 ] && [ ! -f data/fmnist/pretrain/cell.json ] && break   # the pretrain failed or is elsewhere
    sleep 2
  done
  [ ${#pids[@]} -gt 0 ] && stop_drivers "${pids[@]}"

  # 3. everything unfinished saved, then packed with what was kept
  "$PY" code/reproduce.py fmnist --save-progress ${EXTRA[@]+"${EXTRA[@]}"} > "$stage/save_progress.log" 2>&1
  local kept=()
  for record in $(find data/fmnist -name cell.json -newermt "@$start" 2>/dev/null); do kept+=("$(dirname "$record")"); done
  local files=()
  [ -d data/fmnist/progress ] && files+=(data/fmnist/progress)
  files+=("${kept[@]}")
  tar czf "$out/window.tar.gz" -C "$out" stage ${files[@]+-C "$PWD" "${files[@]}"}
  rm -rf "$stage"
  if [ "$(stat -c %s "$out/window.tar.gz")" -gt 15000000 ]; then
    split -b 15000000 -d "$out/window.tar.gz" "$out/window.tar.gz.part-" && rm "$out/window.tar.gz"
  fi
  echo "window: $(( $(date +%s) - start )) s; kept: ${kept[*]:-none}; brought back: $(ls "$out" | tr '\n' ' ')"
}

unpack() {
  local dir=${1:?usage: bash scripts/gpu_window.sh unpack DIR}
  local tmp; tmp=$(mktemp -d)
  cat "$dir"/window.tar.gz* | tar xzf - -C "$tmp" || { echo "error: no readable window.tar.gz in $dir" >&2; exit 2; }
  # the window saved every unfinished cell (it started from this progress folder): its folder replaces this one,
  # and no folder means nothing was left unfinished
  if [ -f "$tmp/stage/save_progress.log" ]; then
    rm -rf data/fmnist/progress
    if [ -d "$tmp/data/fmnist/progress" ]; then mkdir -p data/fmnist && mv "$tmp/data/fmnist/progress" data/fmnist/progress; fi
  else
    echo "warning: the window did not get to save its progress; data/fmnist/progress is left as it is" >&2
  fi
  if [ -d "$tmp/data/fmnist" ]; then
    for cell in $(cd "$tmp/data/fmnist" && find . -name cell.json -printf '%h\n' | sed 's|^\./||'); do
      if [ -f "data/fmnist/$cell/cell.json" ]; then echo "kept already, left as it is: data/fmnist/$cell" >&2; continue; fi
      mkdir -p "data/fmnist/$(dirname "$cell")" && rm -rf "data/fmnist/$cell" && mv "$tmp/data/fmnist/$cell" "data/fmnist/$cell"
      echo "kept: data/fmnist/$cell"
    done
  fi
  local logs; logs=logs/gpu_window/$(date +%Y%m%d-%H%M%S)
  mkdir -p "$logs" && cp -r "$tmp"/stage/. "$logs"/ 2>/dev/null
  rm -rf "$tmp"
  "$PY" code/reproduce.py fmnist --take-saved ${EXTRA[@]+"${EXTRA[@]}"}
  echo "logs and benchmark: $logs"
}

case $MODE in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  unpack) shift; unpack "$@" ;;
  *) echo "usage: bash scripts/gpu_window.sh prepare | run [SECONDS] | unpack DIR" >&2; exit 2 ;;
esac
