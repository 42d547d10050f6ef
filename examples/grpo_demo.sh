#!/usr/bin/env bash
# GRPO on the real SmolLM2-135M-Instruct with rule rewards, on the CPU, in a few minutes.
# Rewards: accuracy (the number inside <answer></answer> equals the data's answer) and length (1.0 for
# completions of 4-24 tokens, less outside). The small model rarely gets the sums right, so most of the
# rise comes from learning to answer briefly; the mean reward per step is printed and summarised at the end.
#   bash examples/grpo_demo.sh
# Environment: OUT (default runs/grpo_demo), STEPS (default 16), NPROC (default 1: MP=1; 3 gives MP=3).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/grpo_demo}"
steps="${STEPS:-16}"
nproc="${NPROC:-1}"
model="$(python3 tools/fetch_smollm2.py)"
rm -rf "$out"

torchrun --nproc_per_node "$nproc" solver_grpo.py --model_parallel_size "$nproc" \
  --ckpt_dir "$model" --train_file examples/data/grpo_arithmetic.jsonl --save_dir "$out" \
  --use_chat_template --reward_funcs accuracy,length --length_min 4 --length_max 24 \
  --num_samples_per_prompt 6 --max_batch_size 2 --max_new_tokens 32 --max_seq_len 192 \
  --lr 1e-5 --max_steps "$steps" --dtype float32 --log_completions_steps 8

python3 - "$out/metrics.jsonl" <<'PY'
import json, sys
rewards = [json.loads(line)["reward_mean"] for line in open(sys.argv[1])]
k = max(1, len(rewards) // 4)
print(f"\nmean reward: first {k} steps {sum(rewards[:k]) / k:.3f} -> last {k} steps {sum(rewards[-k:]) / k:.3f}")
PY

python3 -m llama_rlhf.plot "$out"  # loss, lr, grad-norm, tokens/s (SFT); rewards, KL, clip, length (GRPO)
