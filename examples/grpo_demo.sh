#!/usr/bin/env bash
# GRPO on the real SmolLM2-135M-Instruct, on the CPU, in a few minutes, with a held-out accuracy that rises.
# Task (examples/data/grpo_train.jsonl): "What is A + B?" for A, B in 1..12; the reward is last_number (1.0 when
# the last number in the reply is A + B). The base model often writes "7 + 5 = 12" but as often rambles or
# adds wrongly; GRPO moves it to short, right answers. Held-out split (examples/data/grpo_heldout.jsonl): 24
# operand pairs never trained on, in either order. Held-out accuracy (mean@n over n sampled answers, at the
# rollout temperature) is measured with solver_generate.py on the base model, logged during GRPO (eval/...),
# and measured again on the saved checkpoint; the script prints before -> after and plots the run.
#   bash examples/grpo_demo.sh   (1m47s on 2 idle CPU cores; held-out mean@8 0.125 -> 0.729)
# Environment: OUT (default runs/grpo_demo), STEPS (default 15), NPROC (default 1: MP=1; 3 gives MP=3).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/grpo_demo}"
steps="${STEPS:-15}"
nproc="${NPROC:-1}"
model="$(python3 tools/fetch_smollm2.py)"
heldout=examples/data/grpo_heldout.jsonl
samples=8  # group size, and samples per held-out prompt for the before/after scores (GRPO's own evals take 4)
sampling=(--use_chat_template --temperature 1.0 --max_new_tokens 16 --max_seq_len 128 --dtype float32)
rm -rf "$out"

score() {  # score CKPT NAME: held-out accuracy of CKPT into $out/heldout-NAME/summary.json
  torchrun --nproc_per_node "$nproc" solver_generate.py --model_parallel_size "$nproc" --ckpt_dir "$1" \
    --label_file "$heldout" --log_dir "$out/heldout-$2" "${sampling[@]}" --max_batch_size 96 \
    --num_samples_per_prompt "$samples" --reward_funcs last_number --pass_k 1,4,8 >/dev/null
}

start=$SECONDS
score "$model" base
torchrun --nproc_per_node "$nproc" solver_grpo.py --model_parallel_size "$nproc" \
  --ckpt_dir "$model" --train_file examples/data/grpo_train.jsonl --save_dir "$out" "${sampling[@]}" \
  --eval_file "$heldout" --eval_steps 5 --eval_num_samples 4 --rollout_batch_size 96 --reward_funcs last_number \
  --num_samples_per_prompt "$samples" --max_batch_size 2 --lr 2e-5 --max_steps "$steps" --log_completions_steps 5
score "$out/checkpoint-$steps" tuned

python3 - "$out" "$samples" "$((SECONDS - start))" <<'PY'
import json, sys
out, n, seconds = sys.argv[1], sys.argv[2], sys.argv[3]
base, tuned = (json.load(open(f"{out}/heldout-{w}/summary.json")) for w in ("base", "tuned"))
print(f"\nheld-out accuracy ({base['prompts']} prompts x {n} samples, solver_generate, {seconds} s in all):")
for key in (f"mean@{n}", "pass@4", f"pass@{n}"):
    print(f"  {key:8s} {base[key]:.3f} -> {tuned[key]:.3f}")
PY

python3 -m llama_rlhf.plot "$out"  # rewards, KL, clip, completion length, held-out accuracy
