"""Supervised fine-tuning and pretraining on MP x SP x DP ranks.

    torchrun --nproc_per_node 8 solver_train.py --model_parallel_size 2 --sequence_parallel_size 1 \\
        --ckpt_dir CKPT --save_dir OUT --train_file train.jsonl --use_chat_template
"""
import argparse

from llama_rlhf.cli import (add_bool, add_chat_flags, add_data_flags, add_llama_rlhf_flags, add_lora_flags,
                            add_memory_flags, add_model_flags, add_report_flags, check_numbers)
from llama_rlhf.parallel.state import init_parallel
from llama_rlhf.runtime import UsageError, log, parse_dtype, run_main, seed_everything
from llama_rlhf.training.lr_schedule import SCHEDULES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_chat_flags(p)
    add_data_flags(p)
    g = p.add_argument_group("generation tracking")
    g.add_argument("--sample_prompts_file", default=None,
                   help='a few prompts ({"instruction"} or {"messages"} lines) answered greedily at step 0, every '
                        '--sample_steps and at the end; the answers go to metrics.jsonl as "samples"')
    g.add_argument("--sample_steps", type=int, default=0, help="track the sample prompts every N steps (0: start "
                                                                "and end only)")
    g.add_argument("--sample_max_new_tokens", type=int, default=64, help="longest tracked answer in tokens")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    o.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
    o.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    o.add_argument("--lr_scheduler", default="cosine", choices=SCHEDULES, help="decay after warmup")
    o.add_argument("--warmup_steps", type=int, default=0, help="linear warmup steps")
    o.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay (matrices only)")
    o.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 (first-moment decay)")
    o.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 (second-moment decay)")
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step; the loss is the token mean over all of them")
    add_bool(o, "--activation_checkpointing", False, "recompute each layer in backward to save memory")
    add_memory_flags(o)
    add_lora_flags(p)
    add_bool(o, "--from_scratch", False, "pretrain a new model from --config_file instead of loading --ckpt_dir")
    s = p.add_argument_group("checkpoints and logs")
    s.add_argument("--save_dir", required=True, help="where checkpoint-N folders (HF format + training state) go")
    s.add_argument("--log_dir", default=None, help="metrics.jsonl goes here (default: --save_dir)")
    add_report_flags(s)
    s.add_argument("--save_steps", type=int, default=0, help="save every N optimizer steps (0: only at the end)")
    s.add_argument("--save_total_limit", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    s.add_argument("--save_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the exported HF weights (fp32 masters are kept for resume either way)")
    add_bool(s, "--resume", False, "continue the newest checkpoint in --save_dir exactly where it stopped")
    s.add_argument("--log_steps", type=int, default=1, help="print a progress line every N steps")
    add_llama_rlhf_flags(p, "train")
    args = p.parse_args(argv)
    check_numbers(args)
    args.packing = args.packing or args.stream_packing  # streamed rows hold several documents: keep them apart
    for name in ("max_batch_size", "gradient_accumulation_steps", "epochs", "max_seq_len", "log_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.sample_steps and not args.sample_prompts_file:
        raise UsageError("--sample_steps needs --sample_prompts_file (the prompts to track)")
    return args


def main():
    args = parse_args()
    ps = init_parallel(args.model_parallel_size, args.sequence_parallel_size, args.distributed_timeout_minutes)
    seed_everything(args.seed)
    from llama_rlhf.training.sft import train
    path = train(args, ps, parse_dtype(args.dtype))
    log(f"done: {path} (an HF folder: transformers.AutoModelForCausalLM.from_pretrained loads it)", ps)


if __name__ == "__main__":
    run_main(main)
