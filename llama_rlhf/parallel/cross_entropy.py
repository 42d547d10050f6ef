"""Cross-entropy and token log-probabilities on vocab-parallel logits, in fp32.

Each MP rank holds logits for a contiguous slice of the (padded) vocabulary. The full [N, V] logits are
never gathered: the row max is all-reduced (MAX), then sum-exp and the target logit in one all-reduce (SUM).
Backward is local: softmax minus one-hot on this rank's slice.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import all_reduce, group_rank

IGNORE_INDEX = -100


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 when it is in a 16-bit type; fp32 and fp64 stay as they are."""
    return x.float() if x.element_size() < 4 else x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """fwd: per-token -log softmax(logits)[target] (all-reduce MAX, then SUM of sum-exp and target logit over MP);
    bwd: (softmax - onehot) * grad on the local vocab slice, no communication."""

    @staticmethod
    def forward(ctx, logits, target, group, ignore_index):
        n_local = logits.shape[-1]
        vocab_start = group_rank(group) * n_local
        x = upcast(logits)  # [N, V/mp], at least fp32
        row_max = all_reduce(x.max(dim=-1).values, group, op=dist.ReduceOp.MAX)
        x = x - row_max.unsqueeze(-1)
        valid = target != ignore_index
        local_target = target - vocab_start
        mine = valid & (local_target >= 0) & (local_target < n_local)
        local_target = local_target.clamp(0, n_local - 1)
        target_logit = torch.where(mine, x.gather(-1, local_target.unsqueeze(-1)).squeeze(-1), 0.0)
        x = x.exp_()
        sums = all_reduce(torch.stack([x.sum(dim=-1), target_logit]), group)  # [2, N]
        sum_exp, target_logit = sums[0], sums[1]
        loss = (torch.log(sum_exp) - target_logit) * valid
        x.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(x, local_target, mine, valid)
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, mine, valid = ctx.saved_tensors
        grad = softmax  # reused in place: backward runs once
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= mine.to(grad.dtype)
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token cross-entropy (fp32) from vocab-parallel logits; 0 where target == ignore_index.

    logits: [..., V/mp] (this rank's vocab slice; padded vocab entries must be -inf), target: [...] global ids.
    """
    shape = target.shape
    loss = _VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            group, ignore_index)
    return loss.view(shape)


def vocab_parallel_log_probs(logits: torch.Tensor, target: torch.Tensor, group) -> torch.Tensor:
    """log p(target) per token (fp32) from vocab-parallel logits: [..., V/mp], [...] -> [...]."""
    return -vocab_parallel_cross_entropy(logits, target, group, ignore_index=IGNORE_INDEX)


def vocab_parallel_entropy(logits: torch.Tensor, group) -> torch.Tensor:
    """Entropy of softmax(logits) per token (fp32, no gradient): [..., V/mp] -> [...]."""
    with torch.no_grad():
        x = upcast(logits)
        x = x - all_reduce(x.max(dim=-1, keepdim=True).values, group, op=dist.ReduceOp.MAX)
        p_unnorm = x.exp()
        sums = all_reduce(torch.stack([p_unnorm.sum(-1), (p_unnorm * torch.nan_to_num(x, neginf=0.0)).sum(-1)]),
                          group)
        sum_exp, weighted = sums[0], sums[1]
        return torch.log(sum_exp) - weighted / sum_exp


def mean_over_tokens(per_token: torch.Tensor, target: torch.Tensor, reduce_group,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of per-token losses divided by the count of non-ignored tokens over the whole ``reduce_group``.

    Each rank returns its share; summing the returned values over ``reduce_group`` (or summing gradients)
    gives the mean over every non-ignored token of the global batch.
    """
    count = all_reduce((target != ignore_index).sum().to(torch.float32), reduce_group)
    return per_token.sum() / count.clamp(min=1.0)

