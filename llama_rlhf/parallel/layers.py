"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Every parameter carries a ``ShardInfo`` (``param.shard``) saying which slice of the full checkpoint
tensor this rank holds. Loading, initialisation, export and gradient-norm clipping all read it, so
none of them needs a per-layer table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .comm import copy_to_group, group_rank, group_size, reduce_from_group
from .layout import padded_vocab_size  # noqa: F401 (re-exported: models and checkpoints import it from here)


@dataclass(frozen=True)
class ShardInfo:
    """Which slice of the full tensor (as stored in an HF checkpoint) this rank holds."""

    full_shape: tuple  # the whole tensor's shape, unpadded
    dim: int | None = None  # split dim; None: every MP rank holds the whole tensor
    start: int = 0  # my slice [start, stop) along dim, in padded coordinates
    stop: int = 0
    copies: int = 1  # how many MP ranks hold this identical slice (for counting it once)

    def local_shape(self) -> tuple:
        if self.dim is None:
            return tuple(self.full_shape)
        shape = list(self.full_shape)
        shape[self.dim] = self.stop - self.start
        return tuple(shape)


def attach_shard(param: nn.Parameter, info: ShardInfo) -> nn.Parameter:
    assert tuple(param.shape) == info.local_shape(), (param.shape, info)
    param.shard = info
    return param


def replicated(shape: tuple, copies: int, dtype=None) -> nn.Parameter:
    """A parameter every MP rank holds whole (norm weights, row-parallel biases)."""
    return attach_shard(nn.Parameter(torch.empty(shape, dtype=dtype)), ShardInfo(tuple(shape), copies=copies))


def split_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``size`` is cut into ``parts`` equal pieces."""
    if size % parts:
        raise ValueError(f"size {size} does not split into {parts} equal parts")
    step = size // parts
    return index * step, (index + 1) * step


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output rows: each rank computes a slice of y's last dim.

    ``parts``/``part`` choose the slicing (default: MP parts, mine is my MP rank). Replicated GQA key/value
    heads use fewer parts than ranks, so ``mp // parts`` ranks hold the same slice.
    The input must already be inside the MP region (see ``copy_input``): one ``copy_to_group`` is shared
    by every projection of the same input, so backward all-reduces the input gradient once.
    ``true_out_features`` < ``out_features`` marks padding rows (the LM head over a padded vocabulary).
    """

    def __init__(self, in_features: int, out_features: int, group, bias: bool = False,
                 parts: int | None = None, part: int | None = None, copy_input: bool = False,
                 true_out_features: int | None = None):
        super().__init__()
        mp, rank = group_size(group), group_rank(group)
        parts = mp if parts is None else parts
        part = rank if part is None else part
        self.group, self.copy_input = group, copy_input
        start, stop = split_range(out_features, parts, part)
        copies, full = mp // parts, true_out_features or out_features
        self.weight = attach_shard(nn.Parameter(torch.empty(stop - start, in_features)),
                                   ShardInfo((full, in_features), 0, start, stop, copies))
        self.bias = None
        if bias:
            self.bias = attach_shard(nn.Parameter(torch.empty(stop - start)),
                                     ShardInfo((full,), 0, start, stop, copies))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_group(x, self.group)
        return F.linear(x, self.weight, self.bias)  # [..., in] -> [..., out / parts]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along its input columns: each rank holds a slice of x's last dim.

    Partial products are summed by one all-reduce (fwd); the bias is added once, after the sum.
    """

    def __init__(self, in_features: int, out_features: int, group, bias: bool = False):
        super().__init__()
        mp, rank = group_size(group), group_rank(group)
        self.group = group
        start, stop = split_range(in_features, mp, rank)
        self.weight = attach_shard(nn.Parameter(torch.empty(out_features, stop - start)),
                                   ShardInfo((out_features, in_features), 1, start, stop, 1))
        self.bias = replicated((out_features,), mp) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_group(F.linear(x, self.weight), self.group)  # [..., in / mp] -> [..., out]
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary, padded to a multiple of MP) are split across MP ranks.

    Each rank looks up the ids in its range, zeroes the rest, and one all-reduce (fwd) sums the pieces.
    """

    def __init__(self, vocab_size: int, dim: int, group):
        super().__init__()
        mp, rank = group_size(group), group_rank(group)
        self.group, self.vocab_size = group, vocab_size
        self.vocab_start, self.vocab_stop = split_range(padded_vocab_size(vocab_size, mp), mp, rank)
        self.weight = attach_shard(nn.Parameter(torch.empty(self.vocab_stop - self.vocab_start, dim)),
                                   ShardInfo((vocab_size, dim), 0, self.vocab_start, self.vocab_stop, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_stop)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # [B, S] -> [B, S, D]
        return reduce_from_group(out, self.group)


def pad_shard(part: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """Zero-pad ``part`` (the real rows of my slice) up to the slice's padded length along the split dim."""
    missing = (info.stop - info.start) - part.shape[info.dim] if info.dim is not None else 0
    if missing <= 0:
        return part
    shape = list(part.shape)
    shape[info.dim] = missing
    return torch.cat([part, part.new_zeros(shape)], dim=info.dim)


def real_range(info: ShardInfo) -> tuple[int, int]:
    """[start, stop) of my slice clipped to the tensor's true size (padding rows excluded)."""
    size = info.full_shape[info.dim]
    return min(info.start, size), min(info.stop, size)


def take_shard(full: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """This rank's slice of a full tensor (zero-padded past the true size)."""
    if info.dim is None:
        return full
    start, stop = real_range(info)
    return pad_shard(full.narrow(info.dim, start, stop - start), info)
