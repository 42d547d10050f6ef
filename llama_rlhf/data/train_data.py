"""The one entry point trainers call: flags -> token cache -> rows -> the deterministic step schedule."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..runtime import UsageError, log
from .batches import StepBatches, epoch_permutation
from .cache import TokenCache, open_cache
from .packing import CachedRows, StreamRows, row_starts
from .samples import DatasetStats


@dataclass
class TrainData:
    rows: CachedRows
    schedule: StepBatches
    eval_schedule: StepBatches | None
    cache: TokenCache


def cache_options(args) -> dict:
    """Every option that changes the token ids (part of the cache key)."""
    streamed = getattr(args, "stream_packing", False)  # samples kept whole: --max_seq_len does not change the ids
    return {"format": args.data_format, "use_chat_template": bool(args.use_chat_template),
            "system_prompt": args.system_prompt, "max_len": None if streamed else args.max_seq_len}


def cache_root(args) -> str:
    return args.data_cache_dir or os.path.join(args.save_dir, "data_cache")


def mixture_order(source_rows: list[tuple[int, int]], weights: list[float], seed: int):
    """order(epoch): each source's share of an epoch's rows is its weight's share of the total (rows drawn from
    the source's own reshuffled permutations, repeating when up-sampled), then all shuffled together."""
    total = sum(b - a for a, b in source_rows)
    counts = [int(round(w / sum(weights) * total)) for w in weights]

    def order(epoch: int) -> torch.Tensor:
        parts = []
        for s, ((a, b), k) in enumerate(zip(source_rows, counts)):
            n = b - a
            cycles = [epoch_permutation(n, seed + 7919 * (s + 1), epoch * 1000 + c) for c in range(-(-k // n))]
            parts.append(torch.cat(cycles)[:k] + a if cycles else torch.zeros(0, dtype=torch.long))
        mixed = torch.cat(parts)
        return mixed[epoch_permutation(len(mixed), seed, epoch)]
    return order


def cached_rows(files: list[str], tok, args, ps) -> tuple[TokenCache, object, list[tuple[int, int]]]:
    """Map (building if needed) the cache of ``files`` and cut it into rows; also each file's row range."""
    cache = open_cache(files, tok, cache_options(args), cache_root(args), log=lambda m: log(m, ps))
    for src in cache.sources:
        log(f"{src['path']}: {DatasetStats(**src['stats']).describe()} (max {args.max_seq_len} tokens)", ps)
    firsts = [s["first"] for s in cache.sources]
    if getattr(args, "stream_packing", False):
        return cache, StreamRows(cache, args.max_seq_len), []
    starts = row_starts(cache.lengths(), args.max_seq_len, args.packing, firsts)
    row_first = np.searchsorted(starts, firsts + [len(cache)]).tolist()
    return cache, CachedRows(cache, starts), list(zip(row_first[:-1], row_first[1:]))


def build_train_data(args, tok, ps) -> TrainData:
    """Training rows and their schedule (and the eval schedule when --eval_file is given), from the token cache."""
    files = list(args.train_file) if isinstance(args.train_file, (list, tuple)) else [args.train_file]
    weights = args.train_file_weights
    if weights is not None and len(weights) != len(files):
        raise UsageError(f"--train_file_weights has {len(weights)} values for {len(files)} --train_file files")
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        raise UsageError(f"--train_file_weights must be >= 0 with a positive sum, got {weights}")
    if weights is not None and getattr(args, "stream_packing", False):
        raise UsageError("--train_file_weights cannot mix --stream_packing rows (a row may span files): drop one")
    cache, rows, source_rows = cached_rows(files, tok, args, ps)
    order = mixture_order(source_rows, weights, args.seed) if weights is not None else None
    schedule = StepBatches(rows, args.max_batch_size, ps.dp_size, args.gradient_accumulation_steps, args.seed, order)
    eval_schedule = None
    if args.eval_file:
        _, eval_rows, _ = cached_rows([args.eval_file], tok, args, ps)
        eval_schedule = StepBatches(eval_rows, args.max_batch_size, ps.dp_size, 1, args.seed)
    return TrainData(rows, schedule, eval_schedule, cache)
