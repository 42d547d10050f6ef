"""Preference-optimization losses on per-pair sequence log-probs (pure functions, no communication).

Every loss takes, per pair, the policy's summed response log-probs (chosen, rejected), the reference's, and
the response token counts, and returns per-pair losses and the implicit rewards that the metrics report.
Conventions follow TRL (DPOTrainer for sigmoid / hinge / ipo, CPOTrainer for simpo and label smoothing):

    sigmoid  DPO, Rafailov et al. 2023; with label smoothing the conservative cDPO
             -(1 - e) log s(b d) - e log s(-b d),  d = (log pi_c - log ref_c) - (log pi_r - log ref_r)
    hinge    SLiC, Zhao et al. 2023: relu(1 - b d)
    ipo      IPO, Azar et al. 2023, with TRL's per-token normalisation:
             (d_c / n_c - d_r / n_r - 1 / (2 b))^2 with d_x = log pi_x - log ref_x
    simpo    SimPO, Meng et al. 2024 (reference-free): the sigmoid loss on
             d = log pi_c / n_c - log pi_r / n_r - gamma / b
Rewards: b (log pi - log ref) per response (simpo: b log pi / n); accuracy is chosen reward > rejected reward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


@dataclass(frozen=True)
class PreferenceLoss:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"

    def check(self) -> None:
        """One-line UsageError for a combination that has no meaning."""
        from ..runtime import UsageError
        if self.loss_type not in LOSS_TYPES:
            raise UsageError(f"--loss_type {self.loss_type} is not one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            raise UsageError(f"--beta {self.beta} is not valid: it must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise UsageError(f"--label_smoothing {self.label_smoothing} is not valid: it must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type in ("ipo", "hinge"):
            raise UsageError(f"--label_smoothing applies to the sigmoid and simpo losses, not --loss_type "
                             f"{self.loss_type}")
        if self.sft_weight < 0:
            raise UsageError(f"--sft_weight {self.sft_weight} is not valid: it must be >= 0")


def _smoothed_sigmoid(logits: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps


def pair_losses(cfg: PreferenceLoss, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                ref_rejected: torch.Tensor | None, n_chosen: torch.Tensor, n_rejected: torch.Tensor):
    """Per-pair losses [P] and rewards (chosen [P], rejected [P]) from summed log-probs [P] and token counts [P]."""
    n_c, n_r = n_chosen.to(chosen.dtype).clamp(min=1), n_rejected.to(chosen.dtype).clamp(min=1)
    if cfg.loss_type == "simpo":
        avg_c, avg_r = chosen / n_c, rejected / n_r
        losses = _smoothed_sigmoid(avg_c - avg_r - cfg.simpo_gamma / cfg.beta, cfg.beta, cfg.label_smoothing)
        return losses, cfg.beta * avg_c.detach(), cfg.beta * avg_r.detach()
    ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
    if cfg.loss_type == "sigmoid":
        losses = _smoothed_sigmoid(ratio_c - ratio_r, cfg.beta, cfg.label_smoothing)
    elif cfg.loss_type == "hinge":
        losses = torch.relu(1 - cfg.beta * (ratio_c - ratio_r))
    elif cfg.loss_type == "ipo":
        losses = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * cfg.beta)) ** 2
    else:
        raise ValueError(f"unknown loss type {cfg.loss_type}")
    return losses, cfg.beta * ratio_c.detach(), cfg.beta * ratio_r.detach()


def step_loss(cfg: PreferenceLoss, losses: torch.Tensor, chosen: torch.Tensor, global_pairs: int,
              global_chosen_tokens: int) -> torch.Tensor:
    """This rank's share of the step's loss: sum of its pair losses / the step's global pair count, plus
    ``sft_weight`` x its chosen-token NLL / the step's global chosen-token count. Summed over ranks and
    micro-batches it is the mean pair loss (+ the token-mean NLL) of the whole global batch."""
    share = losses.sum() / max(global_pairs, 1)
    if cfg.sft_weight:
        share = share - cfg.sft_weight * chosen.sum() / max(global_chosen_tokens, 1)
    return share
