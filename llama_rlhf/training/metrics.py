"""Per-step metrics: peak memory per rank, and metrics.jsonl written by global rank 0."""
from __future__ import annotations

import json
import os
import resource

import torch
import torch.distributed as dist


def local_peak_memory_mb(device: torch.device) -> float:
    """This process's peak: CUDA max allocated on ``device``, or the CPU process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def peak_memory_mb(ps) -> float:
    """The largest per-rank peak over all ranks (a collective: every rank calls it)."""
    peak = torch.tensor(local_peak_memory_mb(ps.device), dtype=torch.float64, device=ps.device)
    if ps.world_size > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak.item())


class MetricsLog:
    """Appends one JSON line per record to ``log_dir/metrics.jsonl`` on global rank 0."""

    def __init__(self, log_dir: str, ps):
        self.ps = ps
        self.path = os.path.join(log_dir, "metrics.jsonl")
        if ps.rank == 0:
            os.makedirs(log_dir, exist_ok=True)

    def write(self, record: dict) -> dict:
        """Add ``peak_memory_mb`` (collective: call on every rank) and write the record; returns it."""
        record["peak_memory_mb"] = round(peak_memory_mb(self.ps), 1)
        if self.ps.rank == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def drop_after(self, step: int) -> None:
        """Forget the records of steps after ``step`` (a resume redoes them: a crashed round logged some)."""
        if self.ps.rank != 0 or not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            with open(self.path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
