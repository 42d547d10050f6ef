"""glibc malloc settings for CPU training: keep freed memory in the process instead of returning it.

By default glibc serves every large block (activations, logits, gradients) with a fresh ``mmap`` and gives it
back with ``munmap`` when freed, so each training step page-faults its whole working set in again; on a
2-core VM that is about a sixth of a SmolLM2 step. With mmap disabled and trimming off, freed blocks are reused
from the heap (the advice Intel gives for PyTorch on CPU, usually via tcmalloc or jemalloc). The resident set
then stays at its high-water mark, so the training loops switch it on only once the model is loaded (the
load's freed temporaries would otherwise stay resident). LLAMA_RLHF_MALLOC_TUNING=0 leaves glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory(device) -> bool:
    """On the CPU, turn off glibc's mmap for large blocks and heap trimming, once per process; True when applied."""
    global _applied
    if _applied or device.type != "cpu" or os.environ.get("LLAMA_RLHF_MALLOC_TUNING", "1") == "0":
        return _applied
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))  # -1: never trim
    return _applied
