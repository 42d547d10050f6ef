"""The data side of sequence parallelism: pad a batch, then give each SP rank its zigzag chunks.

The sequence (length S, a multiple of 2·SP) is cut into 2·SP equal chunks; SP rank r holds chunks r and
2·SP−1−r, in that order. Every [B, S] tensor of a batch (input ids, position ids, already-shifted labels,
segment ids) is permuted identically, so each token keeps its position and its target, and the loss summed
over the SP ranks is the loss of the unsplit sequence.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .cross_entropy import IGNORE_INDEX

# what each known [B, S] field is padded with on the right (input_ids: the caller's pad id)
PAD_VALUES = {"labels": IGNORE_INDEX, "segment_ids": -1, "position_ids": 0, "loss_mask": 0, "attention_mask": 0}


def zigzag_slots(seq_len: int, sp: int, rank: int, device=None) -> torch.Tensor:
    """Global slot indices [S / SP] held by SP rank ``rank``: chunk ``rank`` then chunk ``2·sp − 1 − rank``."""
    if seq_len % (2 * sp):
        raise ValueError(f"sequence length {seq_len} is not a multiple of 2 x --sequence_parallel_size "
                         f"({2 * sp}); pad it first (pad_to_multiple / split_for_sequence_parallel)")
    c = seq_len // (2 * sp)
    mirror = 2 * sp - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange(mirror * c, (mirror + 1) * c, device=device)])


def zigzag_split(x: torch.Tensor, sp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag chunks of ``x`` along ``dim``: [.., S, ..] -> [.., S / SP, ..]."""
    return x.index_select(dim, zigzag_slots(x.shape[dim], sp, rank, x.device))


def zigzag_merge(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of ``zigzag_split``: every rank's part (in SP-rank order) -> the whole sequence along ``dim``."""
    sp = len(parts)
    local = parts[0].shape[dim]
    shape = list(parts[0].shape)
    shape[dim] = local * sp
    full = parts[0].new_empty(shape)
    for rank, part in enumerate(parts):
        full.index_copy_(dim, zigzag_slots(local * sp, sp, rank, part.device), part)
    return full


def gather_zigzag(x: torch.Tensor, sp_group, dim: int = 1) -> torch.Tensor:
    """All-gather every SP rank's zigzag chunks and put the sequence back in order (no autograd)."""
    if sp_group is None or dist.get_world_size(sp_group) == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(sp_group))]
    dist.all_gather(parts, x, group=sp_group)
    return zigzag_merge(parts, dim)


def pad_to_multiple(batch: dict, multiple: int, pad_id: int = 0) -> dict:
    """Right-pad every [B, S] tensor of ``batch`` so S is a multiple of ``multiple``; no token is dropped.

    input_ids get ``pad_id``, labels -100 (no loss), segment ids -1, position ids 0 (always a valid RoPE
    position; right padding sits after every real token, so causal attention never lets a real token see it).
    """
    lengths = {tuple(t.shape) for t in batch.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 2:
        raise ValueError(f"batch tensors must all be [B, S] with the same shape, got "
                         f"{ {k: tuple(v.shape) for k, v in batch.items()} }")
    b, s = next(iter(lengths))
    missing = -s % multiple
    if missing == 0:
        return dict(batch)
    out = {}
    for key, t in batch.items():
        if key == "input_ids":
            value = pad_id
        elif key in PAD_VALUES:
            value = PAD_VALUES[key]
        else:
            raise ValueError(f"pad_to_multiple: do not know how to pad batch field {key!r} "
                             f"(known: input_ids, {', '.join(PAD_VALUES)})")
        out[key] = torch.cat([t, t.new_full((b, missing), value)], dim=1)  # [B, S] -> [B, S + missing]
    return out


def split_for_sequence_parallel(batch: dict, ps, pad_id: int = 0) -> dict:
    """This SP rank's part of a collated batch: padded to a multiple of 2·SP, then its zigzag chunks.

    ``batch`` holds [B, S] tensors (input_ids, labels already shifted, optionally position_ids, segment_ids);
    position ids 0..S-1 are added when absent. Returns the same keys, each [B, S_padded / SP].
    """
    batch = dict(batch)
    if "input_ids" not in batch:
        raise ValueError("split_for_sequence_parallel: the batch has no 'input_ids'")
    ids = batch["input_ids"]
    if "position_ids" not in batch:
        batch["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1).clone()
    batch = pad_to_multiple(batch, 2 * ps.sp_size, pad_id)
    return {key: zigzag_split(t, ps.sp_size, ps.sp_rank) for key, t in batch.items()}
