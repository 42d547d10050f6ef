"""GRPO arithmetic: group-normalised advantages, the clipped surrogate with a k3 KL penalty, loss reductions.

Shapes: N completions, T completion positions (right-padded); ``mask`` [N, T] is 1 on tokens that count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [N] (N = groups x G, each group contiguous) -> advantages [N].

    r - mean(group), divided by the group's std (``group``), the whole batch's std (``batch``), or not
    (``none``). Stds are unbiased (Bessel), as TRL computes them.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"--scale_rewards {scale!r} is not one of {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, group_size)  # [groups, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
        return centred / (std + eps)
    if scale == "batch":
        return centred / ((rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())) + eps)
    return centred


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class TokenTerms:
    loss: torch.Tensor  # [N, T] per-token loss (differentiable)
    ratio: torch.Tensor  # [N, T]
    kl: torch.Tensor | None  # [N, T]
    low_clipped: torch.Tensor  # [N, T] bool
    high_clipped: torch.Tensor  # [N, T] bool


def token_terms(logp, old_logp, advantages, eps_low: float, eps_high: float, beta: float = 0.0,
                ref_logp=None) -> TokenTerms:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3 per token."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1) if advantages.dim() < logp.dim() else advantages  # [N] -> [N, 1], or per token
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    kl = None
    if beta != 0.0:
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
    return TokenTerms(loss, ratio, kl, (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0))


def token_weights(mask: torch.Tensor, loss_type: str, *, global_sequences: int, global_tokens: int,
                  global_micro_batches: int, max_completion_length: int) -> torch.Tensor:
    """Weight of each token's loss in the step loss, for one micro-batch's full (unsplit) sequences.

    ``(per_token * weights).sum()`` is this micro-batch's share; the shares of every micro-batch on every
    rank add up to the step loss, so gradients are simply summed over DP x SP and accumulation, and the
    weights can be split with the tokens under sequence parallelism.
    grpo     mean over sequences of each sequence's token mean (global sequence count)
    bnpo     token mean within the micro-batch, averaged over every micro-batch of every DP rank (as TRL)
    dr_grpo  token sum / (global sequences x max completion length)
    dapo     token sum / global completion-token count (all ranks and micro-batches)
    """
    mask = mask.to(torch.float64)
    if loss_type == "grpo":
        w = mask / mask.sum(-1, keepdim=True).clamp(min=1) / global_sequences
    elif loss_type == "bnpo":
        w = mask / mask.sum().clamp(min=1) / global_micro_batches
    elif loss_type == "dr_grpo":
        w = mask / (global_sequences * max_completion_length)
    elif loss_type == "dapo":
        w = mask / max(global_tokens, 1)
    else:
        raise ValueError(f"--loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    return w.float()
