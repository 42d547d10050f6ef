"""Batched sampling from a sharded model (evaluation, best-of-n, data generation).

    torchrun --nproc_per_node 8 solver_generate.py --model_parallel_size 4 --ckpt_dir CKPT \\
        --label_file test.jsonl --log_dir LOGS --model_type llama3-hf --max_seq_len 1024 --max_batch_size 128 \\
        --temperature 0.6 --top_p 0.95 --num_samples_per_prompt 4 --use_chat_template

Writes LOGS/results.jsonl: one line per input line, in input order, with "output" the list of samples.
With --reward_funcs (the GRPO reward spec) every sample is scored, and LOGS/summary.json (also printed) gives the
mean reward per function, accuracy as mean@n, pass@k for --pass_k and maj@n for numeric answers.
"""
import argparse
import os

from llama_rlhf.cli import (add_bool, add_chat_flags, add_llama_rlhf_flags, add_lora_flags, add_model_flags,
                            add_reward_flags, check_numbers)
from llama_rlhf.data.readers import read_records
from llama_rlhf.parallel.state import init_parallel
from llama_rlhf.rewards import build_rewards, check_required_fields
from llama_rlhf.runtime import UsageError, log, parse_dtype, run_main, seed_everything
from llama_rlhf.inference.scoring import parse_pass_k


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_chat_flags(p)
    d = p.add_argument_group("data")
    d.add_argument("--label_file", required=True,
                   help='jsonl: {"instruction"[, "system"]} or {"messages": [...]} per line; other fields are kept')
    d.add_argument("--log_dir", required=True, help="results.jsonl goes here")
    add_bool(d, "--strict", False, "a prompt that does not fit --max_seq_len is an error instead of cut from the left")
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    s.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    s.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    s.add_argument("--max_new_tokens", type=int, default=512, help="longest response in tokens")
    s.add_argument("--num_samples_per_prompt", type=int, default=1, help="samples per prompt (one prefill each)")
    s.add_argument("--log_every", type=float, default=30.0, help="seconds between progress lines")
    add_bool(s, "--cuda_graphs", False, "on CUDA, decode with a fixed-shape step captured once per generate call "
             "as a CUDA graph and replayed for every token (inference/static_step.py); ignored without CUDA")
    r = p.add_argument_group("scoring")
    add_reward_flags(r, None)
    r.add_argument("--pass_k", default=None,
                   help="comma list of k for pass@k, each <= --num_samples_per_prompt (default 1, 2, 4, ... n)")
    add_lora_flags(p, training=False)
    add_llama_rlhf_flags(p, "generate")
    args = p.parse_args(argv)
    check_numbers(args)
    if not args.ckpt_dir:
        raise UsageError("--ckpt_dir is required (the checkpoint to sample from)")
    if args.max_batch_size < 1:
        raise UsageError(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
    if args.max_seq_len < 2:
        raise UsageError(f"--max_seq_len must be >= 2 (a prompt token and a new one), got {args.max_seq_len}")
    if args.pass_k is not None and not args.reward_funcs:
        raise UsageError("--pass_k needs --reward_funcs (the rewards that decide which samples are correct)")
    if args.reward_funcs:
        args.pass_k = parse_pass_k(args.pass_k, args.num_samples_per_prompt)
    return args


def load_rewards(args):
    """The reward functions, and every line of --label_file holding the fields they need (before any model)."""
    if not args.reward_funcs:
        return None
    rewards = build_rewards(args.reward_funcs, args.reward_weights, (args.length_min, args.length_max))
    check_required_fields(rewards, read_records(args.label_file))
    return rewards


def main():
    args = parse_args()
    rewards = load_rewards(args)
    compute_dtype = parse_dtype(args.dtype)
    ps = init_parallel(args.model_parallel_size, args.sequence_parallel_size, args.distributed_timeout_minutes)
    seed_everything(args.seed)
    from llama_rlhf.inference.batch_generate import run_generation
    from llama_rlhf.models.families import detect_model_type, get_family
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.tokenizer import load_tokenizer, tokenizer_source

    if not os.path.isdir(args.ckpt_dir):
        raise FileNotFoundError(f"--ckpt_dir {args.ckpt_dir} does not exist or is not a directory")
    model_type = args.model_type or detect_model_type(args.ckpt_dir)
    get_family(model_type)
    tok = load_tokenizer(tokenizer_source(args.tokenizer_file, args.ckpt_dir), model_type=model_type)
    if args.lora_dir:
        from llama_rlhf.checkpoint.peft import check_adapter_dir, load_adapter
        from llama_rlhf.models.lora import merge_lora
        check_adapter_dir(args.lora_dir)
        model = load_pretrained(args.ckpt_dir, model_type, ps, args.config_file)  # fp32: merged, then cast
        load_adapter(model, args.lora_dir)
        merge_lora(model)  # W + scaling B A on this rank's slices: sampling runs at the base model's speed
        model = model.to(compute_dtype)
    else:
        model = load_pretrained(args.ckpt_dir, model_type, ps, args.config_file, dtype=compute_dtype)
    model.requires_grad_(False)  # sampling only: frozen weights keep their CPU-packed copies across chunks
    if args.max_seq_len > model.cfg.max_position_embeddings:
        raise UsageError(f"--max_seq_len {args.max_seq_len} is beyond this model's max_position_embeddings "
                         f"({model.cfg.max_position_embeddings}); pass --max_seq_len {model.cfg.max_position_embeddings}")
    log(f"generating with {model_type} | MP={ps.mp_size} x {ps.dp_size * ps.sp_size} replicas | "
        f"{str(compute_dtype).replace('torch.', '')} | temperature {args.temperature} top_p {args.top_p} "
        f"top_k {args.top_k} | {args.num_samples_per_prompt} samples/prompt", ps)
    path = run_generation(args, model, tok, ps, compute_dtype, rewards)
    if path:
        log(f"done: {path}", ps)


if __name__ == "__main__":
    run_main(main)
