"""Command-line flags shared by the three solvers."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


def str2bool(value) -> bool:
    """'true'/'false' (and yes/no, 1/0, on/off) -> bool; anything else is an argparse error."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on", "y", "t"):
        return True
    if text in ("false", "no", "0", "off", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_bool(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """A boolean flag usable as ``--flag``, ``--flag true`` or ``--flag false``."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default,
                        help=f"{help} (true/false; default {str(default).lower()})")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Where the model comes from, how it is laid out over ranks, and its precision."""
    g = parser.add_argument_group("model and layout")
    g.add_argument("--ckpt_dir", help="checkpoint directory (HF folder or Meta original)")
    g.add_argument("--model_type", default=None,
                   help="model family (llama, llama-hf, llama3, llama3-hf, qwen, qwen3, gemma2, internlm3, "
                        "mistral); detected from the checkpoint when omitted")
    g.add_argument("--config_file", default=None, help="model config (default: the one in --ckpt_dir)")
    g.add_argument("--tokenizer_file", default=None, help="tokenizer file or folder (default: --ckpt_dir)")
    g.add_argument("--model_parallel_size", type=int, default=1,
                   help="tensor-parallel ranks per model replica (MP); heads must divide by it")
    g.add_argument("--sequence_parallel_size", type=int, default=1,
                   help="ranks that split each sequence with ring attention (SP); DP = world / (MP x SP)")
    g.add_argument("--dtype", default="bfloat16",
                   help="compute dtype: bfloat16 (default), float16 or float32; master weights stay fp32")
    g.add_argument("--seed", type=int, default=1234, help="random seed (data order, sampling, init)")
    g.add_argument("--distributed_timeout_minutes", type=float, default=30.0,
                   help="longest wait in any collective (and the start-up rendezvous) before every rank exits "
                        "naming this flag: a hung or stopped peer ends the job instead of holding it (fractions "
                        "allowed; default 30)")


def add_chat_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompting")
    add_bool(g, "--use_chat_template", False, "render prompts with the checkpoint's chat template")
    g.add_argument("--system_prompt", default=None, help="system message added to every conversation")
    g.add_argument("--max_seq_len", type=int, default=2048, help="longest sequence (prompt + response) in tokens")
    g.add_argument("--max_batch_size", type=int, default=4, help="sequences (or prompts) per rank per step")


def add_reward_flags(group, default: str | None) -> None:
    """The reward spec (llama_rlhf/rewards.py) that GRPO trains on and solver_generate scores with."""
    group.add_argument("--reward_funcs", default=default,
                       help="comma list of accuracy, last_number, format, length, path/to/file.py:function"
                            + ("" if default else " (default: no scoring)"))
    group.add_argument("--reward_weights", default=None, help="comma list of weights, one per reward (default all 1)")
    group.add_argument("--length_min", type=int, default=16, help="length reward: shortest ideal completion (tokens)")
    group.add_argument("--length_max", type=int, default=256, help="length reward: longest ideal completion (tokens)")


def add_report_flags(group) -> None:
    """Where a trainer's per-step records go besides metrics.jsonl."""
    group.add_argument("--report_to", default="jsonl",
                       help="comma list of jsonl (always on), tensorboard (event files in LOG_DIR/tensorboard), "
                            "wandb (a run in LOG_DIR/wandb; WANDB_MODE=offline works without network)")

def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """Training data: files, their shape, mixing, the token cache, packing, evaluation (README, "Data")."""
    d = parser.add_argument_group("data")
    d.add_argument("--train_file", required=True, nargs="+",
                   help="one or more .jsonl / .json / .parquet files or datasets.save_to_disk folders (messages, "
                        "sharegpt, alpaca, prompt/completion or text records)")
    d.add_argument("--train_file_weights", type=float, nargs="+", default=None,
                   help="mix the --train_file files: each one's share of an epoch's rows (default: all rows once)")
    d.add_argument("--data_format", default="auto",
                   choices=("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"),
                   help="record shape (default: detected per record from its keys)")
    d.add_argument("--data_cache_dir", default=None,
                   help="where the token cache goes (default: SAVE_DIR/data_cache); shared by later runs")
    d.add_argument("--eval_file", default=None, help="evaluated every --eval_steps steps (token-mean loss)")
    d.add_argument("--eval_steps", type=int, default=0, help="evaluate every N optimizer steps (0: never)")
    add_bool(d, "--packing", False, "pack several samples per row (positions reset, no attention across samples)")
    add_bool(d, "--stream_packing", False, "pretraining: cut the token stream of all samples (none truncated) into "
             "rows of exactly --max_seq_len tokens; a document may continue in the next row")


def add_optimizer_flags(parser: argparse.ArgumentParser, lr: float):
    """Epochs, steps, AdamW, schedule, clipping, accumulation, activation checkpointing (SFT and preference
    training); returns the group, for the trainer's own flags."""
    from .training.lr_schedule import SCHEDULES
    o = parser.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    o.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
    o.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    o.add_argument("--lr_scheduler", default="cosine", choices=SCHEDULES, help="decay after warmup")
    o.add_argument("--warmup_steps", type=int, default=0, help="linear warmup steps")
    o.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay (matrices only)")
    o.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 (first-moment decay)")
    o.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 (second-moment decay)")
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step; the loss is normalised over all of them (SFT: the token "
                        "mean; preference training: the pair mean)")
    add_bool(o, "--activation_checkpointing", False, "recompute each layer in backward to save memory")
    return o


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    s = parser.add_argument_group("checkpoints and logs")
    s.add_argument("--save_dir", required=True, help="where checkpoint-N folders (HF format + training state) go")
    s.add_argument("--log_dir", default=None, help="metrics.jsonl goes here (default: --save_dir)")
    add_report_flags(s)
    s.add_argument("--save_steps", type=int, default=0, help="save every N optimizer steps (0: only at the end)")
    s.add_argument("--save_total_limit", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    s.add_argument("--save_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the exported HF weights (fp32 masters are kept for resume either way)")
    add_bool(s, "--resume", False, "continue the newest checkpoint in --save_dir exactly where it stopped")
    s.add_argument("--log_steps", type=int, default=1, help="print a progress line every N steps")


def add_memory_flags(group) -> None:
    """How the optimizer state is held across data-parallel ranks (and so the parameters' dtype), and fp16's loss
    scaling."""
    group.add_argument("--initial_loss_scale", type=float, default=2.0 ** 16,
                       help="--dtype float16: the starting dynamic loss scale (halved on every overflowing step)")
    group.add_argument("--loss_scale_window", type=int, default=1000,
                       help="--dtype float16: clean steps in a row before the loss scale doubles")
    group.add_argument("--zero_stage", type=int, default=None, choices=(0, 1),
                       help="0: every DP x SP rank holds the whole optimizer state; 1: fp32 masters and AdamW moments "
                            "partitioned over DP x SP, parameters held in the compute dtype (default: 1 when "
                            "DP x SP > 1, else 0)")


def add_lora_flags(parser: argparse.ArgumentParser, training: bool = True) -> None:
    """LoRA / QLoRA (llama_rlhf/models/lora.py, quant.py); the sampler takes --lora_dir only. Unset flags are None
    so that a LoRA flag without --lora_rank (or --lora_dir) is an error (training/lora_run.py)."""
    g = parser.add_argument_group("LoRA adapters (PEFT-compatible folders)")
    g.add_argument("--lora_dir", default=None,
                   help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to put on "
                        "--ckpt_dir" + (" and train further" if training else " (merged for sampling)"))
    if not training:
        return
    g.add_argument("--lora_rank", type=int, default=0, help="LoRA rank r (0: full fine-tuning, no adapters)")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha: scaling alpha / r (default 16)")
    g.add_argument("--lora_dropout", type=float, default=None, help="dropout on the adapter input (default 0)")
    g.add_argument("--lora_target_modules", default=None,
                   help="comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or all-linear "
                        "(default all-linear)")
    g.add_argument("--use_rslora", type=str2bool, nargs="?", const=True, default=None,
                   help="rank-stabilised scaling alpha / sqrt(r) (true/false; default false)")
    g.add_argument("--quantize_base", default=None, choices=("none", "int8", "nf4"),
                   help="QLoRA: hold the frozen base linears weight-only quantized (default none)")
    g.add_argument("--merge_lora", type=str2bool, nargs="?", const=True, default=None,
                   help="also write each checkpoint's merged model as an HF folder in checkpoint-N/merged "
                        "(true/false; default false)")
# flag -> (test, what it must be): checked when the flags are parsed, for the flags a solver has.
NUMBER_RULES = {
    "lr": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "max_steps": (lambda v: v >= 0, ">= 0 (0: all epochs)"),
    "save_steps": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "save_total_limit": (lambda v: v >= 0, ">= 0 (0: keep all)"),
    "temperature": (lambda v: v >= 0, ">= 0 (0: greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1: off)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0: off)"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "num_samples_per_prompt": (lambda v: v >= 1, ">= 1"),
    "beta": (lambda v: v >= 0, ">= 0 (0: no KL term)"),
    "epsilon": (lambda v: v >= 0, ">= 0"),
    "epsilon_high": (lambda v: v >= 0, ">= 0"),
    "distributed_timeout_minutes": (lambda v: v > 0, "> 0 (minutes; fractions allowed)"),
    "eval_steps": (lambda v: v >= 0, ">= 0"),
    "eval_num_samples": (lambda v: v >= 0, ">= 0 (0: --num_samples_per_prompt)"),
    "sample_steps": (lambda v: v >= 0, ">= 0 (0: at the start and the end only)"),
    "sample_max_new_tokens": (lambda v: v >= 1, ">= 1"),
}


def check_numbers(args) -> None:
    """Refuse impossible optimizer, sampling and run flags at parse time: a UsageError naming the flag and value."""
    from .runtime import UsageError
    for name, (ok, rule) in NUMBER_RULES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if not (math.isfinite(value) and ok(value)):
            raise UsageError(f"--{name} {value} is not valid: it must be {rule}")


def check_training_flags(args) -> None:
    """check_numbers, then the counts every trainer (SFT, preference) needs to be at least 1."""
    from .runtime import UsageError
    check_numbers(args)
    for name in ("max_batch_size", "gradient_accumulation_steps", "epochs", "max_seq_len", "log_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")


@dataclass(frozen=True)
class LlamaRlhfFlag:
    """A flag of Llama-RLHF's solvers that is not a flag here, and what to do instead (README, "Coming from
    Llama-RLHF"). Refused flags stop the run with one line naming the flag to use; the others are accepted
    with a note. A value equal to Llama-RLHF's default asks for what happens here anyway: taken silently."""

    name: str
    solvers: tuple  # "train", "generate", "grpo"
    advice: str
    refused: bool = True
    default: str | None = None


LLAMA_RLHF_FLAGS = [
    LlamaRlhfFlag("--begin_epoch", ("train", "grpo"), "pass --resume true instead: it continues the newest "
                  "checkpoint-N in --save_dir exactly where it stopped, mid-epoch too", default="0"),
    LlamaRlhfFlag("--save_optim", ("train", "grpo"), "not needed: every checkpoint keeps the optimizer state "
                  "(training_state/) so that --resume true continues exactly", refused=False),
    LlamaRlhfFlag("--lora_dtype", ("train", "grpo"), "not needed: LoRA adapters (--lora_rank, --lora_alpha, "
                  "--lora_target_modules) are kept in fp32 and computed in --dtype; the frozen base is held in --dtype "
                  "(or --quantize_base int8|nf4)", refused=False),
    LlamaRlhfFlag("--max_num_ckpts", ("train",), "use --save_total_limit N (keeps the newest N checkpoints)"),
    LlamaRlhfFlag("--open_fault_tolerance", ("generate",), "not available: results.jsonl is written once, at the "
                  "end, and a rerun replaces it; split a long --label_file into parts with their own --log_dir",
                  default="false"),
    LlamaRlhfFlag("--policy_ckpt_dir", ("grpo",), "use --ckpt_dir"),
    LlamaRlhfFlag("--policy_model_type", ("grpo",), "use --model_type"),
    LlamaRlhfFlag("--policy_config_file", ("grpo",), "use --config_file"),
    LlamaRlhfFlag("--policy_tokenizer_file", ("grpo",), "use --tokenizer_file"),
    LlamaRlhfFlag("--reference_ckpt_dir", ("grpo",), "the KL reference here is always the initial --ckpt_dir "
                  "(kept when --beta > 0)"),
    LlamaRlhfFlag("--verifier_ckpt_dir", ("grpo",), "reward models are not available: use --reward_funcs "
                  "(accuracy, last_number, format, length or path/to/file.py:function)"),
    LlamaRlhfFlag("--task", ("grpo",), "use --reward_funcs (accuracy checks the line's answer; or your own "
                  "path/to/file.py:function)"),
    LlamaRlhfFlag("--kl_coef", ("grpo",), "use --beta (the KL penalty weight; 0 keeps no reference model)"),
    LlamaRlhfFlag("--clip_range", ("grpo",), "use --epsilon (and --epsilon_high for an asymmetric clip)"),
    LlamaRlhfFlag("--inner_epochs", ("grpo",), "use --num_iterations (policy updates per rollout batch)"),
    LlamaRlhfFlag("--chunk_size", ("grpo",), "a step rolls out --max_batch_size prompts per DP rank and trains on "
                  "them: set --max_batch_size to chunk_size / DP"),
    LlamaRlhfFlag("--max_generate_batch_size", ("grpo",), "use --rollout_batch_size (sequences decoded together)"),
    LlamaRlhfFlag("--max_forward_batch_size", ("grpo",), "use --train_batch_size (sequences per forward/backward)"),
    LlamaRlhfFlag("--accumulation_steps", ("grpo",), "use --train_batch_size: a step's rollouts are split into "
                  "micro-batches of that size and the loss is normalised over the whole step"),
]


def _same_value(given: str, default: str) -> bool:
    for convert in (str2bool, int):
        try:
            return convert(given) == convert(default)
        except (argparse.ArgumentTypeError, ValueError):
            pass
    return given == default


class _LlamaRlhfAction(argparse.Action):
    def __init__(self, option_strings, dest, flag: LlamaRlhfFlag, **kwargs):
        super().__init__(option_strings, dest, nargs="?", const="true", default=argparse.SUPPRESS, **kwargs)
        self.flag = flag

    def __call__(self, parser, namespace, values, option_string=None):
        if self.flag.default is not None and _same_value(values, self.flag.default):
            return
        given = f"{self.flag.name} {values}"
        if self.flag.refused:
            from .runtime import UsageError
            raise UsageError(f"{given} is a Llama-RLHF flag: {self.flag.advice}")
        from .runtime import launch_rank
        if launch_rank() == "0":
            print(f"note: {given} (a Llama-RLHF flag) is ignored; {self.flag.advice}", flush=True)


def add_llama_rlhf_flags(parser: argparse.ArgumentParser, solver: str) -> None:
    """Llama-RLHF's flags for this solver (LLAMA_RLHF_FLAGS) that this parser does not define itself."""
    g = parser.add_argument_group("Llama-RLHF flags (refused with what to use instead, or ignored with a note)")
    for flag in LLAMA_RLHF_FLAGS:
        if solver in flag.solvers and flag.name not in parser._option_string_actions:
            g.add_argument(flag.name, action=_LlamaRlhfAction, flag=flag, metavar="VALUE",
                           help=("refused: " if flag.refused else "ignored: ") + flag.advice.replace("%", "%%"))
