#!/usr/bin/env bash
# GPU check (at most 8 minutes on one CUDA GPU): the package's CUDA paths against transformers, SFT/GRPO steps,
# train and generation speed, peak memory. Writes gpu_check.json and gpu_check.md into OUT_DIR (default: here).
#   bash scripts/gpu_check.sh [SMOLLM2_DIR] [OUT_DIR]
# Needs torch (2.11+) with CUDA, transformers and safetensors; no network (SmolLM2: python3 tools/fetch_smollm2.py
# on a machine with one, then copy the folder). Exits non-zero when a check fails or no CUDA device is present.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
smollm2="${1:-${LLAMA_RLHF_CACHE:-$HOME/.cache/llama_rlhf}/SmolLM2-135M-Instruct}"
out="${2:-$PWD}"
status=0
timeout --signal=INT --kill-after=20 "${GPU_CHECK_SECONDS:-480}" \
  "${PYTHON:-python3}" "$repo/tools/gpu_check.py" --smollm2 "$smollm2" --out "$out" || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_check: stopped after ${GPU_CHECK_SECONDS:-480} s; the figures so far are in $out/gpu_check.md" >&2
fi
exit "$status"
