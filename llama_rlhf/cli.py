"""Command-line flags shared by the three solvers."""
from __future__ import annotations

import argparse


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


def add_chat_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompting")
    add_bool(g, "--use_chat_template", False, "render prompts with the checkpoint's chat template")
    g.add_argument("--system_prompt", default=None, help="system message added to every conversation")
    g.add_argument("--max_seq_len", type=int, default=2048, help="longest sequence (prompt + response) in tokens")
    g.add_argument("--max_batch_size", type=int, default=4, help="sequences (or prompts) per rank per step")


def add_memory_flags(group) -> None:
    """How the optimizer state is held across data-parallel ranks (and so the parameters' dtype)."""
    group.add_argument("--zero_stage", type=int, default=None, choices=(0, 1),
                       help="0: every DP x SP rank holds the whole optimizer state; 1: fp32 masters and AdamW moments "
                            "partitioned over DP x SP, parameters held in the compute dtype (default: 1 when "
                            "DP x SP > 1, else 0)")
