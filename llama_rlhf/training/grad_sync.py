"""Gradient synchronisation after backward, and the global gradient norm.

1. Model-parallel partial gradients: a replicated KV-head slice (MP % n_kv == 0) and per-head norm weights
   (Qwen3 q_norm/k_norm) each see only this rank's query heads, so their gradients are summed over the
   ranks that share them. Ordinary replicated parameters (layer norms, row-parallel biases) already hold
   identical gradients on every MP rank and are left alone.
2. Data and sequence parallelism: ranks in the DP x SP group hold the same weights and different tokens;
   the loss is already divided by the global token count, so their gradients are summed, in buckets.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..parallel.comm import group_size
from ..parallel.state import ParallelState


def mp_partial_group_size(param: nn.Parameter, mp: int) -> int:
    """How many MP ranks hold partial gradients of this parameter that must be summed (1: none)."""
    if getattr(param, "mp_partial_grad", False):
        return mp
    info = param.shard
    return info.copies if info.dim is not None else 1


class GradientSync:
    """Callable once per optimizer step, after all backward passes of the step."""

    def __init__(self, model: nn.Module, ps: ParallelState, bucket_mb: float = 32.0):
        self.ps = ps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.partial = []  # (group, [params])
        by_size: dict[int, list] = {}
        for p in self.params:
            size = mp_partial_group_size(p, ps.mp_size)
            if size > 1:
                by_size.setdefault(size, []).append(p)
        for size in sorted(by_size):  # every rank creates the same subgroups in the same order
            self.partial.append((ps.mp_subgroup(size), by_size[size]))
        self.bucket_elems = int(bucket_mb * 2**20 / 4)

    def _all_reduce_bucketed(self, params, group) -> None:
        for p in params:  # a rank that had no tokens this step still joins with zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        bucket, elems = [], 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                elems += g.numel()
            if bucket and (g is None or elems >= self.bucket_elems):
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat, group=group)
                for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    t.copy_(synced)
                bucket, elems = [], 0

    @torch.no_grad()
    def reduce_model_parallel(self) -> None:
        """Sum partial gradients over the MP ranks that share a parameter."""
        for group, params in self.partial:
            if group_size(group) > 1:
                self._all_reduce_bucketed(params, group)

    @torch.no_grad()
    def reduce_data_parallel(self) -> None:
        """Sum gradients over DP x SP (the loss is already normalised by the global token count)."""
        if group_size(self.ps.dpsp_group) > 1:
            self._all_reduce_bucketed(self.params, self.ps.dpsp_group)

    def __call__(self) -> None:
        self.reduce_model_parallel()
        self.reduce_data_parallel()


@torch.no_grad()
def global_grad_norm(params, ps: ParallelState) -> float:
    """L2 norm of the whole model's gradient, each parameter counted once across MP copies.

    Call after GradientSync: DP x SP ranks then hold identical gradients, so only MP is summed over.
    """
    with_grad = [p for p in params if p.grad is not None]
    norms = torch._foreach_norm([p.grad.detach() for p in with_grad]) if with_grad else []  # one pass each
    copies = torch.tensor([p.shard.copies for p in with_grad], dtype=torch.float64, device=ps.device)
    squares = torch.stack([n.double() for n in norms]).pow(2) if norms else copies
    total = (squares / copies).sum() if norms else torch.zeros((), dtype=torch.float64, device=ps.device)
    if group_size(ps.mp_group) > 1:
        dist.all_reduce(total, group=ps.mp_group)
    return math.sqrt(total.item())


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, ps: ParallelState) -> float:
    """Scale gradients so the global norm is at most ``max_norm``; returns the norm before clipping."""
    params = list(params)
    norm = global_grad_norm(params, ps)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], max_norm / (norm + 1e-6))
    return norm
