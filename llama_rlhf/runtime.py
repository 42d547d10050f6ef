"""Process-level plumbing shared by the solvers: fail loudly on every rank, logging, seeds, precision."""
from __future__ import annotations

import contextlib
import os
import random
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


# Errors whose message is the whole story: shown without a traceback.
EXPECTED_ERRORS = (UsageError, DataError, ConfigError, CheckpointError, LayoutError, FileNotFoundError,
                   FileExistsError)


def launch_rank() -> str:
    """This process's global rank as its launcher (torchrun or mpirun) set it, before any process group exists."""
    return os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))


def rank_label() -> str:
    return f"[rank {launch_rank()}]"


def run_main(main) -> None:
    """Run ``main()``; on any error print it with this rank's label and exit non-zero at once.

    ``os._exit`` skips waiting on peers (destroying a process group mid-collective can hang); the launcher
    (torchrun or mpirun) sees the non-zero exit and stops the remaining ranks.
    """
    try:
        main()
    except SystemExit as exc:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the process non-zero
        if isinstance(exc, EXPECTED_ERRORS) and not os.environ.get("LLAMA_RLHF_DEBUG"):
            print(f"{rank_label()} error: {exc}", file=sys.stderr, flush=True)
        else:
            print(f"{rank_label()} error: {type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
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
