"""Deterministic DP-sharded batches: the epoch's permutation, the step's rows for each DP rank, padding."""
from __future__ import annotations

import math

import torch

from ..parallel.cross_entropy import IGNORE_INDEX


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation of range(n) on every rank for a given (seed, epoch) ([n] int64)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return epoch_permutation(n, seed, epoch).tolist()


def collate(rows: list, pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded tensors [B, S] (S rounded up to ``multiple``); None rows are all padding, no loss."""
    length = max([len(r.ids) for r in rows if r is not None] + [1])
    length = int(math.ceil(length / multiple) * multiple)
    b = len(rows)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(length).repeat(b, 1)
    segments = torch.full((b, length), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r is None:
            continue
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        labels[i, :n] = torch.tensor(r.labels)
        positions[i, :n] = torch.tensor(r.positions)
        segments[i, :n] = torch.tensor(r.segments)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "segment_ids": segments}


class StepBatches:
    """Deterministic schedule of rows: which rows each DP rank trains on at each optimizer step.

    One optimizer step consumes a global batch of ``micro_batch * dp * accumulation`` rows of the epoch's
    order; the gradient is the token mean over all of them, however they are split over DP ranks and
    accumulation micro-steps. The final short step is filled with empty rows (no loss). A step is a pure
    function of (epoch, step): resuming mid-epoch is exact. ``order(epoch)`` gives the epoch's row indices
    (default: a permutation of all rows; a mixture of sources draws its own).
    """

    def __init__(self, rows, micro_batch: int, dp: int, accumulation: int, seed: int, order=None):
        self.rows, self.micro_batch, self.dp, self.accumulation, self.seed = rows, micro_batch, dp, accumulation, seed
        self.order = order or (lambda epoch: epoch_permutation(len(rows), seed, epoch))
        self.global_batch = micro_batch * dp * accumulation
        self._order = (0, self.order(0))
        self.epoch_rows = len(self._order[1])
        self.steps_per_epoch = int(math.ceil(self.epoch_rows / self.global_batch))

    def step_rows(self, epoch: int, step: int) -> list:
        if self._order[0] != epoch:
            self._order = (epoch, self.order(epoch))
        chosen = self._order[1][step * self.global_batch:(step + 1) * self.global_batch].tolist()
        return [self.rows[i] for i in chosen] + [None] * (self.global_batch - len(chosen))

    def micro_batches(self, epoch: int, step: int, dp_rank: int) -> tuple[list[list], int]:
        """This DP rank's micro-batches for the step, and the step's trained-token count over all ranks."""
        rows = self.step_rows(epoch, step)
        total = sum(sum(1 for t in r.labels if t != IGNORE_INDEX) for r in rows if r is not None)
        per_micro = self.micro_batch * self.dp
        mine = [rows[a * per_micro + dp_rank * self.micro_batch:a * per_micro + (dp_rank + 1) * self.micro_batch]
                for a in range(self.accumulation)]
        return mine, total
