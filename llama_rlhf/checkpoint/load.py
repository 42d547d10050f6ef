"""Fill a sharded model from a tensor source, strictly: every key accounted for, every shape checked.

Sources present HF key names (Meta and Qwen1 readers translate on the fly), and each parameter's
``shard`` tells which rows to read, so this one loop serves every family and every MP size.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..parallel.layers import pad_shard, real_range
from .hf import CheckpointError

# Keys some checkpoints carry that hold no weights of ours (recomputed buffers).
IGNORED_KEY_PATTERNS = (re.compile(r".*rotary_emb\.inv_freq$"), re.compile(r".*\.masked_bias$"),
                        re.compile(r".*\.attn\.bias$"))


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_keys(model: nn.Module, source, where: str) -> dict[str, nn.Parameter]:
    """Map checkpoint key -> parameter; raise naming any missing or unexpected key or mismatched shape."""
    expected = dict(model.named_parameters())
    available = source.keys()
    tied = getattr(model.cfg, "tie_word_embeddings", False)
    missing = sorted(set(expected) - available)
    unexpected = sorted(k for k in available - set(expected)
                        if not any(p.match(k) for p in IGNORED_KEY_PATTERNS) and not (tied and k == "lm_head.weight"))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise CheckpointError(f"checkpoint {where} does not match the {model.cfg.model_type} model: "
                              + "; ".join(parts) + " (is --model_type right for this checkpoint?)")
    for key, param in expected.items():
        shape = tuple(source.shape(key))
        if shape != tuple(param.shard.full_shape):
            raise CheckpointError(f"checkpoint {where}: {key} has shape {list(shape)} but the config gives "
                                  f"{list(param.shard.full_shape)}")
    return expected


@torch.no_grad()
def load_sharded(model: nn.Module, source, where: str = "") -> None:
    """Copy this rank's slice of every parameter from ``source`` (only those bytes are read)."""
    for key, param in check_keys(model, source, where).items():
        info = param.shard
        if info.dim is None:
            part = source.read(key)
        else:
            start, stop = real_range(info)
            part = pad_shard(source.read(key, info.dim, start, stop), info)
        param.copy_(part.to(param.dtype))
