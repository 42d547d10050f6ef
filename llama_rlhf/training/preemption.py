"""Stop on request: SIGTERM, SIGINT and SIGUSR1 make every rank finish its optimizer step, save and exit non-zero.

The handler only records the signal. After each step every rank all-reduces (MAX) the signal it got, so all ranks
stop after the same step even when the signal reached only some of them (one node, one process). They save a
checkpoint and exit with 128 + the signal's number, saying where they saved and how to resume. A second signal ends
the process at once, without saving; a repeat within ``REPEAT_WINDOW_S`` of the first counts as the same request
(a launcher forwarding a signal its workers already got: torchrun forwards the Ctrl-C the terminal sent them all).
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from ..runtime import rank_label

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_WINDOW_S = 2.0


def _say(line: str) -> None:
    os.write(2, (line + "\n").encode())  # no buffered stream: a handler may run inside another print


class StopRequests:
    """Records the first stop signal; ``agreed`` tells every rank whether any rank got one."""

    def __init__(self):
        self.signum = 0
        self._first_at = 0.0

    def install(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first_at = signum, now
            if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node
                _say(f"{rank_label()} {name}: finishing this step, then saving a checkpoint "
                     f"(send it again to stop at once, without saving)")
        elif now - self._first_at > REPEAT_WINDOW_S:
            _say(f"{rank_label()} {name} again: stopping now, without saving")
            os._exit(128 + signum)

    def agreed(self, ps) -> int:
        """The largest signal number any rank got, 0 when none (a collective over every rank)."""
        flag = torch.tensor([self.signum], dtype=torch.int64, device=ps.device)
        if ps.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def stop_message(signum: int, step: int, last_step: int, path: str) -> str:
    return (f"stopped by {signal.Signals(signum).name} after step {step}/{last_step}: saved {path}; to continue, "
            f"run the same command with --resume true")
