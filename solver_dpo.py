"""Preference optimization (DPO, IPO, hinge, SimPO) on MP x SP x DP ranks, from chosen/rejected pairs.

    torchrun --nproc_per_node 8 solver_dpo.py --model_parallel_size 2 --ckpt_dir CKPT --train_file prefs.jsonl \\
        --save_dir OUT --loss_type sigmoid --beta 0.1 --lr 5e-7 --use_chat_template

Records: {"prompt" | "instruction" | "messages", "chosen", "rejected"}, responses as strings or assistant
message lists (TRL's preference format), or chosen/rejected conversations sharing their leading turns.
"""
import argparse

from llama_rlhf.cli import (add_chat_flags, add_checkpoint_flags, add_data_flags, add_llama_rlhf_flags,
                            add_lora_flags, add_memory_flags, add_model_flags, add_optimizer_flags,
                            check_training_flags)
from llama_rlhf.parallel.state import init_parallel
from llama_rlhf.runtime import log, parse_dtype, run_main, seed_everything
from llama_rlhf.training.dpo_loss import LOSS_TYPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_chat_flags(p)
    add_data_flags(p)
    o = add_optimizer_flags(p, lr=5e-7)
    add_memory_flags(o)
    add_lora_flags(p)
    d = p.add_argument_group("preference loss (README, \"Preference optimization\")")
    d.add_argument("--loss_type", default="sigmoid", choices=LOSS_TYPES,
                   help="sigmoid (DPO), ipo, hinge (SLiC), simpo (reference-free, length-normalised)")
    d.add_argument("--beta", type=float, default=0.1, help="inverse temperature of the implicit reward (> 0)")
    d.add_argument("--label_smoothing", type=float, default=0.0,
                   help="sigmoid / simpo: the chance a pair's labels are flipped (conservative DPO), in [0, 0.5)")
    d.add_argument("--simpo_gamma", type=float, default=0.5, help="simpo: the target reward margin gamma")
    d.add_argument("--sft_weight", type=float, default=0.0,
                   help="add this times the chosen responses' token-mean NLL to the loss (0: off)")
    add_checkpoint_flags(p)
    add_llama_rlhf_flags(p, "train")
    args = p.parse_args(argv)
    check_training_flags(args)
    from llama_rlhf.training.dpo_loss import PreferenceLoss
    PreferenceLoss(args.loss_type, args.beta, args.label_smoothing, args.simpo_gamma, args.sft_weight).check()
    return args


def main():
    args = parse_args()
    ps = init_parallel(args.model_parallel_size, args.sequence_parallel_size, args.distributed_timeout_minutes)
    seed_everything(args.seed)
    from llama_rlhf.training.dpo import train_dpo
    path = train_dpo(args, ps, parse_dtype(args.dtype))
    log(f"done: {path} (an HF folder: transformers.AutoModelForCausalLM.from_pretrained loads it)", ps)


if __name__ == "__main__":
    run_main(main)
