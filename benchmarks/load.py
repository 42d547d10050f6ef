"""Checkpoint load: wall time and peak resident memory per rank to load SmolLM2-135M at MP = 1, 2, 3.

Every run is a fresh ``torchrun`` (one process per MP rank, fp32 weights). Each rank starts the process group,
notes its resident set (VmRSS: torch + llama_rlhf imported, ~220 MB of it torch alone) and resets its peak
(VmHWM, via /proc/self/clear_refs), calls ``load_pretrained``, then reads every weight once (transformers
memory-maps safetensors, so its weights become resident only when touched; ours are resident after the load).
Reported per rank (worst rank): absolute peak RSS over the process's life, and the increase of the peak over
the pre-load baseline, both after that read (and right after the load call); wall time is the slowest rank's
``load_pretrained``. transformers' ``from_pretrained`` (one process) is the reference.
MP=2 cannot split SmolLM2's 9 heads: it is reported as refused, with the framework's own error message.

    python -m benchmarks.load [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status_mb(field: str) -> float:
    """A VmRSS / VmHWM line of /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> float:
    """Reset VmHWM to the current RSS; returns that RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")


def worker(impl: str, model_dir: str) -> None:
    stages = {"python": status_mb("VmRSS")}
    import torch
    stages["torch imported"] = status_mb("VmRSS")
    if impl == "hf":
        from transformers import AutoModelForCausalLM
        stages["transformers imported"] = status_mb("VmRSS")
        load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # noqa: E731
    else:
        from llama_rlhf.models.pretrained import load_pretrained
        from llama_rlhf.parallel.state import init_parallel
        stages["llama_rlhf imported"] = status_mb("VmRSS")
        ps = init_parallel(int(os.environ.get("WORLD_SIZE", "1")), 1)
        stages["process group started"] = status_mb("VmRSS")
        load = lambda: load_pretrained(model_dir, "llama-hf", ps)  # noqa: E731
    hwm_before = status_mb("VmHWM")
    base = reset_peak()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    with torch.no_grad():  # read every weight: memory-mapped weights become resident only when touched
        params = sum(p.numel() for p in model.parameters())
        checksum = sum(float(p.sum()) for p in model.parameters())  # no copies
    touched = status_mb("VmHWM")
    record = {"rank": int(os.environ.get("RANK", "0")), "load_s": seconds, "baseline_mb": base,
              "peak_mb": max(peak, hwm_before), "increase_mb": peak - base,
              "touched_peak_mb": max(touched, hwm_before), "touched_increase_mb": touched - base,
              "rss_after_touch_mb": status_mb("VmRSS"), "local_params": params, "checksum": checksum,
              "stages_mb": stages}
    print("RESULT " + json.dumps(record), flush=True)
    if impl == "ours" and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(impl: str, mp: int, model_dir: str) -> list[dict]:
    """One fresh run; returns every rank's record."""
    cmd = ["-m", "benchmarks.load", "--worker", impl, "--model_dir", model_dir]
    if impl == "ours":
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(mp), "--master_port", str(_free_port())] + cmd
    proc = subprocess.run([sys.executable] + cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"load benchmark ({impl}, MP={mp}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if len(records) != mp:
        raise RuntimeError(f"load benchmark ({impl}, MP={mp}): {len(records)} rank results, expected {mp}")
    return records


def mp_refusal(model_dir: str, mp: int) -> str | None:
    """The framework's own error for an impossible layout (e.g. 9 heads over MP=2), or None if it can split."""
    from llama_rlhf.models.config import ConfigError
    from llama_rlhf.models.families import get_family
    cfg = get_family("llama-hf").read_config(model_dir, None)
    try:
        cfg.check_model_parallel(mp)
    except ConfigError as exc:
        return str(exc)
    return None


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(impl: str, mp: int, model_dir: str, repeats: int) -> dict:
    runs = [launch(impl, mp, model_dir) for _ in range(repeats)]
    worst = lambda key: [max(r[key] for r in ranks) for ranks in runs]  # noqa: E731 - the worst rank of each run
    return {"benchmark": "load", "impl": "transformers" if impl == "hf" else "llama_rlhf", "mp": mp,
            "status": "ok", "repeats": repeats, "load_s": _stats(worst("load_s")),
            "peak_rss_mb_per_rank": _stats(worst("touched_peak_mb")),
            "increase_mb_per_rank": _stats(worst("touched_increase_mb")),
            "peak_rss_at_load_mb_per_rank": _stats(worst("peak_mb")),
            "increase_at_load_mb_per_rank": _stats(worst("increase_mb")),
            "baseline_mb_per_rank": _stats(worst("baseline_mb")), "rss_stages_mb_rank0": runs[0][0]["stages_mb"],
            "local_params_per_rank": max(r["local_params"] for r in runs[0])}


def run(quick: bool = False) -> list[dict]:
    """Rows: transformers (reference), ours at MP 1, 2 (refused for SmolLM2), 3. Peak figures are taken after
    every weight has been read once (ready to run); the ``*_at_load`` figures stop right after the load call."""
    sys.path.insert(0, ROOT)
    from tools.fetch_smollm2 import ensure_smollm2
    model_dir = ensure_smollm2()
    repeats = 2 if quick else 3
    rows = [measure("hf", 1, model_dir, repeats)]
    for mp in (1, 2, 3):
        refusal = mp_refusal(model_dir, mp)
        if refusal:
            rows.append({"benchmark": "load", "impl": "llama_rlhf", "mp": mp, "status": "refused", "reason": refusal})
        else:
            rows.append(measure("ours", mp, model_dir, repeats))
    ours = {r["mp"]: r for r in rows if r["impl"] == "llama_rlhf" and r["status"] == "ok"}
    hf = rows[0]
    for r in ours.values():
        med = lambda row, key: row[key]["median"]  # noqa: E731
        r["peak_ratio_vs_mp1"] = med(r, "peak_rss_mb_per_rank") / med(ours[1], "peak_rss_mb_per_rank")
        r["increase_ratio_vs_mp1"] = med(r, "increase_mb_per_rank") / med(ours[1], "increase_mb_per_rank")
        r["peak_ratio_vs_transformers"] = med(r, "peak_rss_mb_per_rank") / med(hf, "peak_rss_mb_per_rank")
        r["load_speedup_vs_transformers"] = med(hf, "load_s") / med(r, "load_s")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'impl':<13}{'MP':>3} {'load s (min-max)':>20} {'peak RSS MB/rank':>22} {'increase MB/rank':>22} "
             f"{'peak/MP1':>9} {'incr/MP1':>9}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['impl']:<13}{r['mp']:>3} refused: {r['reason']}")
            continue
        span = lambda s, f: f"{s['median']:{f}} ({s['min']:{f}}-{s['max']:{f}})"  # noqa: E731
        ratios = (f"{r['peak_ratio_vs_mp1']:>9.2f} {r['increase_ratio_vs_mp1']:>9.2f}"
                  if "peak_ratio_vs_mp1" in r else "")
        lines.append(f"{r['impl']:<13}{r['mp']:>3} {span(r['load_s'], '.2f'):>20} "
                     f"{span(r['peak_rss_mb_per_rank'], '.0f'):>22} {span(r['increase_mb_per_rank'], '.0f'):>22} "
                     + ratios)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 runs per configuration instead of 3")
    p.add_argument("--worker", choices=("hf", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir)
    else:
        print(format_table(run(args.quick)))


if __name__ == "__main__":
    main()
