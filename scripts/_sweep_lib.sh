# Shared by the per-dataset sweeps (sourced from the repository root): run a command, or only print
# it with DRY_RUN=1.
# Stage selection: STAGES="pretrain train certify" (default all); an unknown stage is refused.
# Interpreter: PY, by default the project's .venv/bin/python (made by `make install`) when present;
# it must import torch.
VALID_STAGES="pretrain train certify"
STAGES=${STAGES:-$VALID_STAGES}
[ -n "${STAGES// /}" ] || { echo "error: STAGES names no stage; valid stages: $VALID_STAGES" >&2; exit 2; }
for _stage in $STAGES; do
  case " $VALID_STAGES " in
    *" $_stage "*) ;;
    *) echo "error: unknown stage '$_stage' in STAGES; valid stages: $VALID_STAGES" >&2; exit 2;;
  esac
done
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ "${DRY_RUN:-0}" != 1 ] && ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "error: the Python interpreter '$PY' cannot import torch; run 'make install' (it creates .venv) or set PY to a python with requirements.txt installed" >&2
  exit 2
fi
run() { echo "+ $*"; if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi; }
stage() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }

# pretrain D A "OPTIONS": the sigma = 0.25 Gaussian model and its smoothed prediction on the
# training set, which CAT-RS reads for every sigma.
pretrain() {
  local D=$1 A=$2 OPTS=$3
  run $PY code/train_cohen.py $D $A $OPTS --noise 0.25
  run $PY code/smooth_prediction.py $D logs/$D/cohen/noise_0.25/$A/0/checkpoint.pth.tar 0.25 \
      test/smooth_prediction/$D/cohen/0/noise_train_0.25.tsv --N=10000 --skip=1 --split=train
}

# train_all D A "BASELINE OPTIONS" "CAT-RS OPTIONS": every method at sigma 0.25, 0.5 and 1.0 with the
# hyperparameters of the published experiments (Gaussian at 0.25 comes from `pretrain`).
train_all() {
  local D=$1 A=$2 BASE=$3 CATRS=$4 s
  for s in 0.25 0.5 1.0; do
    [ $s = 0.25 ] || run $PY code/train_cohen.py $D $A $BASE --noise $s
    run $PY code/train_stab.py $D $A $BASE --noise $s --lbd 2.0
    run $PY code/train_salman.py $D $A $BASE --noise $s --attack PGD --epsilon 256.0 --num-steps 10 --warmup 10 --num-noise-vec 4
    run $PY code/train_macer.py $D $A $BASE --noise $s --num-noise-vec 16 --beta 16.0 --margin 8.0 --lbd 12.0 --deferred
  done
  run $PY code/train_consistency.py $D $A $BASE --noise 0.25 --num-noise-vec 2 --lbd 20
  run $PY code/train_consistency.py $D $A $BASE --noise 0.5 --num-noise-vec 2 --lbd 20
  run $PY code/train_consistency.py $D $A $BASE --noise 1.0 --num-noise-vec 2 --lbd 10
  run $PY code/train_smoothmix.py $D $A $BASE --noise 0.25 --num-noise-vec 2 --num-steps 4 --alpha 0.5 --mix_step 0 --eta 5.0
  run $PY code/train_smoothmix.py $D $A $BASE --noise 0.5 --num-noise-vec 2 --num-steps 4 --alpha 1.0 --mix_step 1 --eta 5.0
  run $PY code/train_smoothmix.py $D $A $BASE --noise 1.0 --num-noise-vec 2 --num-steps 4 --alpha 2.0 --mix_step 1 --eta 5.0
  run $PY code/train_catrs.py $D $A $CATRS --num-noise-vec 4 --noise 0.25 --eps 256.0 --num-steps 4 --lbd 0.5
  run $PY code/train_catrs.py $D $A $CATRS --num-noise-vec 4 --noise 0.5 --eps 256.0 --num-steps 4 --lbd 1.0
  run $PY code/train_catrs.py $D $A $CATRS --num-noise-vec 4 --noise 1.0 --eps 256.0 --num-steps 4 --lbd 2.0
}
