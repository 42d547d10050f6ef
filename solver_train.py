"""Supervised fine-tuning and pretraining on MP x SP x DP ranks.

    torchrun --nproc_per_node 8 solver_train.py --model_parallel_size 2 --sequence_parallel_size 1 \\
        --ckpt_dir CKPT --save_dir OUT --train_file train.jsonl --use_chat_template
"""
import argparse

from llama_rlhf.cli import (add_bool, add_chat_flags, add_checkpoint_flags, add_data_flags, add_llama_rlhf_flags,
                            add_lora_flags, add_memory_flags, add_model_flags, add_optimizer_flags,
                            check_training_flags)
from llama_rlhf.parallel.state import init_parallel
from llama_rlhf.runtime import UsageError, log, parse_dtype, run_main, seed_everything


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
    o = add_optimizer_flags(p, lr=1e-5)
    add_memory_flags(o)
    add_lora_flags(p)
    add_bool(o, "--from_scratch", False, "pretrain a new model from --config_file instead of loading --ckpt_dir")
    add_checkpoint_flags(p)
    add_llama_rlhf_flags(p, "train")
    args = p.parse_args(argv)
    check_training_flags(args)
    args.packing = args.packing or args.stream_packing  # streamed rows hold several documents: keep them apart
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
