#!/usr/bin/env bash
# Fashion-MNIST with lenet (baselines 90 epochs from lr 0.01, x0.1 every 30; CAT-RS 150 epochs, x0.1 every 50): every method at every sigma with the published hyperparameters, the smoothed
# prediction CAT-RS needs, and certification of every run (N = 100,000).
# Usage: bash scripts/fmnist.sh   (DRY_RUN=1 prints the commands; STAGES="pretrain train certify" picks stages)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_sweep_lib.sh
D=fmnist; A=lenet
if stage pretrain; then pretrain $D $A; fi
if stage train; then train_all $D $A; fi
if stage certify; then bash scripts/certify_all.sh $D; fi
