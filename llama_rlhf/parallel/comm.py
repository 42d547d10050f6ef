"""Autograd communication primitives for model parallelism.

Each primitive is a torch.autograd.Function whose docstring states its forward and backward contract.
The group is always passed in; a group of one rank (or ``None``) makes every primitive the identity.
Collectives run out of place: an input tensor is never modified.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Out-of-place all-reduce: returns a new tensor, leaves ``x`` untouched."""
    out = x.clone(memory_format=torch.contiguous_format)
    if group_size(group) > 1:
        dist.all_reduce(out, op=op, group=group)
    return out


def all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dim, in group-rank order."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def split_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's equal slice of the last dim."""
    world = group_size(group)
    if world == 1:
        return x
    return x.chunk(world, dim=-1)[group_rank(group)].contiguous()


class _CopyToGroup(torch.autograd.Function):
    """fwd: identity; bwd: all-reduce (sum) of the gradient over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    """fwd: all-reduce (sum) over the group; bwd: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    """fwd: all-gather along the last dim; bwd: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return split_last_dim(grad, ctx.group), None


class _ScatterToGroup(torch.autograd.Function):
    """fwd: keep this rank's slice of the last dim; bwd: all-gather the gradient along the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_last_dim(grad, ctx.group), None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a model-parallel region. fwd: identity, bwd: all-reduce over the group."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a model-parallel region by summing partial results. fwd: all-reduce, bwd: identity."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def gather_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """fwd: all-gather along the last dim, bwd: split the gradient along the last dim."""
    return x if group_size(group) == 1 else _GatherFromGroup.apply(x, group)


def scatter_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """fwd: split along the last dim, bwd: all-gather the gradient along the last dim."""
    return x if group_size(group) == 1 else _ScatterToGroup.apply(x, group)
