"""llama_rlhf: Megatron-style tensor, sequence and data parallel training, sampling and GRPO for open LLMs."""

__version__ = "0.1.0"
