"""Per-step metrics: peak memory per rank, and metrics.jsonl written by global rank 0."""
from __future__ import annotations

import json
import os
import resource

import torch
import torch.distributed as dist


def _proc_status_mb(key: str) -> float | None:
    """A ``kB`` line of /proc/self/status (VmRSS, VmHWM) in MB; None where there is no /proc (not Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def local_peak_memory_mb(device: torch.device) -> float:
    """This process's peak: CUDA max allocated on ``device``, or the CPU process's peak resident set.

    CPU: VmHWM, this process's own high-water mark. Not getrusage's ru_maxrss: Linux carries that across
    fork + exec, so a worker started by torchrun or a test reports at least its launcher's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def local_memory_mb(device: torch.device) -> float:
    """What this process holds now: CUDA allocated on ``device``, or the CPU resident set (VmRSS)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else local_peak_memory_mb(device)


def max_over_ranks(ps, values: list[float]) -> list[float]:
    """Each value's maximum over all ranks (a collective: every rank calls it)."""
    t = torch.tensor(values, dtype=torch.float64, device=ps.device)
    if ps.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def peak_memory_mb(ps) -> float:
    """The largest per-rank peak over all ranks (a collective: every rank calls it)."""
    return max_over_ranks(ps, [local_peak_memory_mb(ps.device)])[0]


class MetricsLog:
    """Appends one JSON line per record to ``log_dir/metrics.jsonl`` on global rank 0.

    ``memory_before_model_mb`` (what a rank held before the model was built: the runtime, the tokenizer, the data;
    on CUDA about 0) is logged beside the peak, so the peak's model part is the difference (benchmarks/plan tests).
    """

    def __init__(self, log_dir: str, ps, memory_before_model_mb: float = 0.0):
        self.ps = ps
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.memory_before_model_mb = memory_before_model_mb
        if ps.rank == 0:
            os.makedirs(log_dir, exist_ok=True)

    def write(self, record: dict) -> dict:
        """Add ``peak_memory_mb`` and ``memory_before_model_mb`` (max over ranks; collective: call on every rank)
        and write the record; returns it."""
        peak, before = max_over_ranks(self.ps, [local_peak_memory_mb(self.ps.device), self.memory_before_model_mb])
        record["peak_memory_mb"], record["memory_before_model_mb"] = round(peak, 1), round(before, 1)
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
