#!/usr/bin/env bash
# SmolLM2's GGUF (98 MB) for a GPU machine whose calls carry at most 64 MiB each, the checkout
# (about 8 MiB) included: split in three, the first two parts parked there by one call each,
# the last carried by the next, which joins them (scripts/device_check.sh) while the machine is
# still warm. Writes .gpu-carry/smollm2-a/ (gguf.part-a1 and gguf.part-a2, 40 MiB each) and
# .gpu-carry/smollm2-b/ (the rest, the package's __init__.py and the whole file's SHA-256), all
# git-ignored. Usage: make device-wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
package=$("$PYTHON" -c "from privtune.sources import SMOLLM2_135M, locate; print(locate(SMOLLM2_135M).parent)")
gguf="$package/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -rf .gpu-carry && mkdir -p .gpu-carry/smollm2-a .gpu-carry/smollm2-b
dd if="$gguf" of=.gpu-carry/smollm2-a/gguf.part-a1 bs=1M count=40 status=none
dd if="$gguf" of=.gpu-carry/smollm2-a/gguf.part-a2 bs=1M skip=40 count=40 status=none
dd if="$gguf" of=.gpu-carry/smollm2-b/gguf.part-b bs=1M skip=80 status=none
cp "$package/__init__.py" .gpu-carry/smollm2-b/
sha256sum "$gguf" | cut -d' ' -f1 > .gpu-carry/smollm2-b/SHA256
cat .gpu-carry/smollm2-a/gguf.part-a? .gpu-carry/smollm2-b/gguf.part-b | sha256sum -c \
  <(echo "$(cat .gpu-carry/smollm2-b/SHA256)  -") >/dev/null
du -sh .gpu-carry/*
