"""Deterministic weight initialisation that does not depend on the parallel layout.

Each parameter's full tensor is drawn from a generator seeded by (seed, parameter name) and then sliced,
so a model built from scratch holds the same numbers at every MP/SP/DP size.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn as nn

from ..parallel.layers import take_shard


def full_init(name: str, shape: tuple, std: float, norm_offset: float, generator: torch.Generator) -> torch.Tensor:
    """The full tensor for parameter ``name``: ones (or zeros for offset norms), zero biases, N(0, std) weights."""
    if "norm" in name:
        return torch.full(shape, 1.0 - norm_offset)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter of a sharded model from ``seed``, identically on every layout."""
    cfg = model.cfg
    for name, param in model.named_parameters():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = full_init(name, tuple(param.shard.full_shape), cfg.initializer_range, cfg.norm_weight_offset,
                         generator)
        param.copy_(take_shard(full, param.shard))
