"""GRPO (Group Relative Policy Optimization) with rule rewards on MP x SP x DP ranks.

    torchrun --nproc_per_node 8 solver_grpo.py --model_parallel_size 2 --ckpt_dir CKPT --model_type qwen \\
        --train_file math.jsonl --save_dir OUT --num_samples_per_prompt 8 --reward_funcs accuracy,format \\
        --beta 0.04 --lr 1e-6 --use_chat_template

Reward functions: accuracy, last_number, format, length, or path/to/file.py:function with the signature
``def reward(completion: str, sample: dict) -> float`` (see llama_rlhf/rewards.py).
"""
import argparse

from llama_rlhf.cli import (add_bool, add_chat_flags, add_llama_rlhf_flags, add_lora_flags, add_memory_flags,
                            add_model_flags, add_report_flags, add_reward_flags, check_numbers)
from llama_rlhf.parallel.state import init_parallel
from llama_rlhf.runtime import UsageError, log, parse_dtype, run_main, seed_everything
from llama_rlhf.training.grpo_loss import IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS, LOSS_TYPES, SCALE_REWARDS
from llama_rlhf.training.lr_schedule import SCHEDULES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_chat_flags(p)
    d = p.add_argument_group("data and rewards")
    d.add_argument("--train_file", required=True,
                   help='jsonl: {"instruction" or "messages", "answer" (for accuracy), any other fields}')
    add_reward_flags(d, "accuracy,format")
    d.add_argument("--eval_file", default=None,
                   help="held-out jsonl (like --train_file) sampled and scored with the rewards at step 0, every "
                        "--eval_steps and at the end: eval/<reward>, eval/mean@n, eval/pass@k, eval/maj@n")
    d.add_argument("--eval_steps", type=int, default=0, help="evaluate every N steps (0: start and end only)")
    d.add_argument("--eval_num_samples", type=int, default=0,
                   help="samples per held-out prompt (default: --num_samples_per_prompt)")
    s = p.add_argument_group("sampling")
    s.add_argument("--num_samples_per_prompt", type=int, default=8, help="group size G")
    s.add_argument("--max_new_tokens", type=int, default=256, help="longest completion")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (also used for log-probs)")
    s.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold")
    s.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    s.add_argument("--rollout_batch_size", type=int, default=0,
                   help="sequences decoded together (default: all of this rank's samples of the step)")
    s.add_argument("--rollout_dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="sample from a copy of the policy held and computed in this dtype (e.g. bf16 rollouts from "
                        "fp32 masters), refreshed after each update; the loss still uses the trainer's log-probs "
                        "(default: sample from the policy itself in --dtype)")
    s.add_argument("--rollout_quantization", default="none", choices=("none", "int8"),
                   help="int8: the rollout copy's decoder linears in weight-only int8 (one scale per output channel), "
                        "activations in --rollout_dtype (default float32); re-quantized after each update")
    add_bool(s, "--cuda_graphs", False, "on CUDA, decode with a fixed-shape step captured once per generate call "
             "as a CUDA graph and replayed for every token (inference/static_step.py); ignored without CUDA")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=1, help="passes over the prompts")
    o.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    o.add_argument("--lr", type=float, default=1e-6, help="peak learning rate")
    o.add_argument("--lr_scheduler", default="constant", choices=SCHEDULES, help="decay after warmup")
    o.add_argument("--warmup_steps", type=int, default=0,
                   help="linear warmup, in optimizer steps (steps x num_iterations x steps_per_rollout)")
    o.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay (matrices only)")
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    o.add_argument("--beta", type=float, default=0.0,
                   help="KL penalty weight to the frozen initial model; 0 keeps no reference model")
    o.add_argument("--kl_estimator", default="k3_corrected", choices=KL_ESTIMATORS,
                   help="k3: DeepSeekMath's exp(ref - logp) - (ref - logp) - 1 per token, whose gradient "
                        "beta (1 - p_ref / p) is biased; k3_corrected: k3 x the importance ratio, whose gradient is "
                        "the reverse KL's, beta (log p - log p_ref) (DeepSeek-V3.2; TRL's default)")
    o.add_argument("--epsilon", type=float, default=0.2, help="lower clip: ratio >= 1 - epsilon")
    o.add_argument("--epsilon_high", type=float, default=None, help="upper clip: ratio <= 1 + epsilon_high "
                                                                    "(default: --epsilon)")
    o.add_argument("--delta", type=float, default=None,
                   help="clipped losses: also cap the unclipped ratio at delta (INTELLECT-2's two-sided clip); "
                        "must exceed 1 + epsilon_high (default: no cap)")
    o.add_argument("--loss_type", default="dapo", choices=LOSS_TYPES,
                   help="clipped surrogate with grpo: mean of sequence means; bnpo: token mean per micro-batch; "
                        "dr_grpo: token sum / (sequences x max_new_tokens); dapo: token sum / all completion tokens "
                        "of the step. cispo: REINFORCE weighted by the detached min(ratio, cispo_epsilon_max), "
                        "normalised as dapo; sapo: a soft sigmoid gate instead of the clip, normalised as grpo")
    o.add_argument("--importance_sampling_level", default="token", choices=IMPORTANCE_SAMPLING_LEVELS,
                   help="token: one ratio per token; sequence: one per completion, exp(mean token log-ratio) (GSPO)")
    o.add_argument("--cispo_epsilon_max", type=float, default=5.0,
                   help="cispo: upper bound of the importance weight (ScaleRL's epsilon_max; TRL's epsilon_high)")
    o.add_argument("--sapo_temperature_pos", type=float, default=1.0, help="sapo: gate temperature where A > 0")
    o.add_argument("--sapo_temperature_neg", type=float, default=1.05, help="sapo: gate temperature where A <= 0")
    o.add_argument("--entropy_coef", type=float, default=0.0,
                   help="entropy bonus: the loss minus entropy_coef x the mean token entropy (0: off)")
    o.add_argument("--scale_rewards", default="group", choices=SCALE_REWARDS,
                   help="advantage = (r - group mean) / std of the group, of the batch, or not scaled")
    o.add_argument("--num_iterations", type=int, default=1, help="passes over each rollout batch (mu)")
    o.add_argument("--steps_per_rollout", type=int, default=1,
                   help="optimizer steps per pass over a rollout batch, each on its own slice of the batch (TRL's "
                        "steps_per_generation / gradient_accumulation_steps); must divide max_batch_size x "
                        "num_samples_per_prompt")
    o.add_argument("--train_batch_size", type=int, default=0,
                   help="sequences per forward/backward micro-batch (default: all of this rank's rollouts of an "
                        "optimizer step)")
    add_memory_flags(o)
    add_lora_flags(p)
    add_bool(o, "--mask_truncated_completions", False, "leave completions that hit max_new_tokens out of the loss")
    add_bool(o, "--shared_prompts", True, "update: each row holds one prompt and all of its samples' completions in "
             "the micro-batch, attending to the prompt and to themselves only, so the prompt's forward and backward "
             "run once per group, not once per sample (the same loss and gradient; rows over 4096 tokens, and "
             "--sequence_parallel_size > 1, use one row per sample)")
    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--save_dir", required=True, help="where checkpoint-N folders (HF format + training state) go")
    c.add_argument("--log_dir", default=None, help="metrics.jsonl goes here (default: --save_dir)")
    add_report_flags(c)
    c.add_argument("--save_steps", type=int, default=0, help="save every N steps (0: only at the end)")
    c.add_argument("--save_total_limit", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    c.add_argument("--save_dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the exported HF weights")
    add_bool(c, "--resume", False, "continue the newest checkpoint in --save_dir")
    c.add_argument("--log_completions_steps", type=int, default=10, help="print sample completions every N steps")
    add_llama_rlhf_flags(p, "grpo")
    args = p.parse_args(argv)
    check_numbers(args)
    if args.num_samples_per_prompt < 2:
        raise UsageError(f"--num_samples_per_prompt {args.num_samples_per_prompt}: GRPO compares each sample with "
                         f"the other samples of its prompt, so one sample has no group (every advantage would be 0 "
                         f"and nothing learned); pass --num_samples_per_prompt 2 or more (8 is usual)")
    if args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    if not args.ckpt_dir:
        raise UsageError("--ckpt_dir is required")
    for name in ("num_samples_per_prompt", "max_batch_size", "num_iterations", "epochs", "steps_per_rollout"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if (args.eval_steps or args.eval_num_samples) and not args.eval_file:
        raise UsageError("--eval_steps and --eval_num_samples need --eval_file (the held-out prompts)")
    per_rank = args.max_batch_size * args.num_samples_per_prompt
    if per_rank % args.steps_per_rollout:
        raise UsageError(f"--steps_per_rollout {args.steps_per_rollout} must divide the rollouts of a rank per step "
                         f"(--max_batch_size {args.max_batch_size} x --num_samples_per_prompt "
                         f"{args.num_samples_per_prompt} = {per_rank})")
    if args.delta is not None and args.delta <= 1 + args.epsilon_high:
        raise UsageError(f"--delta {args.delta} must exceed 1 + --epsilon_high ({1 + args.epsilon_high:g}): a lower "
                         "cap would stop the gradient inside the clip range")
    for name in ("cispo_epsilon_max", "sapo_temperature_pos", "sapo_temperature_neg"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be > 0")
    if args.rollout_quantization != "none" and args.quantize_base not in (None, "none"):
        raise UsageError(f"--rollout_quantization {args.rollout_quantization} with --quantize_base "
                         f"{args.quantize_base}: the base is already quantized and rollouts sample from it; drop one")
    if args.temperature <= 0:
        raise UsageError("--temperature must be > 0 for GRPO (groups need different samples)")
    return args


def main():
    args = parse_args()
    from llama_rlhf.rewards import build_rewards
    build_rewards(args.reward_funcs, args.reward_weights)  # a bad spec fails on every rank before start-up
    ps = init_parallel(args.model_parallel_size, args.sequence_parallel_size, args.distributed_timeout_minutes)
    seed_everything(args.seed)
    from llama_rlhf.training.grpo import train_grpo
    path = train_grpo(args, ps, parse_dtype(args.dtype))
    log(f"done: {path}", ps)


if __name__ == "__main__":
    run_main(main)
