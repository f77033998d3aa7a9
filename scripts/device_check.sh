#!/usr/bin/env bash
# The GPU checks, in one command on a lent GPU machine (the device tool; no internet there).
# Prepare here, once: `make device-wheels` (.whl/). Then, through the device tool:
#   run  command: bash scripts/device_check.sh   carry: [".whl"]   timeout_s: 540
# It runs the CUDA tests (tests/test_cuda.py: CPU/CUDA parity in fp32, bf16 autocast by
# default) and make bench's GPU rows (benchmarks/step_overhead.py: the default model,
# GPT-2-small's size, and SmolLM2-135M's architecture at the smollm2 profile's 32 records x 340
# tokens, with random weights: the GGUF (98 MB) is over the 64 MiB a call carries, and a step's
# time and memory do not depend on the values). Everything lands in $OUT: the logs and
# step_overhead.json (this machine's CPU rows kept, the CUDA rows added); commit the JSON.
set -uo pipefail
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "no wheels: run make device-wheels here first"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/gpu.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m "slow or not slow" tests/test_cuda.py 2>&1 \
  | tee "$OUT/test_cuda.log" || status=1
python3 benchmarks/step_overhead.py --steps 20 --smollm2-weights random \
  --smollm2-batch 32 --smollm2-length 340 2>&1 | tee "$OUT/step_overhead.log" || status=1
cp benchmarks/results/step_overhead.json "$OUT/" || status=1
exit $status
