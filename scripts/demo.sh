#!/usr/bin/env bash
# The paper's story on Fashion-MNIST in a few minutes of CPU: Gaussian pretraining, its smoothed
# prediction on the training subset, CAT-RS training, certification of both smoothed classifiers,
# and one table and plot comparing them. It runs the same scripts a user runs, with small settings
# (a training subset, few epochs). Certification is the sequential (anytime-valid) CERTIFY of
# certify.py --sequential, with the published N0 = 100, alpha = 0.001 and at most N = 100,000
# samples per image, so the radii reach those of the paper's table; it stops each image as soon as
# the largest table radius it certifies is decided. Re-running reuses finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=demo
SIGMA=0.25
TRAIN=${DEMO_TRAIN:-3000}       # training images
EPOCHS=${DEMO_EPOCHS:-10}       # Gaussian training
CATRS_EPOCHS=${DEMO_CATRS_EPOCHS:-2}  # CAT-RS, starting from the Gaussian model
CERT_SKIP=${DEMO_SKIP:-50}      # certify every 50th test image (200 images)
N_MAX=${DEMO_N_MAX:-100000}     # the most estimation samples per image
RADII="0.25 0.5 0.75 1.0"       # the table's radii: what the sequential certifier decides
COMMON="--lr 0.01 --batch 128 --noise $SIGMA --id 0 --seed 0 --train-subset $TRAIN --test-subset 1000 --logdir $OUT/logs --print-freq 1000 --resume"
GAUSS=$OUT/logs/fmnist/cohen/noise_$SIGMA/lenet/0
CATRS=$OUT/logs/fmnist/catrs/adv_256.0_4/lbd_1.0/num_4/noise_$SIGMA/lenet/0
SP=$OUT/test/smooth_prediction/fmnist/cohen/0
CERT=$OUT/test/certify/fmnist
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

step "1/5 Gaussian training (Cohen et al. 2019): LeNet, $TRAIN images, $EPOCHS epochs"
# Small LeNet batches gain nothing from a second thread, and lose much when the cores are busy.
OMP_NUM_THREADS=1 $PY code/train_cohen.py fmnist lenet $COMMON --epochs $EPOCHS --lr_step_size $EPOCHS

step "2/5 smoothed prediction of the Gaussian model on the training subset (N = 32)"
$PY code/smooth_prediction.py fmnist $GAUSS/checkpoint.pth.tar $SIGMA $SP/noise_train_$SIGMA.tsv \
    --N=32 --skip=1 --split=train --max $TRAIN --seed 0 --batch 1000 --batch-images 32

# At demo scale CAT-RS starts from the Gaussian model (the paper trains it from scratch for 150 epochs).
step "3/5 CAT-RS training (Jeong, Kim and Shin 2023): $CATRS_EPOCHS epochs from the Gaussian model"
OMP_NUM_THREADS=1 $PY code/train_catrs.py fmnist lenet $COMMON --epochs $CATRS_EPOCHS --lr_step_size $CATRS_EPOCHS --num-noise-vec 4 \
    --eps 256.0 --num-steps 4 --lbd 1.0 --smooth-prediction $SP/model_conf_${SIGMA}_train.npy \
    --pretrained-model $GAUSS/checkpoint.pth.tar

step "4/5 sequential certification of both smoothed classifiers (every ${CERT_SKIP}th test image, N0 = 100, N <= $N_MAX, alpha = 0.001)"
# The two models are certified side by side, one thread each: LeNet's small forward passes use two
# single-threaded processes better than one process with two threads.
OMP_NUM_THREADS=1 $PY code/certify.py fmnist $GAUSS/checkpoint.pth.tar $SIGMA $CERT/cohen/0/noise_${SIGMA}_sequential.tsv \
    --sequential --N-max=$N_MAX --radii $RADII --skip=$CERT_SKIP --seed 0 &
gauss_pid=$!
OMP_NUM_THREADS=1 $PY code/certify.py fmnist $CATRS/checkpoint.pth.tar $SIGMA \
    $CERT/catrs/adv_256.0_4/lbd_1.0/num_4/0/noise_${SIGMA}_sequential.tsv \
    --sequential --N-max=$N_MAX --radii $RADII --skip=$CERT_SKIP --seed 0 &
catrs_pid=$!
wait $gauss_pid
wait $catrs_pid

step "5/5 analysis"
echo "certifier: sequential CERTIFY (certify.py --sequential --radii $RADII), N0 = 100, N <= $N_MAX, alpha = 0.001; certified accuracy at 0 and those radii only, no ACR (README, Analysis)" \
    > $OUT/table.md
$PY code/analyze.py $CERT/cohen/0/noise_${SIGMA}_sequential.tsv $CERT/catrs/adv_256.0_4/lbd_1.0/num_4/0/noise_${SIGMA}_sequential.tsv \
    --labels "Gaussian" "CAT-RS" --radii 0 0.25 0.5 0.75 1.0 --plot $OUT/certified_accuracy.png \
    --title "Fashion-MNIST, sigma = $SIGMA (demo scale)" >> $OUT/table.md
cat $OUT/table.md

echo
echo "outputs ($(( $(date +%s) - start )) s):"
echo "  training runs:        $GAUSS/  $CATRS/"
echo "  smoothed prediction:  $SP/model_conf_${SIGMA}_train.npy"
echo "  certification:        $CERT/cohen/0/noise_${SIGMA}_sequential.tsv  $CERT/catrs/adv_256.0_4/lbd_1.0/num_4/0/noise_${SIGMA}_sequential.tsv"
echo "  table:                $OUT/table.md"
echo "  plot:                 $OUT/certified_accuracy.png"
