#!/usr/bin/env bash
# ImageNet with resnet50 ($IMAGENET_DIR holds train/ and val/): Gaussian pretraining, the smoothed
# prediction, CAT-RS at sigma 1.0 as published, and certification of every 100th validation image.
# Usage: bash scripts/imagenet.sh   (DRY_RUN=1 prints the commands; STAGES picks stages)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_sweep_lib.sh
D=imagenet; A=resnet50
if stage pretrain; then pretrain $D $A "--lr 0.1 --lr_step_size 30 --epochs 90 --batch 256 --id 0"; fi
if stage train; then
  run $PY code/train_catrs.py imagenet resnet50 --lr 0.1 --lr_step_size 30 --epochs 90 --batch 256 --num_noise_vec 2 --noise 1.0 --id 0 --eps 256.0 --num-steps 1 --lbd 2.0 --lr_drop 85 --warmup 80 --confidence_mask
fi
if stage certify; then bash scripts/certify_all.sh $D --skip=100 --batch=400; fi
