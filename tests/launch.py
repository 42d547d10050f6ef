"""Launching the solvers as real processes: with torchrun, or one plain process per rank.

``launch_ranks`` starts every rank itself (RANK/WORLD_SIZE/MASTER_* set, no torchrun agent), so a test can
see each rank's own exit code and message: a deterministic error must end every rank, non-zero, quickly.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from tests.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RankResult:
    returncode: int
    stdout: str
    stderr: str


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def torchrun(script: str, args: list[str], nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc script args`` from the repo root; returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), os.path.join(ROOT, script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def launch_ranks(script: str, args: list[str], world: int, timeout: float = 120) -> list[RankResult]:
    """Start ``world`` processes of ``script`` as ranks 0..world-1 and wait for all of them."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = _env({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{script} {' '.join(args)}: rank did not exit within {timeout}s (hang)")
        results.append(RankResult(p.returncode, out, err))
    return results
