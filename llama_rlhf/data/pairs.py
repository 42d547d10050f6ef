"""Preference pairs over the token cache: sample 2i is pair i's chosen response, 2i + 1 its rejected one.

A pair's index (its order in the cache: files in order, records in file order) is its id: reference log-probs
are kept by it, and the step schedule (``StepBatches``) deals pairs exactly as it deals SFT rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..runtime import UsageError, log
from .batches import StepBatches
from .cache import TokenCache, open_cache
from .packing import CachedRows, Row
from .samples import DatasetStats
from .train_data import cache_options, cache_root


@dataclass
class Pair:
    index: int  # the pair's id
    chosen: Row
    rejected: Row

    @property
    def labels(self) -> list[int]:  # both sides' (StepBatches counts a step's trained tokens from it)
        return self.chosen.labels + self.rejected.labels


class PairRows:
    """The pairs of a preference cache, read on demand from its memory map."""

    def __init__(self, cache: TokenCache):
        self.cache = cache
        self.rows = CachedRows(cache, np.arange(len(cache) + 1, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.cache) // 2

    def __getitem__(self, i: int) -> Pair:
        return Pair(int(i), self.rows[2 * i], self.rows[2 * i + 1])


@dataclass
class PairData:
    pairs: PairRows
    schedule: StepBatches
    eval_pairs: PairRows | None
    cache_key: str  # names the training pairs' cache (and so their reference log-probs)


def pair_cache(files: list[str], tok, args, ps) -> TokenCache:
    options = {**cache_options(args), "format": "preference"}
    cache = open_cache(files, tok, options, cache_root(args), log=lambda m: log(m, ps))
    for src in cache.sources:
        log(f"{src['path']}: {DatasetStats(**src['stats']).describe()} (max {args.max_seq_len} tokens per "
            f"response with its prompt)", ps)
    return cache


def build_pair_data(args, tok, ps) -> PairData:
    """Training pairs and their schedule (and the --eval_file pairs), from the token cache."""
    if args.packing or args.stream_packing or args.train_file_weights is not None:
        raise UsageError("preference training takes one pair per row: drop --packing / --stream_packing / "
                         "--train_file_weights")
    if args.data_format not in ("auto", "preference"):
        raise UsageError(f"--data_format {args.data_format}: preference training reads 'chosen' / 'rejected' "
                         f"records (--data_format auto or preference)")
    files = list(args.train_file) if isinstance(args.train_file, (list, tuple)) else [args.train_file]
    cache = pair_cache(files, tok, args, ps)
    pairs = PairRows(cache)
    schedule = StepBatches(pairs, args.max_batch_size, ps.dp_size, args.gradient_accumulation_steps, args.seed)
    eval_pairs = PairRows(pair_cache([args.eval_file], tok, args, ps)) if args.eval_file else None
    return PairData(pairs, schedule, eval_pairs, os.path.basename(cache.folder))
