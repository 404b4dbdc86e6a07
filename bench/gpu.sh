#!/usr/bin/env bash
# GPU checks, run on a machine with CUDA (one short script; ~5 minutes):
#   bash bench/gpu.sh
# 1. the pipeline's forward pass on cuda vs a bare forward loop on cuda (P1 on GPU);
# 2. the same build on cpu for the speed-up; results in bench/results/pipeline-cuda.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
$PY -m bench.pipeline --device cuda --images 1000 --large 0 --batch-size 64 --no-processes
$PY -c "import faiss; print('faiss GPUs:', getattr(faiss, 'get_num_gpus', lambda: 0)())"
# 3. FAISS on the GPUs (faiss-gpu installed): IVF training for 1M vectors, CPU vs GPU k-means.
if $PY -c "import faiss, sys; sys.exit(0 if getattr(faiss, 'get_num_gpus', lambda: 0)() > 0 else 1)"; then
  $PY -m bench.index --sizes 1000000 --dim 112 --device cuda --workdir /tmp/hoverlay-gpu-index
  echo "compare with bench/results/index_d112.json (CPU)"
else
  echo "faiss has no GPU support here (pip install faiss-gpu-cu12 for the GPU k-means check)"
fi
