#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach the internet: the device tool's H200 machines have
# Python 3.12 with torch, transformers (5.17), peft, accelerate, pytest and hypothesis, but not
# privtune's other dependencies. Each is pinned as in requirements.lock. The checks use that
# machine's transformers: its wheel (13 MiB) would not leave room beside SmolLM2's GGUF in a
# call's 64 MiB. The second group is what the pipeline's stages need there without DVC
# (benchmarks/profile_stages.py): MLflow's tracking client and its sqlite store (mlflow-skinny;
# the full package adds the server and UI), and the GGUF reader. Written to .whl/
# (git-ignored), which scripts/device_check.sh installs there. Usage: make device-wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PACKAGES=(
  opacus pydantic pydantic-core annotated-types typing-inspection typing-extensions
  dp-accounting dm-tree dill gymnasium farama-notifications stable-baselines3 peft
  mlflow-skinny sqlalchemy alembic mako greenlet sqlparse databricks-sdk
  google-auth pyasn1 pyasn1-modules cachetools fastapi starlette uvicorn annotated-doc
  importlib-metadata opentelemetry-api opentelemetry-sdk opentelemetry-proto
  opentelemetry-semantic-conventions python-dotenv cryptography cffi pycparser gguf
)
pins=()
for package in "${PACKAGES[@]}"; do
  pin=$(grep -i "^${package}==" requirements.lock) || {
    echo "device_wheels.sh: $package is not in requirements.lock (make lock)" >&2
    exit 1
  }
  pins+=("$pin")
done
rm -rf .whl.tmp && mkdir .whl.tmp
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl.tmp "${pins[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
rm -rf .whl && mv .whl.tmp .whl  # all or nothing: a failed download leaves the last good set
size=$(du -sm .whl | cut -f1)
echo "$(ls .whl | wc -l) wheels in .whl/ ($size MiB; with the checkout it must stay under 64 MiB)"
