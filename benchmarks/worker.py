"""Run a benchmark's competitor in its own process: ``python -m benchmarks.<module> --trl_worker SPEC``, which
writes its result as JSON to spec['out']; the process's wall time is added as ``process_wall_s``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(module: str, spec: dict, what: str) -> dict:
    """Launch ``module``'s --trl_worker with ``spec`` (which names its 'out' file); its result, or an error naming
    ``what`` with the tail of the worker's output."""
    cmd = [sys.executable, "-m", module, "--trl_worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(spec["out"], encoding="utf-8") as f:
        result = json.load(f)
    result["process_wall_s"] = wall
    return result
