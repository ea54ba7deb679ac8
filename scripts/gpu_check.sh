#!/usr/bin/env bash
# GPU check: a short federated job with CUDA training and FAISS GPU K-means, then the server K-means
# timed side by side (FAISS GPU vs FAISS CPU vs scikit-learn) on the same uploads.
# Usage: scripts/gpu_check.sh [extra key=value overrides]   (installs .venv with faiss-gpu via make)
set -euo pipefail
cd "$(dirname "$0")/.."
make install
BIN=.venv/bin
$BIN/python - <<'PY'
import faiss, torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
      f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}")
print(f"faiss {faiss.__version__}, FAISS GPUs: {faiss.get_num_gpus()}")
PY
$BIN/feddymem train dataset=elpv federation.accelerator=cuda server.gpu=true federation.rounds=2 \
  federation.local_epochs=1 logger=none quiet=false output_dir="${OUT:-runs}" name="gpu-check-$(date +%s)" "$@"
echo "server K-means, same uploads (seconds):"
$BIN/python -m feddymem.benchmarks kmeans --scale 1 10
