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


CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**26}  # cache-sized on the CPU; on a GPU few launches, 256 MiB fp32


def _row_chunks(n_rows: int, n_cols: int, elements: int | None = None, device=None):
    """Row slices of a [n_rows, n_cols] tensor holding about ``elements`` entries each (by default sized for the
    device: a CPU's cache, or on a GPU large enough that a 128k vocabulary costs a handful of launches)."""
    if elements is None:
        elements = CHUNK_ELEMENTS.get(getattr(device, "type", "cpu"), CHUNK_ELEMENTS["cuda"])
    step = max(1, elements // max(n_cols, 1))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """fwd: per-token logsumexp(logits) - logits[target] (all-reduce MAX of the row max, then SUM of sum-exp and
    target logit over MP); bwd: (softmax - onehot) * grad on the local vocab slice, no communication.

    Only the logits (already alive) and one log-sum-exp per row are kept: no [N, V] softmax copy is made in
    forward, and backward recomputes the softmax in row chunks straight into the gradient. With
    ``overwrite_logits`` (callers whose logits die with this loss) the gradient is written over the logits
    chunk by chunk instead of into a fresh [N, V] buffer, which costs a page-faulted pass over memory; any
    other autograd node that saved the same logits then fails its version check loudly, never silently.
    """

    @staticmethod
    def forward(ctx, logits, target, group, ignore_index, overwrite_logits):
        n_rows, n_local = logits.shape  # [N, V/mp], any float dtype; reductions in at least fp32
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        vocab_start = group_rank(group) * n_local
        chunks = _row_chunks(n_rows, n_local, device=logits.device)
        row_max = torch.empty(n_rows, dtype=acc, device=logits.device)
        for c in chunks:
            row_max[c] = logits[c].max(dim=-1).values.to(acc)
        row_max = all_reduce(row_max, group, op=dist.ReduceOp.MAX)
        sum_exp = torch.empty(n_rows, dtype=acc, device=logits.device)
        # one reused chunk buffer: a fresh large temporary per chunk would be page-faulted in every time
        buffer = torch.empty(chunks[0].stop if chunks else 0, n_local, dtype=acc, device=logits.device)
        for c in chunks:
            shifted = buffer[: c.stop - c.start]
            torch.sub(logits[c], row_max[c].unsqueeze(-1), out=shifted)
            sum_exp[c] = shifted.exp_().sum(dim=-1)
        valid = target != ignore_index
        local_target = target - vocab_start
        mine = valid & (local_target >= 0) & (local_target < n_local)
        local_target = local_target.clamp(0, n_local - 1)
        target_logit = torch.where(mine, logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).to(acc), 0.0)
        sums = all_reduce(torch.stack([sum_exp, target_logit]), group)  # [2, N]
        lse = torch.log(sums[0]) + row_max
        loss = (lse - sums[1]) * valid
        ctx.save_for_backward(logits, lse, local_target, mine, valid)
        ctx.overwrite_logits = overwrite_logits
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, local_target, mine, valid = ctx.saved_tensors
        scale = (grad_loss * valid).to(lse.dtype)
        grad = logits if ctx.overwrite_logits else torch.empty_like(logits)
        same_dtype = logits.dtype == lse.dtype
        for c in _row_chunks(*logits.shape, device=logits.device):
            # softmax rows, computed straight into the gradient when it has the reduction dtype
            p = torch.sub(logits[c], lse[c].unsqueeze(-1), out=grad[c]) if same_dtype else \
                logits[c].to(lse.dtype) - lse[c].unsqueeze(-1)
            p.exp_()
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, local_target[c]] -= mine[c].to(p.dtype)
            p.mul_(scale[c].unsqueeze(-1))
            if not same_dtype:
                grad[c] = p
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group,
                                 ignore_index: int = IGNORE_INDEX, overwrite_logits: bool = False) -> torch.Tensor:
    """Per-token cross-entropy (fp32) from vocab-parallel logits; 0 where target == ignore_index.

    logits: [..., V/mp] (this rank's vocab slice; padded vocab entries must be -inf), target: [...] global ids.
    overwrite_logits: backward writes the logits' gradient over the logits (for logits nothing reads later).
    """
    shape = target.shape
    loss = _VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            group, ignore_index, overwrite_logits)
    return loss.view(shape)


def vocab_parallel_log_probs(logits: torch.Tensor, target: torch.Tensor, group,
                             overwrite_logits: bool = False) -> torch.Tensor:
    """log p(target) per token (fp32) from vocab-parallel logits: [..., V/mp], [...] -> [...]."""
    return -vocab_parallel_cross_entropy(logits, target, group, IGNORE_INDEX, overwrite_logits)


class _VocabParallelEntropy(torch.autograd.Function):
    """fwd: per-row entropy of softmax(logits) (all-reduce MAX of the row max, then SUM of sum-exp and sum of
    exp x shifted logit over MP); bwd: -p (log p + H) * grad on the local vocab slice, no communication."""

    @staticmethod
    def forward(ctx, logits, group):
        x = logits.reshape(-1, logits.shape[-1])  # [N, V/mp]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        chunks = _row_chunks(*x.shape, device=x.device)  # cache-sized row chunks, two reused buffers
        row_max = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for c in chunks:
            row_max[c] = x[c].max(dim=-1).values.to(acc)
        row_max = all_reduce(row_max, group, op=dist.ReduceOp.MAX)
        sums = torch.empty(2, x.shape[0], dtype=acc, device=x.device)  # [sum exp, sum exp * shifted logit]
        rows = chunks[0].stop if chunks else 0
        shifted_buf, p_buf = (torch.empty(rows, x.shape[1], dtype=acc, device=x.device) for _ in range(2))
        for c in chunks:
            shifted, p = shifted_buf[: c.stop - c.start], p_buf[: c.stop - c.start]
            torch.sub(x[c], row_max[c].unsqueeze(-1), out=shifted)
            torch.exp(shifted, out=p)
            sums[0, c] = p.sum(-1)
            shifted.nan_to_num_(neginf=0.0)  # padded vocab entries: exp 0, and 0 * -inf must not become NaN
            sums[1, c] = shifted.mul_(p).sum(-1)
        sums = all_reduce(sums, group)
        sum_exp, weighted = sums[0], sums[1]
        entropy = torch.log(sum_exp) - weighted / sum_exp
        ctx.save_for_backward(logits, (torch.log(sum_exp) + row_max).view(logits.shape[:-1]),
                              entropy.view(logits.shape[:-1]))
        return entropy.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        logits, lse, entropy = ctx.saved_tensors
        out = torch.empty_like(logits)  # the only [N, V/mp] buffer: the rest is row-chunk sized
        x, o = logits.reshape(-1, logits.shape[-1]), out.view(-1, logits.shape[-1])
        lse, entropy, grad = lse.reshape(-1, 1), entropy.reshape(-1, 1), grad.reshape(-1, 1)
        for c in _row_chunks(*x.shape, device=x.device):
            log_p = upcast(x[c]) - lse[c]
            p = log_p.exp()
            log_p.nan_to_num_(neginf=0.0).add_(entropy[c])
            o[c] = p.mul_(log_p).mul_(grad[c]).neg_()
        return out, None


def vocab_parallel_entropy(logits: torch.Tensor, group, differentiable: bool = False) -> torch.Tensor:
    """Entropy of softmax(logits) per token (fp32): [N, V/mp] -> [N]; padded vocab entries must be -inf.

    ``differentiable`` keeps the logits for backward (an entropy bonus); otherwise no graph is recorded.
    Callers that differentiate must not let another node overwrite the logits in place."""
    if differentiable:
        return _VocabParallelEntropy.apply(logits, group)
    with torch.no_grad():
        return _VocabParallelEntropy.apply(logits, group)


def mean_over_tokens(per_token: torch.Tensor, target: torch.Tensor, reduce_group,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of per-token losses divided by the count of non-ignored tokens over the whole ``reduce_group``.

    Each rank returns its share; summing the returned values over ``reduce_group`` (or summing gradients)
    gives the mean over every non-ignored token of the global batch.
    """
    count = all_reduce((target != ignore_index).sum().to(torch.float32), reduce_group)
    return per_token.sum() / count.clamp(min=1.0)

