"""Optimizer state in full-tensor coordinates, so a resume can re-slice it to any MP / SP / DP / zero stage.

Each writing rank saves ``optim-RRRRR.pt``: for every parameter piece it owns, the parameter's ``ShardInfo``
(full shape, split dim, [start, stop) in padded coordinates), its local shape, the range [lo, hi) of the flattened
local shard it owns, and those elements of exp_avg, exp_avg_sq and (when kept) the fp32 master. Stage 0 writes
whole local shards from one rank per MP slice; stage 1 writes every rank's partition. Reading assembles, one
parameter at a time, the full tensor from whatever pieces were saved (checking that they cover it) and cuts out
the piece the reading rank owns in its own layout.
"""
from __future__ import annotations

import glob
import os

import torch

from ..parallel.layers import take_shard
from .hf import CheckpointError
from .writes import writing

STATE_FORMAT = 2


def optimizer_file(state_dir: str, rank: int) -> str:
    return os.path.join(state_dir, f"optim-{rank:05d}.pt")


def rng_file(state_dir: str, rank: int) -> str:
    return os.path.join(state_dir, f"rng-{rank:05d}.pt")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nest of dicts and lists (what torch.save will write, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to ``path`` through a temporary file, fsynced, then renamed; a failed write is a WriteError."""
    tmp = path + ".tmp"
    with writing(path, tensor_bytes(obj)):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _covers(intervals: list[tuple[int, int]], size: int) -> bool:
    """Whether the union of [a, b) intervals covers [0, size)."""
    reach = 0
    for a, b in sorted(intervals):
        if a > reach:
            return False
        reach = max(reach, b)
    return reach >= size


class SavedOptimizerState:
    """Every rank's saved pieces (memory-mapped), answering "elements [lo, hi) of my local shard of X"."""

    def __init__(self, state_dir: str):
        files = sorted(glob.glob(os.path.join(state_dir, "optim-*.pt")))
        if not files:
            raise CheckpointError(f"{state_dir}: no optimizer state (optim-*.pt)")
        self.state_dir = state_dir
        self._pieces: dict[str, list[dict]] = {}
        for path in files:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name, entry in saved["pieces"].items():
                self._pieces.setdefault(name, []).append(entry)
        self._cached_name, self._cached = None, {}

    def names(self) -> set[str]:
        return set(self._pieces)

    def _full(self, name: str, key: str) -> torch.Tensor | None:
        """The whole (unpadded) tensor of ``key`` for parameter ``name``, or None if it was not saved."""
        entries = self._pieces[name]
        if key not in entries[0]:
            return None
        first = entries[0]
        full_shape, dim = [int(s) for s in first["full_shape"]], first["dim"]
        shards: dict = {}  # (start, stop) -> (flat local tensor, local shape, filled ranges)
        for e in entries:
            where = (e["start"], e["stop"]) if dim is not None else (0, 0)
            if where not in shards:
                shards[where] = (torch.zeros(_numel(e["local_shape"]), dtype=e[key].dtype), e["local_shape"], set())
            flat, _, filled = shards[where]
            lo, hi = (int(v) for v in e["range"])
            if (lo, hi) not in filled:  # MP copies of a replicated slice are saved more than once
                flat[lo:hi] = e[key]
                filled.add((lo, hi))
        for (start, stop), (flat, _, filled) in shards.items():
            if not _covers(list(filled), flat.numel()):
                raise CheckpointError(f"{self.state_dir}: the saved {key} of {name} (slice {start}:{stop}) is "
                                      f"incomplete: a rank's optim-*.pt file is missing")
        if dim is None:
            flat, local_shape, _ = next(iter(shards.values()))
            return flat.view([int(s) for s in local_shape])
        if not _covers(list(shards), full_shape[dim]):
            raise CheckpointError(f"{self.state_dir}: the saved {key} of {name} does not cover its dim {dim}")
        padded = list(full_shape)
        padded[dim] = max(full_shape[dim], max(stop for _, stop in shards))
        full = torch.zeros(padded, dtype=first[key].dtype)
        for (start, stop), (flat, local_shape, _) in shards.items():
            full.narrow(dim, start, stop - start).copy_(flat.view([int(s) for s in local_shape]))
        return full.narrow(dim, 0, full_shape[dim])

    def read(self, name: str, key: str, param, lo: int, hi: int) -> torch.Tensor | None:
        """Elements [lo, hi) of this rank's flattened local shard of ``key`` for ``param`` (None: not saved)."""
        if name not in self._pieces:
            raise CheckpointError(f"{self.state_dir}: no saved optimizer state for parameter {name}")
        saved_shape = tuple(int(s) for s in self._pieces[name][0]["full_shape"])
        if saved_shape != tuple(param.shard.full_shape):
            raise CheckpointError(f"{self.state_dir}: {name} was saved with shape {saved_shape}, the model's is "
                                  f"{tuple(param.shard.full_shape)}")
        if self._cached_name != name:
            self._cached_name, self._cached = name, {}
        if key not in self._cached:
            self._cached[key] = self._full(name, key)
        full = self._cached[key]
        if full is None:
            return None
        return take_shard(full, param.shard).reshape(-1)[lo:hi]
