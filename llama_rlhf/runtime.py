"""Process-level plumbing shared by the solvers: fail loudly on every rank, logging, seeds, precision."""
from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import traceback

import numpy as np
import torch

from .checkpoint.hf import CheckpointError
from .jsonl import DataError
from .models.config import ConfigError
from .parallel.layout import LayoutError


class UsageError(ValueError):
    """Bad flags or bad input data: the message says what to fix."""


class Stopped(Exception):
    """The run stopped on request (a signal) after saving a checkpoint; ``code`` is the exit status (non-zero)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# Errors whose message is the whole story: shown without a traceback.
EXPECTED_ERRORS = (UsageError, DataError, ConfigError, CheckpointError, LayoutError, FileNotFoundError,
                   FileExistsError)


def launch_rank() -> str:
    """This process's global rank as its launcher (torchrun or mpirun) set it, before any process group exists."""
    return os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))


def rank_label() -> str:
    return f"[rank {launch_rank()}]"


_GLOO_TIMEOUT = re.compile(r"Timed out waiting (\d+)ms for (?:recv|send) operation")
_NCCL_TIMEOUT = re.compile(r"Watchdog caught collective operation timeout|collective operation timeout", re.I)
_PEER_LOST = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe|NCCL communicator was aborted")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _collective_site(exc: BaseException) -> str:
    """'torch.distributed.all_reduce from llama_rlhf/parallel/comm.py:37' for the failed call (best effort)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(_PACKAGE_DIR)]
    torch_fn = next((f.name for f in reversed(frames) if "torch/distributed" in f.filename.replace(os.sep, "/")),
                    None)
    where = ""
    if ours:
        f = ours[-1]
        where = f"{f.name} at {os.path.relpath(f.filename, os.path.dirname(_PACKAGE_DIR))}:{f.lineno}"
    if torch_fn:
        return f"torch.distributed.{torch_fn}" + (f" from {where}" if where else "")
    return where or "unknown site"


def collective_failure(exc: BaseException) -> str | None:
    """One line for a collective that timed out or lost its peer, or None for any other error."""
    text = str(exc)
    gloo = _GLOO_TIMEOUT.search(text)
    if gloo or _NCCL_TIMEOUT.search(text):
        limit = f" {int(gloo.group(1)) / 60000:g}" if gloo else ""
        return (f"a collective ({_collective_site(exc)}) timed out after --distributed_timeout_minutes{limit}: a "
                f"peer stopped answering (hung, stopped or dead; see the other ranks' messages); raise the flag if a "
                f"step legitimately takes longer")
    if _PEER_LOST.search(text):
        return (f"a collective ({_collective_site(exc)}) lost a peer: its process ended (see the first failing "
                f"rank's message)")
    return None


def report(message: str) -> None:
    """One line (or block) to stderr in a single write: print's separate write of the newline let two ranks'
    error lines run together on a shared pipe ("...intact)[rank 0] error: ...")."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def run_main(main) -> None:
    """Run ``main()``; on any error print it with this rank's label and exit non-zero at once.

    ``os._exit`` skips waiting on peers (destroying a process group mid-collective can hang); the launcher
    (torchrun or mpirun) sees the non-zero exit and stops the remaining ranks. A run stopped by a signal
    (``Stopped``) prints where it saved on rank 0 and exits with its code.
    """
    try:
        main()
    except SystemExit as exc:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    except Stopped as exc:
        sys.stdout.flush()
        if launch_rank() == "0":
            report(f"{rank_label()} {exc}")
        sys.stderr.flush()
        os._exit(exc.code)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the process non-zero
        debug = os.environ.get("LLAMA_RLHF_DEBUG")
        collective = None if debug else collective_failure(exc)
        if isinstance(exc, EXPECTED_ERRORS) and not debug:
            report(f"{rank_label()} error: {exc}")
        elif collective:
            report(f"{rank_label()} error: {collective}")
        else:
            report(f"{rank_label()} error: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(dtype: torch.dtype, device: torch.device):
    """Mixed-precision compute in ``dtype`` (fp32 master weights stay fp32); a no-op for 32- and 64-bit types."""
    if dtype.itemsize >= 4:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def log(message: str, ps=None) -> None:
    """Print on global rank 0 only."""
    if ps is None or ps.rank == 0:
        print(message, flush=True)
