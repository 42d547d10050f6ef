#!/usr/bin/env bash
# The main job on a built-in default: fine-tune the real SmolLM2-135M-Instruct on the built-in arithmetic set
# with 3-way tensor parallelism (torchrun, 3 ranks, CPU/gloo or GPUs), watch the loss fall, then sample
# answers from the base model and from the fine-tuned checkpoint side by side.
#   bash examples/sft_demo.sh            (about 3-5 minutes on 2 CPU cores)
# Environment: OUT (default runs/sft_demo), STEPS (default 40), NPROC (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/sft_demo}"
steps="${STEPS:-40}"
nproc="${NPROC:-3}"
model="$(python3 tools/fetch_smollm2.py)"
rm -rf "$out"

# float32 compute: on CPUs without AMX, bf16 matmuls are slower than fp32 ones.
torchrun --nproc_per_node "$nproc" solver_train.py \
  --model_parallel_size "$nproc" --sequence_parallel_size 1 \
  --ckpt_dir "$model" --train_file examples/data/sft_arithmetic.jsonl --save_dir "$out" \
  --use_chat_template --max_seq_len 256 --max_batch_size 8 --max_steps "$steps" \
  --lr 1e-4 --warmup_steps 4 --lr_scheduler cosine --dtype float32 --log_steps 2

for which in base tuned; do
  ckpt="$model"
  [ "$which" = tuned ] && ckpt="$out/checkpoint-$steps"
  torchrun --nproc_per_node "$nproc" solver_generate.py \
    --model_parallel_size "$nproc" --ckpt_dir "$ckpt" --label_file examples/data/prompts.jsonl \
    --log_dir "$out/generate-$which" --use_chat_template --temperature 0 --max_new_tokens 48 \
    --max_seq_len 256 --max_batch_size 4 --dtype float32 >/dev/null
done

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
base = [json.loads(l) for l in open(f"{out}/generate-base/results.jsonl")]
tuned = [json.loads(l) for l in open(f"{out}/generate-tuned/results.jsonl")]
for b, t in zip(base, tuned):
    print(f"\nQ: {b['instruction']}   (expected {b['answer']})")
    print(f"  base:  {b['output'][0].strip()}")
    print(f"  tuned: {t['output'][0].strip()}")
PY

python3 -m llama_rlhf.plot "$out"  # loss, lr, grad-norm, tokens/s (SFT); rewards, KL, clip, length (GRPO)
