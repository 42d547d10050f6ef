"""Run many named checks inside one gloo process group (start-up costs seconds per process here).

``run_checks(world, checks, *args)`` spawns ``world`` processes once; every rank runs the checks in
order. The first failure on any rank stops the whole group (a rank that stops early would leave its peers
waiting in a collective). Returns {check name: None if it passed on every rank, else the error text}.
"""
from __future__ import annotations

import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NOT_RUN = "not run: an earlier check failed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, checks, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for check in checks:
        try:
            check(*args)
        except BaseException:  # noqa: BLE001 - reported to the parent, then the group is torn down
            results.put((rank, check.__name__, traceback.format_exc()))
            results.put((rank, "__done__", None))
            results.close()
            results.join_thread()  # flush the queue before the hard exit
            os._exit(1)
        results.put((rank, check.__name__, None))
    results.put((rank, "__done__", None))
    dist.barrier()
    results.close()
    results.join_thread()
    os._exit(0)


def run_checks(world: int, checks: list, *args, timeout: float = 600.0) -> dict[str, str | None]:
    """Run ``checks`` (module-level functions taking ``*args``) on every rank of a fresh gloo group."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, checks, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    outcome = {c.__name__: {} for c in checks}
    done, deadline = set(), time.time() + timeout
    while len(done) < world and time.time() < deadline:
        try:
            rank, name, error = results.get(timeout=1.0)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) and len(done) < world:
                time.sleep(2.0)  # give the failing rank's message time to arrive, then stop the rest
                while not results.empty():
                    rank, name, error = results.get()
                    if name != "__done__":
                        outcome[name][rank] = error
                break
            continue
        if name == "__done__":
            done.add(rank)
        else:
            outcome[name][rank] = error
    for p in procs:
        p.join(timeout=5.0 if len(done) == world else 0.1)
        if p.is_alive():
            p.terminate()
            p.join()
    any_error = any(e for per_rank in outcome.values() for e in per_rank.values())
    report = {}
    for name, per_rank in outcome.items():
        errors = [f"rank {r}:\n{e}" for r, e in sorted(per_rank.items()) if e]
        if errors:
            report[name] = "\n".join(errors)
        elif len(per_rank) < world:
            report[name] = NOT_RUN if any_error else f"timed out or crashed ({len(per_rank)}/{world} ranks finished)"
        else:
            report[name] = None
    return report


def assert_check(report: dict, name: str) -> None:
    error = report[name]
    assert error is None, f"{name} failed:\n{error}"


_states: dict = {}


def grid(mp: int = 1, sp: int = 1):
    """The ParallelState for (MP, SP) in the running group, built once per layout (collectively)."""
    from llama_rlhf.parallel.state import ParallelState
    if (mp, sp) not in _states:
        _states[(mp, sp)] = ParallelState.build(mp, sp)
    return _states[(mp, sp)]
