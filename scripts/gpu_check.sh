#!/usr/bin/env bash
# GPU check, in five steps on one NVIDIA GPU:
#   1. the GPU tests (tests/gpu): FAISS GPU K-means and search against their CPU twins, the model on CUDA
#      against the CPU, a short federated run with CUDA training and FAISS GPU K-means;
#   2. a federated job on a real data set (DATASET, default elpv) with CUDA training and the server's
#      K-means on the FAISS GPU;
#   3. the server K-means timed side by side (FAISS GPU, FAISS CPU, scikit-learn) on the same uploads;
#   4. the job of step 2 on the CPU, for its time and accuracy beside the GPU's;
#   5. the job of step 2 under Fabric and over Flower on loopback, every site on CUDA (bench engines).
# Usage: scripts/gpu_check.sh [key=value ...]             installs .venv (faiss-gpu) with `make install`
#        FEDDYMEM_PYTHON=python3 scripts/gpu_check.sh ...  uses an interpreter that already holds the
#                                                         dependencies (a CUDA image without a package
#                                                         registry) and runs feddymem from src/
# OUT (default runs/gpu-check) receives the run folders, kmeans.txt and gpu_check.json (steps 2 and 4).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${FEDDYMEM_PYTHON:-}" ]]; then
  PY=$FEDDYMEM_PYTHON
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  make install
  PY=.venv/bin/python
fi
OUT_DIR=${OUT:-runs/gpu-check}
mkdir -p "$OUT_DIR"
export WANDB_MODE=offline

$PY - <<'PY'
import faiss, torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
      f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}")
print(f"faiss {faiss.__version__}, FAISS GPUs: {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}")
PY

echo "== 1. GPU tests"
$PY -m pytest -q -p no:cacheprovider -rs -m gpu tests/gpu || status=$?

job=(train "dataset=${DATASET:-elpv}" logger=none quiet=false "output_dir=$OUT_DIR" "$@")
run_job() {  # run_job <accelerator> <server.gpu>: the federated job, its wall time in <run>/wall_s
  local start
  start=$(date +%s.%N)
  $PY -m feddymem.cli "${job[@]}" "name=$1" "federation.accelerator=$1" "server.gpu=$2"
  awk "BEGIN { print $(date +%s.%N) - $start }" > "$OUT_DIR/$1/wall_s"
}
echo "== 2. a federated job on CUDA, the server's K-means on the FAISS GPU"
run_job cuda true

echo "== 3. server K-means, same uploads (seconds)"
$PY -m feddymem.benchmarks kmeans --scale 1 10 | tee "$OUT_DIR/kmeans.txt"

echo "== 4. the same job on the CPU"
run_job cpu false

echo "== 5. Fabric and Flower back to back, every site on CUDA"
$PY -m feddymem.cli bench engines "dataset=${DATASET:-elpv}" federation.accelerator=cuda server.gpu=true "$@" \
  --out "$OUT_DIR/engines" --runs "$OUT_DIR/engine-runs" || status=$?

$PY - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for name in ("cuda", "cpu"):
    m = json.loads((out / name / "metrics.json").read_text())
    clients = m["final"]["clients"].values()
    summary[name] = {
        "mean_image_auroc": sum(c["image_auroc"] for c in clients) / len(clients),
        "server_on_gpu": [r["server"].get("gpu") for r in m["rounds"]],
        "wall_s": float((out / name / "wall_s").read_text()),
    }
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
exit "${status:-0}"
