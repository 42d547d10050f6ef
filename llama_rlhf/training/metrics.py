"""Per-step metrics: peak memory per rank, and the record written by global rank 0 to metrics.jsonl and to the
sinks of --report_to (TensorBoard event files, a wandb run)."""
from __future__ import annotations

import atexit
import importlib.util
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


REPORT_TO = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> package it needs


def parse_report_to(text: str | None) -> tuple[str, ...]:
    """--report_to "tensorboard,wandb" -> ("jsonl", "tensorboard", "wandb"): jsonl is always on; an unknown sink
    or one whose package is not installed is a UsageError (at start-up, before any model is loaded)."""
    from ..runtime import UsageError
    names = ["jsonl"]
    for name in (n.strip() for n in (text or "").split(",")):
        if not name or name in names:
            continue
        if name not in REPORT_TO:
            raise UsageError(f"--report_to {name!r} is not one of {', '.join(REPORT_TO)}")
        if importlib.util.find_spec(REPORT_TO[name]) is None:
            raise UsageError(f"--report_to {name} needs the {REPORT_TO[name]} package: pip install {REPORT_TO[name]}")
        names.append(name)
    return tuple(names)


def _scalars(record: dict) -> dict:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def _texts(record: dict) -> dict:
    """String values, and lists of strings joined (e.g. the answers of SFT sample tracking)."""
    out = {k: v for k, v in record.items() if isinstance(v, str)}
    out.update({k: "\n\n".join(v) for k, v in record.items()
                if isinstance(v, list) and v and all(isinstance(x, str) for x in v)})
    return out


class TensorBoardSink:
    """Scalars (and texts) of every record into ``log_dir/tensorboard`` event files, at the record's step."""

    def __init__(self, log_dir: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, step)
        for key, value in _texts(record).items():
            self.writer.add_text(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A wandb run in ``log_dir/wandb`` (project $WANDB_PROJECT or llama_rlhf; WANDB_MODE=offline needs no network)."""

    def __init__(self, log_dir: str, config: dict):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llama_rlhf"), dir=log_dir, config=config)

    def write(self, record: dict) -> None:
        self.run.log({**_scalars(record), **_texts(record)}, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


class MetricsLog:
    """Appends one JSON line per record to ``log_dir/metrics.jsonl`` on global rank 0, and hands the same record to
    the other sinks of ``report_to`` (rank 0 only; ``config``, the run's flags, goes to wandb).

    ``memory_before_model_mb`` (what a rank held before the model was built: the runtime, the tokenizer, the data;
    on CUDA about 0) is logged beside the peak, so the peak's model part is the difference (benchmarks/plan tests).
    """

    def __init__(self, log_dir: str, ps, memory_before_model_mb: float = 0.0, report_to=("jsonl",),
                 config: dict | None = None):
        self.ps = ps
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.memory_before_model_mb = memory_before_model_mb
        self.sinks = []
        if ps.rank == 0:
            os.makedirs(log_dir, exist_ok=True)
            self.sinks = [SINKS[name](log_dir, config or {}) for name in report_to if name != "jsonl"]
            if self.sinks:
                atexit.register(self.close)

    def write(self, record: dict) -> dict:
        """Add ``peak_memory_mb`` and ``memory_before_model_mb`` (max over ranks; collective: call on every rank)
        and write the record; returns it."""
        peak, before = max_over_ranks(self.ps, [local_peak_memory_mb(self.ps.device), self.memory_before_model_mb])
        record["peak_memory_mb"], record["memory_before_model_mb"] = round(peak, 1), round(before, 1)
        if self.ps.rank == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            for sink in self.sinks:
                sink.write(record)
        return record

    def close(self) -> None:
        """Finish the sinks (event files closed, the wandb run finished); metrics.jsonl needs nothing."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []

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
