"""Checkpoint writes that fail in one line (the path, the bytes, the OS error), and the free space they need."""
from __future__ import annotations

import contextlib
import os
import shutil

from safetensors import SafetensorError

from .hf import CheckpointError


class WriteError(CheckpointError):
    """A checkpoint file could not be written (disk full, quota, permissions...)."""


def _os_error(exc: BaseException) -> OSError | None:
    """The OS error behind a failed write: the exception itself, or the one torch.save wrapped."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def writing(path: str, nbytes: int):
    """Turn a failure while writing ``path`` (about ``nbytes`` bytes) into a WriteError naming both and the OS error.

    torch.save reports a failed write as ``RuntimeError: ... unexpected pos``: give it an open file, so the OS
    error is its context."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError, SafetensorError) as exc:
        reason = _os_error(exc)
        text = f"{reason.strerror or reason} (errno {reason.errno})" if reason is not None else str(exc)
        raise WriteError(f"could not write {path} ({nbytes:,} bytes): {text}") from exc


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem of ``path``; LLAMA_RLHF_FREE_BYTES pretends another number (tests)."""
    pretend = os.environ.get("LLAMA_RLHF_FREE_BYTES")
    return int(pretend) if pretend else shutil.disk_usage(path).free


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB ({int(nbytes):,} bytes)"
