#!/usr/bin/env bash
# DPO on the real SmolLM2-135M-Instruct on the CPU: prefer the worked answer with the right
# number (chosen) to the same steps ending in a wrong number (rejected), and watch preference accuracy on
# held-out pairs (examples/data/dpo_arithmetic_heldout.jsonl: questions no training pair asks) rise.
# Held-out accuracy is the share of pairs whose implicit reward beta x (log pi - log pi_ref) is higher for the
# chosen answer; at step 0 the policy is its own reference, so every margin is 0 and the accuracy 0.
#   bash examples/dpo_demo.sh   (2m33s on 2 idle CPU cores; held-out accuracy 0.000 -> 0.700 -> 0.767)
# Environment: OUT (default runs/dpo_demo), STEPS (default 16), PAIRS (training pairs used, default 64: the
# reference pass scores each once), NPROC (default 1: MP=1; 3 gives MP=3).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/dpo_demo}"
steps="${STEPS:-16}"
pairs="${PAIRS:-64}"
nproc="${NPROC:-1}"
model="$(python3 tools/fetch_smollm2.py)"
rm -rf "$out"
mkdir -p "$out"
head -n "$pairs" examples/data/dpo_arithmetic.jsonl > "$out/train_pairs.jsonl"

torchrun --nproc_per_node "$nproc" solver_dpo.py --model_parallel_size "$nproc" \
  --ckpt_dir "$model" --train_file "$out/train_pairs.jsonl" --save_dir "$out" \
  --eval_file examples/data/dpo_arithmetic_heldout.jsonl --eval_steps $((steps / 2)) \
  --use_chat_template --max_seq_len 160 --max_batch_size 4 --epochs 2 --max_steps "$steps" \
  --loss_type sigmoid --beta 0.1 --lr 1e-5 --lr_scheduler constant --dtype float32 --log_steps 2

python3 - "$out/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
evals = [r for r in records if "eval_rewards/accuracies" in r]
print("\nheld-out pairs (never trained on):")
for r in evals:
    print(f"  step {r['step']:>3}: accuracy {r['eval_rewards/accuracies']:.3f} | margin {r['eval_rewards/margins']:+.4f}"
          f" | loss {r['eval_loss']:.4f}")
first, last = evals[0], evals[-1]
print(f"held-out accuracy: step {first['step']} {first['eval_rewards/accuracies']:.3f} -> step {last['step']} "
      f"{last['eval_rewards/accuracies']:.3f}; margin {first['eval_rewards/margins']:+.4f} -> "
      f"{last['eval_rewards/margins']:+.4f}")
PY

python3 -m llama_rlhf.plot "$out"  # loss, rewards, margins, accuracy, log-probs (each with eval_*), grad-norm
