"""Rows: one sample each, or consecutive samples packed up to ``max_len`` tokens (positions restart, segment ids
keep documents apart). In memory (``pack``) or as row boundaries over the token cache (``CachedRows``)."""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

from .samples import Sample


@dataclass
class Row:
    """One batch row: a sample, or several packed samples with their own positions and segment ids."""
    ids: list[int]
    labels: list[int]
    positions: list[int]
    segments: list[int]


def pack(samples: list[Sample], max_len: int, packing: bool) -> list[Row]:
    """Rows in sample order; with packing, consecutive samples share a row up to ``max_len`` tokens."""
    rows: list[Row] = []
    for s in samples:
        n = len(s.ids)
        if packing and rows and len(rows[-1].ids) + n <= max_len:
            row = rows[-1]
            row.segments += [row.segments[-1] + 1] * n
            row.ids += s.ids
            row.labels += s.labels
            row.positions += list(range(n))
        else:
            rows.append(Row(list(s.ids), list(s.labels), list(range(n)), [0] * n))
    return rows


def row_starts(lengths: np.ndarray, max_len: int, packing: bool, bounds=None) -> np.ndarray:
    """First sample of every row, plus len(lengths) at the end ([rows + 1] int64), by ``pack``'s greedy rule.
    ``bounds`` (sample indices where a new source begins) also start new rows."""
    n = len(lengths)
    if not packing:
        return np.arange(n + 1, dtype=np.int64)
    breaks = set(int(b) for b in bounds) if bounds is not None else set()
    starts, used = array("q"), 0
    for c in range(0, n, 1 << 16):  # chunks: no Python list of every length at once
        for i, length in enumerate(lengths[c:c + (1 << 16)].tolist(), start=c):
            if starts and used + length <= max_len and i not in breaks:
                used += length
            else:
                starts.append(i)
                used = length
    starts.append(n)
    return np.frombuffer(starts, dtype=np.int64)


class CachedRows:
    """The rows of a token cache, built on demand from its memory map (nothing per sample held in Python)."""

    def __init__(self, cache, starts: np.ndarray):
        self.cache, self.starts = cache, starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, r: int) -> Row:
        a, b = int(self.starts[r]), int(self.starts[r + 1])
        ids, labels = self.cache.tokens(a, b)
        lengths = np.diff(self.cache.offsets[a:b + 1])
        positions = np.arange(len(ids)) - np.repeat(self.cache.offsets[a:b] - self.cache.offsets[a], lengths)
        segments = np.repeat(np.arange(b - a), lengths)
        return Row(ids.tolist(), labels.tolist(), positions.tolist(), segments.tolist())


class StreamRows:
    """Pretraining rows: the cache's token stream (all samples back to back, none truncated) cut into rows of
    exactly ``max_len`` tokens (the last one shorter); a document that does not fit continues in the next row.
    Positions restart at every document and row start; segment ids keep documents apart within a row."""

    def __init__(self, cache, max_len: int):
        self.cache, self.max_len, self.total = cache, max_len, int(cache.offsets[-1])

    def __len__(self) -> int:
        return -(-self.total // self.max_len)

    def __getitem__(self, r: int) -> Row:
        s, e = r * self.max_len, min((r + 1) * self.max_len, self.total)
        ids = np.asarray(self.cache.ids[s:e], dtype=np.int64)
        nxt = np.full_like(ids, -100)
        following = np.asarray(self.cache.ids[s + 1:e + 1], dtype=np.int64)  # the next row's first id included
        nxt[:len(following)] = following
        labels = np.where(np.asarray(self.cache.mask[s:e]) != 0, nxt, -100)
        offsets = self.cache.offsets
        a = int(np.searchsorted(offsets, s, side="right")) - 1
        b = int(np.searchsorted(offsets, e, side="left"))
        bounds = np.clip(np.asarray(offsets[a:b + 1]), s, e) - s  # document pieces in this row
        lengths = np.diff(bounds)
        positions = np.arange(e - s) - np.repeat(bounds[:-1], lengths)
        segments = np.repeat(np.arange(len(lengths)), lengths)
        return Row(ids.tolist(), labels.tolist(), positions.tolist(), segments.tolist())
