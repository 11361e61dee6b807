#!/usr/bin/env bash
# Train the candidate architectures with the same budget (data, image size, epochs, schedule, seed),
# one after the other, into runs/<arch>/. The default model is the best of them on val AUC.
# Usage: training/train_candidates.sh [extra train.py options]
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
for arch in ${ARCHS:-mobilenet_v3_large resnet18 efficientnet_b0}; do
  if [ -f "runs/$arch/model.pt" ]; then echo "runs/$arch/model.pt exists, skipping"; continue; fi
  resume=()
  if [ -f "runs/$arch/last.pt" ]; then resume=(--resume "runs/$arch/last.pt"); fi
  "$PYTHON" -m training.train --arch "$arch" --image-size 128 --epochs 12 --batch-size 32 --lr 2e-3 \
    --weight-decay 0.05 --channels-last --half-checkpoint --threads 2 --workers 1 --seed 0 \
    --output-dir "runs/$arch" "${resume[@]}" "$@"
done
