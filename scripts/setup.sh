#!/usr/bin/env bash
# Set up llama_rlhf on a fresh machine: PyTorch, the package and its requirements, the demo model.
#   bash scripts/setup.sh          # to run the solvers
#   bash scripts/setup.sh --dev    # also test/benchmark tools and OpenMPI + shellcheck (Debian/Ubuntu, as root)
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    *) echo "usage: bash scripts/setup.sh [--dev]" >&2; exit 2 ;;
  esac
done

python3 -m pip install --quiet "torch==2.13.0"   # before anything that depends on torch (a CPU build where one is on disk)
python3 -m pip install --quiet -r requirements.txt
if [ "$dev" = 1 ]; then
  python3 -m pip install --quiet -r requirements-dev.txt
  if ! command -v mpirun >/dev/null 2>&1 || ! command -v shellcheck >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev shellcheck >/dev/null
    else
      echo "warning: install OpenMPI (mpirun) and shellcheck with your package manager for the multi-node tests" >&2
    fi
  fi
  python3 -m pip install --quiet "mpi4py>=3.1"
else
  python3 -m pip install --quiet transformers gguf accelerate matplotlib   # the demo model's GGUF conversion, the demos' plots
fi
python3 -m pip install --quiet --no-deps -e .
python3 tools/fetch_smollm2.py
