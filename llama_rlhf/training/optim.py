"""AdamW on the fp32 master weights, and the learning-rate schedule (warmup, then constant/cosine/linear)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW (fused kernel) with weight decay on matrices only (not on norms, biases)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)  # one kernel per step, CPU or CUDA


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, schedule: str,
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule to the end."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--lr_scheduler {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
