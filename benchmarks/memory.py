"""What a rank holds with the distributed optimizer: stage 0 vs stage 1, fp32 and bf16, at DP = 2 and 4.

SmolLM2-135M-Instruct, one SFT step per iteration (forward, backward, gradient reduction, clipping, AdamW) on
random tokens, batch 1 x 256 per rank (quick: world 2 only, 1 x 128), in fresh torchrun processes so each
configuration's peak RSS is its own. Per configuration: peak RSS per rank (max over ranks), median step time,
tokens/s (all ranks' tokens), and the measured bytes of parameters + gradients + optimizer state per local
parameter next to the theory (stage 0: 16; stage 1: 4 + 4 + 8/N fp32, 2 + 4 + 12/N bf16; N = DP).

Also the bf16 step's MFU at world 1 (one process, batch 4 x 512 as benchmarks/train_step.py), before (stage 0:
fp32 parameters under bf16 autocast, which casts every weight each step) and after (stage 1: bf16 parameters,
fp32 masters in the optimizer), against the measured bf16 matmul peak (benchmarks/mfu.py).

    python -m benchmarks.memory [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def theory_bytes(stage: int, dtype: str, n: int) -> float:
    if stage == 0:
        return 16.0
    return (4 + 4 + 8 / n) if dtype == "float32" else (2 + 4 + 12 / n)


def worker(model_dir: str, stage: int, dtype_name: str, batch: int, seq: int, steps: int, out_dir: str) -> None:
    import torch

    from benchmarks.train_step import _batch, peak_rss_mb
    from llama_rlhf.data import Row
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.parallel.cpu_allocator import keep_freed_memory
    from llama_rlhf.parallel.state import init_parallel
    from llama_rlhf.training.distributed_optimizer import DistributedAdamW
    from llama_rlhf.training.setup import parameter_dtype
    from llama_rlhf.training.sft import train_step
    ps = init_parallel(1, 1)
    dtype = getattr(torch, dtype_name)
    model = load_pretrained(model_dir, "llama-hf", ps)
    model.train()
    opt = DistributedAdamW(model, ps, stage=stage, lr=1e-5, param_dtype=parameter_dtype(stage, dtype))
    keep_freed_memory(ps.device)
    ids, _ = _batch(model.cfg.vocab_size, batch, seq, seed=ps.rank)
    rows = [Row(r.tolist(), r[1:].tolist() + [-100], list(range(seq)), [0] * seq) for r in ids]
    trained = batch * (seq - 1) * ps.world_size
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        result = train_step(model, opt, [rows], trained, ps, dtype, 0, 1.0, False)
        times.append(time.perf_counter() - t)
    held = opt.memory_breakdown(model)
    with open(os.path.join(out_dir, f"rank{ps.rank}.json"), "w") as f:  # not stdout: ranks' lines interleave
        json.dump({"rank": ps.rank, "times": times[1:], "loss": result.loss, "peak_rss_mb": peak_rss_mb(),
                   "held": held}, f)


def measure(model_dir: str, world: int, stage: int, dtype: str, batch: int, seq: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(29740 + world + 10 * stage), "-m", "benchmarks.memory", "--worker",
               json.dumps([model_dir, stage, dtype, batch, seq, steps, out_dir])]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker (world {world}, stage {stage}, {dtype}) failed:\n{proc.stderr[-3000:]}")
        records = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                records.append(json.load(f))
    times = sorted(t for r in records[:1] for t in r["times"])
    held = records[0]["held"]
    per_param = sum(held[k] for k in ("parameters", "gradients", "masters", "moments")) / held["trainable_parameters"]
    median = statistics.median(times)
    return {"benchmark": "memory", "world": world, "dp": world, "zero_stage": stage, "dtype": dtype,
            "batch_per_rank": batch, "seq": seq, "step_s_median": median, "step_s_min": times[0],
            "step_s_max": times[-1], "tokens_per_s": world * batch * seq / median,
            "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in records),
            "bytes_per_param": per_param, "bytes_per_param_theory": theory_bytes(stage, dtype, world),
            "held_bytes_rank0": held, "loss": records[0]["loss"]}


def run(quick: bool = False) -> list[dict]:
    sys.path.insert(0, ROOT)
    from benchmarks import mfu
    from llama_rlhf.models.families import get_family
    from tools.fetch_smollm2 import ensure_smollm2
    model_dir = ensure_smollm2()
    batch, seq, steps = (1, 128, 2) if quick else (1, 256, 3)
    rows = [measure(model_dir, world, stage, dtype, batch, seq, steps)
            for world in ((2,) if quick else (2, 4)) for dtype in ("float32", "bfloat16") for stage in (0, 1)]
    for r in rows:
        if r["zero_stage"] == 1:
            base = next(b for b in rows if b["world"] == r["world"] and b["dtype"] == r["dtype"]
                        and b["zero_stage"] == 0)
            r["step_time_vs_stage0"] = r["step_s_median"] / base["step_s_median"]
            r["peak_rss_vs_stage0"] = r["peak_rss_mb_per_rank"] / base["peak_rss_mb_per_rank"]
    # MFU of the bf16 step at world 1, before (autocast over fp32 parameters) and after (bf16 parameters)
    cfg = get_family("llama-hf").read_config(model_dir, None)
    b1, s1 = (2, 256) if quick else (4, 512)
    peak = mfu.measure_peak("bfloat16", mfu.machine_threads(), quick)
    for stage in (0, 1):
        r = measure(model_dir, 1, stage, "bfloat16", b1, s1, steps)
        flops = b1 * s1 * mfu.train_flops_per_token(cfg, s1)
        r.update(kind="mfu", peak_gflops=peak["peak_gflops"], achieved_gflops=flops / r["step_s_median"] / 1e9)
        r["mfu"] = r["achieved_gflops"] / peak["peak_gflops"]
        rows.append(r)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'world':>5} {'stage':>5} {'dtype':<9}{'tok/s':>8}{'step s':>8}{'vs st.0':>8}{'peak MB/rank':>13}"
             f"{'B/param':>9}{'theory':>8}"]
    for r in rows:
        if r.get("kind") == "mfu":
            continue
        ratio = f"{r['step_time_vs_stage0']:.2f}x" if "step_time_vs_stage0" in r else ""
        lines.append(f"{r['world']:>5} {r['zero_stage']:>5} {r['dtype']:<9}{r['tokens_per_s']:>8.0f}"
                     f"{r['step_s_median']:>8.2f}{ratio:>8}{r['peak_rss_mb_per_rank']:>13.0f}"
                     f"{r['bytes_per_param']:>9.2f}{r['bytes_per_param_theory']:>8.2f}")
    for r in rows:
        if r.get("kind") == "mfu":
            lines.append(f"bf16 step, world 1, stage {r['zero_stage']}: {r['achieved_gflops']:.1f} GFLOP/s of "
                         f"{r['peak_gflops']:.1f} peak = MFU {100 * r['mfu']:.1f}% ({r['step_s_median']:.2f} s/step)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*json.loads(args.worker))
        return
    print(format_table(run(args.quick)))


if __name__ == "__main__":
    main()
