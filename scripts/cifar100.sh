#!/usr/bin/env bash
# CIFAR-100 with cifar100_resnet110: every method at every sigma with the published hyperparameters, the smoothed
# prediction CAT-RS needs, and certification of every run (N = 100,000).
# Usage: bash scripts/cifar100.sh   (DRY_RUN=1 prints the commands; STAGES="pretrain train certify" picks stages)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_sweep_lib.sh
D=cifar100; A=cifar100_resnet110
if stage pretrain; then pretrain $D $A; fi
if stage train; then train_all $D $A; fi
if stage certify; then bash scripts/certify_all.sh $D; fi
