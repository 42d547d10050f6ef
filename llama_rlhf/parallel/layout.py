"""The layout rules every solver and the memory planner check, without torch: DP = world / (MP x SP), the
vocabulary padded to a multiple of MP, and the model's heads and MLP split evenly over MP."""
from __future__ import annotations

import math


class LayoutError(ValueError):
    """An impossible parallel layout (raised identically on every rank, before any collective)."""


def check_layout(world_size: int, mp: int, sp: int) -> int:
    """Return DP = world / (MP * SP), or raise a LayoutError naming the numbers and the flags."""
    if mp < 1 or sp < 1:
        raise LayoutError(f"--model_parallel_size ({mp}) and --sequence_parallel_size ({sp}) must be >= 1")
    if world_size % (mp * sp) != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by --model_parallel_size {mp} x "
            f"--sequence_parallel_size {sp} = {mp * sp}; choose sizes whose product divides {world_size}"
        )
    return world_size // (mp * sp)


def check_model_layout(cfg, world_size: int, mp: int, sp: int) -> int:
    """check_layout, then the model's own split over MP (ModelConfig.check_model_parallel); returns DP."""
    dp = check_layout(world_size, mp, sp)
    cfg.check_model_parallel(mp)
    return dp


def padded_vocab_size(vocab_size: int, mp: int) -> int:
    """The vocabulary rounded up to a multiple of MP (padding rows are zero and their logits masked)."""
    return int(math.ceil(vocab_size / mp) * mp)
