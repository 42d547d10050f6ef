"""GRPO arithmetic: group-normalised advantages, the policy surrogates (clipped, CISPO, SAPO; token- or
sequence-level ratios), the k3 KL penalty, the entropy bonus, and each loss type's token weights.

Pure functions over tensors, the conventions of TRL's ``GRPOTrainer._compute_loss`` (tests/test_grpo_math.py
checks them against it). Shapes: N completions, T completion positions (right-padded); ``mask`` [N, T] is 1 on
tokens that count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")
KL_ESTIMATORS = ("k3", "k3_corrected")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# how a loss type's per-token terms are reduced to the step loss (token_weights): CISPO normalises by the
# step's tokens as DAPO does, SAPO by sequence means as GRPO does (as in TRL and their papers)
AGGREGATION = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "cispo": "dapo", "sapo": "grpo"}
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo")  # the PPO-style two-sided clipped surrogate


@dataclass(frozen=True)
class LossConfig:
    """Everything that defines the per-token loss (the solver's flags of the same names)."""

    loss_type: str = "dapo"
    eps_low: float = 0.2  # clipped surrogate: ratio >= 1 - eps_low ...
    eps_high: float = 0.2  # ... and <= 1 + eps_high
    beta: float = 0.0  # KL weight
    kl_estimator: str = "k3_corrected"
    importance_sampling_level: str = "token"
    delta: float | None = None  # INTELLECT-2: upper bound on the unclipped ratio of the clipped surrogate
    cispo_epsilon_max: float = 5.0  # CISPO: the detached importance weight is min(ratio, this)
    sapo_temperature_pos: float = 1.0  # SAPO: gate temperature for tokens with A > 0
    sapo_temperature_neg: float = 1.05  # ... and A <= 0
    entropy_coef: float = 0.0  # loss -= entropy_coef x mean token entropy

    def __post_init__(self):
        for value, allowed, flag in ((self.loss_type, LOSS_TYPES, "--loss_type"),
                                     (self.kl_estimator, KL_ESTIMATORS, "--kl_estimator"),
                                     (self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS,
                                      "--importance_sampling_level")):
            if value not in allowed:
                raise ValueError(f"{flag} {value!r} is not one of {', '.join(allowed)}")

    @classmethod
    def from_args(cls, args) -> "LossConfig":
        return cls(args.loss_type, args.epsilon, args.epsilon_high, args.beta, args.kl_estimator,
                   args.importance_sampling_level, args.delta, args.cispo_epsilon_max, args.sapo_temperature_pos,
                   args.sapo_temperature_neg, args.entropy_coef)

    @property
    def aggregation(self) -> str:
        return AGGREGATION[self.loss_type]


def mean_and_std(rewards: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Mean and sample std (Bessel) of rewards held in parts; ``reduce`` sums a tensor over the parts (DP ranks).

    Two passes (mean first, then the squared deviations from it), so the variance is a sum of squares and never
    negative: the one-pass (sum r^2 - (sum r)^2 / n) / (n - 1) comes out about -1e-16 when every reward is an
    equal value that binary cannot hold exactly (0.1, 0.41), and its square root is NaN. std is 0 for n < 2.
    """
    reduce = reduce or (lambda t: t)
    x = rewards.to(torch.float64)
    total = reduce(torch.stack([x.sum(), x.new_tensor(float(x.numel()))]))
    n = total[1]
    mean = total[0] / n.clamp(min=1)
    squares = reduce((x - mean).pow(2).sum())
    std = torch.sqrt(squares / (n - 1)) if n > 1 else squares.new_zeros(())
    return mean, std


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """rewards [N] (N = groups x G, each group contiguous) -> advantages [N].

    r - mean(group), divided by the group's std (``group``), the whole batch's std (``batch``; ``reduce`` sums
    over the ranks that hold the rest of the batch), or not (``none``). Stds are unbiased (Bessel), as TRL's.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"--scale_rewards {scale!r} is not one of {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, group_size)  # [groups, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
        return centred / (std + eps)
    if scale == "batch":
        return centred / (mean_and_std(rewards, reduce)[1].to(rewards.dtype) + eps)
    return centred


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class TokenTerms:
    loss: torch.Tensor  # [N, T] per-token loss (differentiable): policy term + beta x KL
    ratio: torch.Tensor  # [N, T] importance ratio (per sequence, broadcast, at the sequence level)
    kl: torch.Tensor | None  # [N, T] the KL penalty per token (ratio-weighted for k3_corrected)
    low_clipped: torch.Tensor  # [N, T] bool
    high_clipped: torch.Tensor  # [N, T] bool


def importance_ratio(logp, old_logp, mask, level: str, sequence_sum=None) -> torch.Tensor:
    """exp(logp - old) per token, or per sequence exp(mean over its tokens of logp - old) (GSPO) -> [N, T|1].

    ``sequence_sum`` sums [N, T] over T and over the ranks holding the rest of each sequence (SP); its
    gradient must reach every rank's tokens."""
    log_ratio = logp - old_logp
    if level == "token":
        return torch.exp(log_ratio)
    sequence_sum = sequence_sum or (lambda x: x.sum(-1))
    count = sequence_sum(mask.to(log_ratio.dtype)).clamp(min=1.0)
    return torch.exp(sequence_sum(log_ratio * mask) / count).unsqueeze(-1)


def token_terms(logp, old_logp, advantages, cfg: LossConfig, ref_logp=None, mask=None,
                sequence_sum=None) -> TokenTerms:
    """Per-token loss of ``cfg.loss_type`` (grpo/bnpo/dr_grpo/dapo share the clipped surrogate):

    clipped  -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r capped at ``delta`` in the first branch
    cispo    -sg(min(r, eps_max)) A log p                       (REINFORCE with a clipped, detached weight)
    sapo     -(4 / tau) sigmoid(tau (r - 1)) A                  (a soft gate, tau by the sign of A)
    plus beta x k3, or beta x r x k3 (``k3_corrected``: its gradient is that of the reverse KL).
    logp / old_logp / ref_logp / mask [N, T]; advantages [N] or [N, T]."""
    mask = torch.ones_like(logp) if mask is None else mask
    r = importance_ratio(logp, old_logp, mask, cfg.importance_sampling_level, sequence_sum)  # [N, T] or [N, 1]
    adv = advantages.unsqueeze(-1) if advantages.dim() < logp.dim() else advantages  # [N, 1] or [N, T]
    no = torch.zeros((), dtype=torch.bool, device=logp.device)
    low = high = no
    if cfg.loss_type in CLIPPED:
        clipped = r.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
        capped = r if cfg.delta is None else r.clamp(max=cfg.delta)
        loss = -torch.minimum(capped * adv, clipped * adv)
        low, high = (r < 1 - cfg.eps_low) & (adv < 0), (r > 1 + cfg.eps_high) & (adv > 0)
    elif cfg.loss_type == "cispo":
        loss = -r.clamp(max=cfg.cispo_epsilon_max).detach() * adv * logp
        high = (r > cfg.cispo_epsilon_max) & (adv > 0)
    elif cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg).to(r.dtype)
        loss = -torch.sigmoid(tau * (r - 1)) * 4 / tau * adv
    else:
        raise ValueError(f"--loss_type {cfg.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    kl = None
    if cfg.beta != 0.0:
        kl = k3_kl(logp, ref_logp)
        if cfg.kl_estimator == "k3_corrected":
            kl = kl * r
        loss = loss + cfg.beta * kl
    shape = logp.shape
    return TokenTerms(loss.expand(shape), r.expand(shape), kl, low.expand(shape), high.expand(shape))


def token_weights(mask: torch.Tensor, loss_type: str, *, global_sequences: int, global_tokens: float,
                  global_micro_batches: int, max_completion_length: int) -> torch.Tensor:
    """Weight of each token's loss in the step loss, for one micro-batch's full (unsplit) sequences.

    ``(per_token * weights).sum()`` is this micro-batch's share; the shares of every micro-batch on every
    rank add up to the step loss, so gradients are simply summed over DP x SP and accumulation, and the
    weights can be split with the tokens under sequence parallelism. Counts are those of the optimizer step.
    grpo     mean over sequences of each sequence's token mean (global sequence count); also sapo
    bnpo     token mean within the micro-batch, averaged over every micro-batch of every DP rank (as TRL); also
             the entropy bonus
    dr_grpo  token sum / (global sequences x max completion length)
    dapo     token sum / global completion-token count; also cispo. With several optimizer steps per rollout
             batch, the count is the rollout batch's tokens / steps (as TRL), so every token weighs the same.
    Returned in the mask's floating dtype (float32 for an integer mask).
    """
    loss_type = AGGREGATION.get(loss_type, loss_type)
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
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
    return w.to(dtype)


def loss_share(terms: TokenTerms, weight: torch.Tensor, entropy: torch.Tensor | None = None,
               entropy_weight: torch.Tensor | None = None, entropy_coef: float = 0.0) -> torch.Tensor:
    """This micro-batch's share of the step loss: sum of weighted token losses, minus the entropy bonus
    (``entropy_coef`` x the token mean entropy, with bnpo's weights, as TRL)."""
    loss = (terms.loss * weight).sum()
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * (entropy * entropy_weight).sum()
    return loss
