#!/usr/bin/env bash
# ImageNet with resnet50 ($IMAGENET_DIR holds train/ and val/): Gaussian pretraining, the smoothed
# prediction, CAT-RS at sigma 1.0 as published, and certification of every 100th validation image.
# Usage: bash scripts/imagenet.sh   (DRY_RUN=1 prints the commands; STAGES picks stages)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_sweep_lib.sh
D=imagenet; A=resnet50
if stage pretrain; then pretrain $D $A; fi
if stage train; then train_all $D $A; fi
if stage certify; then bash scripts/certify_all.sh $D --skip=100 --batch=400; fi
