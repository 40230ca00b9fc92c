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

SETTINGS=scripts/published_settings.tsv

# settings D: the lines of published_settings.tsv for data set D (CIFAR-100 runs the CIFAR-10 settings),
# as "method sigma id options".
settings() {
  local source=$1
  [ "$source" = cifar100 ] && source=cifar10
  awk -F'\t' -v d="$source" '$1 == d { print $2, $3, $4, $5 }' "$SETTINGS"
}

# pretrain D A: the sigma = 0.25 Gaussian model and its smoothed prediction on the training set, which
# CAT-RS reads for every sigma.
pretrain() {
  local D=$1 A=$2 method sigma id opts
  read -r method sigma id opts < <(settings $D | awk '$1 == "pretrain"')
  run $PY code/train_cohen.py $D $A $opts --noise $sigma --id $id
  run $PY code/smooth_prediction.py $D logs/$D/cohen/noise_$sigma/$A/$id/checkpoint.pth.tar $sigma \
      test/smooth_prediction/$D/cohen/$id/noise_train_$sigma.tsv --N=10000 --skip=1 --split=train
}

# train_all D A: every other run of D's published settings. A Gaussian run with the pretrain's options
# and id is the pretrain itself (CIFAR), trained once by `pretrain`.
train_all() {
  local D=$1 A=$2 method sigma id opts pretrain_line
  pretrain_line=$(settings $D | awk '$1 == "pretrain" { $1 = "cohen"; print }')
  while read -r method sigma id opts; do
    [ "$method" = pretrain ] && continue
    [ "$method $sigma $id $opts" = "$pretrain_line" ] && continue
    run $PY code/train_$method.py $D $A $opts --noise $sigma --id $id
  done < <(settings $D)
}
