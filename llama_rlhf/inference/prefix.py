"""Shared-prefix prefill: prompts admitted together that start with the same tokens (a chat template's system
prompt, a task instruction) run that prefix once.

The prefix runs as one row; then every prompt's remaining tokens (left-padded to the longest remainder) run
with the prefix's keys and values in front of their own, at their true positions. Each layer's keys and values
are then laid out as the plain prefill lays them out (every prompt right-aligned: padding, prefix, rest), so the
rest of the engine sees the same cache. The prefix's rows of every GEMM are computed once instead of once per
prompt: with SmolLM2's chat template, 24 of a typical 37-token prompt.

Only where the arithmetic is that of the plain prefill: causal attention (a sliding window wider than every
prompt, so no key is ever out of it) and every prompt longer than the prefix (its last token's logits come from
the second pass).
"""
from __future__ import annotations

import torch

MIN_SHARED_PREFIX = 8  # shorter common prefixes run with the rest: the extra forward would cost more than it saves


def shared_prefix_length(prompts: list[list[int]], windows) -> int:
    """Tokens every one of ``prompts`` starts with, capped so each keeps at least one token of its own; 0 when
    sharing does not apply (one prompt, a short prefix, or a sliding window narrower than the longest prompt)."""
    if len(prompts) < 2:
        return 0
    longest, shortest = max(len(p) for p in prompts), min(len(p) for p in prompts)
    if any(w is not None and w < longest for w in windows):
        return 0
    first, n = prompts[0], 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


class PrefixedWindow:
    """The model's view of the cache for the second pass: every row's keys/values are the prefix's followed by its
    own (left-padded) rest; ``.start`` is the prefix length, so the rest's queries sit after it."""

    def __init__(self, prefix_cache, rows: int):
        self.prefix, self.rows = prefix_cache, rows
        self.start = prefix_cache.capacity
        self.k, self.v = {}, {}  # layer -> [rows, prefix + rest, Hkv, D]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v of the rest [rows, S, Hkv, D] -> prefix + rest [rows, L + S, Hkv, D] (kept for ``right_aligned``)."""
        pk = self.prefix.k[layer].transpose(1, 2).expand(self.rows, -1, -1, -1)  # [1, Hkv, L, D] -> [rows, L, Hkv, D]
        pv = self.prefix.v[layer].transpose(1, 2).expand(self.rows, -1, -1, -1)
        self.k[layer], self.v[layer] = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
        return self.k[layer], self.v[layer]

    def right_aligned(self, cache, lengths: list[int]) -> None:
        """Fill ``cache`` (rows, width = prefix + longest rest, no layers yet) as the plain prefill would: row i's
        prompt in its last lengths[i] slots. Rest tokens keep their slots; the prefix moves right by the row's
        padding."""
        width, prefix = cache.capacity, self.start
        slots = torch.arange(width, device=cache.valid.device).view(1, -1)  # [1, W]
        begin = width - torch.tensor(lengths, device=slots.device).view(-1, 1)  # [rows, 1]: first slot of the prompt
        in_prefix = (slots >= begin) & (slots < begin + prefix)
        source = torch.where(in_prefix, slots - begin, slots)  # [rows, W]: padding slots read anything (not valid)
        row = torch.arange(self.rows, device=slots.device).view(-1, 1)
        for layer in sorted(self.k):  # each layer's prefix + rest copy goes as its laid-out copy comes: one extra
            k, v = self.k.pop(layer), self.v.pop(layer)  # layer at a time, as in the whole-prompt prefill
            cache.k.append(k[row, source].transpose(1, 2))  # [rows, W, Hkv, D] -> [rows, Hkv, W, D]
            cache.v.append(v[row, source].transpose(1, 2))
        cache.valid.copy_(slots >= begin)
