"""Model FLOPs utilisation: the training step's achieved FLOP/s over this machine's measured matmul FLOP/s.

Peak: large square GEMMs (torch.mm, 1024..4096) in fp32 and bf16, in a fresh process with as many torch
threads as the MP=1 training process uses (every core this process may run on). The peak is the best single
GEMM observed (a shared machine only ever slows a GEMM down, so the best is the fairest denominator, and it
makes MFU conservative); the median and min of the best size are reported next to it, and so is the rate of
the training step's own GEMM shapes (one layer's projections and the LM head at batch x seq tokens), which
tells how much of a shortfall is GEMM shape and how much is everything that is not a GEMM.

Model FLOPs of one training step (forward + backward), the PaLM convention (Chowdhery et al. 2022, app. B):
    tokens x (6 N + 12 L H D S)
N = parameters used in matmuls (every linear weight of every layer plus the LM head; tied embeddings counted
once, as the head; norms left out), L layers, H query heads of size D, S the sequence length. The attention
term counts the full S x S score matrix, not halved for the causal mask. Recomputation is not counted.

MFU = model FLOPs / median step time / peak of the step's compute dtype. Rows at MP > 1 use the same
whole-machine peak (their ranks share this machine's cores).

    python -m benchmarks.mfu [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def gemm_rates(dtype_name: str, shapes: list[list[int]], repeats: int) -> list[float]:
    """GFLOP/s of running every [m, k] x [k, n] GEMM of ``shapes`` once, per repeat (after one warm-up)."""
    import torch
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    operands = [(torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype),
                 torch.empty(m, n, dtype=dtype)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    rates = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        for a, b, c in operands:
            torch.mm(a, b, out=c)
        if i:  # the first pass warms kernels, the thread pool and the output pages
            rates.append(flops / (time.perf_counter() - start) / 1e9)
    return rates


def gemm_worker(dtype_name: str, threads: int, sizes: list[int], repeats: int,
                model_shapes: list[list[int]] | None = None) -> dict:
    """{size: [GFLOP/s per repeat]} for square [n, n] GEMMs of ``dtype_name`` (and "model": the same for the
    training step's own GEMM shapes, when given)."""
    import torch
    torch.set_num_threads(threads)
    out = {n: gemm_rates(dtype_name, [[n, n, n]], repeats) for n in sizes}
    if model_shapes:
        out["model"] = gemm_rates(dtype_name, model_shapes, repeats)
    return out


def model_gemm_shapes(cfg, tokens: int) -> list[list[int]]:
    """The forward GEMMs [m, k, n] of one decoder layer and the LM head for ``tokens`` tokens (backward runs the
    same sizes transposed)."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    return [[tokens, h, q], [tokens, h, kv], [tokens, h, kv], [tokens, q, h], [tokens, h, f], [tokens, h, f],
            [tokens, f, h], [tokens, h, cfg.vocab_size]]


def measure_peak(dtype: str, threads: int, quick: bool, model_shapes: list[list[int]] | None = None) -> dict:
    """Matmul peak of ``dtype`` measured in a fresh process; returns one result row (with the rate of the
    model's own GEMM shapes as ``model_gemm_gflops`` when ``model_shapes`` is given)."""
    sizes, repeats = ([1024, 2048], 5) if quick else ([1024, 2048, 4096], 7)
    spec = json.dumps([dtype, threads, sizes, repeats, model_shapes])
    cmd = [sys.executable, "-m", "benchmarks.mfu", "--gemm_worker", spec]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"GEMM peak ({dtype}) failed:\n{proc.stderr[-3000:]}")
    rates = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    summary = lambda r: {"median": statistics.median(r), "min": min(r), "max": max(r), "n": len(r)}  # noqa: E731
    model = rates.pop("model", None)
    per_size = {int(n): summary(r) for n, r in rates.items()}
    best = max(per_size, key=lambda n: per_size[n]["max"])
    row = {"benchmark": "mfu", "kind": "matmul_peak", "dtype": dtype, "threads": threads,
           "peak_gflops": per_size[best]["max"], "gflops": per_size[best], "best_size": best,
           "per_size_gflops": per_size}
    if model:
        row["model_gemm_gflops"] = summary(model)
        row["model_gemm_shapes"] = model_shapes
    return row


def matmul_params(cfg) -> int:
    """Parameters that take part in matmuls: every layer's linear weights plus the LM head."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attention = h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2  # q, o; k, v
    return cfg.num_layers * (attention + 3 * h * f) + cfg.vocab_size * h


def train_flops_per_token(cfg, seq: int) -> float:
    """6 N + 12 L H D S (forward + backward, PaLM convention, attention not halved for causality)."""
    return 6 * matmul_params(cfg) + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def mfu_rows(train_rows: list[dict], peaks: dict, cfg) -> list[dict]:
    """One MFU row per measured training configuration (rows from benchmarks.train_step)."""
    out = []
    for r in train_rows:
        if r.get("status", "ok") != "ok" or r["dtype"] not in peaks:
            continue
        flops = r["batch"] * r["seq"] * train_flops_per_token(cfg, r["seq"])
        achieved = flops / r["step_s_median"] / 1e9
        peak = peaks[r["dtype"]]["peak_gflops"]
        out.append({"benchmark": "mfu", "kind": "train_step", "impl": r["impl"], "mp": r["mp"], "dtype": r["dtype"],
                    "batch": r["batch"], "seq": r["seq"], "model_gflop_per_step": flops / 1e9,
                    "achieved_gflops": achieved,
                    "achieved_gflops_range": [flops / r["step_s_max"] / 1e9, flops / r["step_s_min"] / 1e9],
                    "peak_gflops": peak, "mfu": achieved / peak,
                    "flops_formula": "tokens x (6 N + 12 L H D S), N = matmul params "
                                     f"{matmul_params(cfg) / 1e6:.1f}M"})
    return out


def run(quick: bool = False, train_rows: list[dict] | None = None) -> list[dict]:
    """Peaks for fp32 and bf16, then MFU of ``train_rows`` (benchmarks.train_step results from the same run);
    without them, measures our and transformers' MP=1 training steps here."""
    sys.path.insert(0, ROOT)
    from benchmarks import train_step
    from llama_rlhf.models.families import get_family
    from tools.fetch_smollm2 import ensure_smollm2
    model_dir = ensure_smollm2()
    cfg = get_family("llama-hf").read_config(model_dir, None)
    threads = machine_threads()
    batch, seq, steps = (2, 256, 2) if quick else (4, 512, 3)
    if train_rows:
        batch, seq = train_rows[0]["batch"], train_rows[0]["seq"]
    shapes = model_gemm_shapes(cfg, batch * seq)
    peaks = {dtype: measure_peak(dtype, threads, quick, shapes) for dtype in ("float32", "bfloat16")}
    if train_rows is None:
        train_rows = [train_step.measure(impl, 1, dtype, model_dir, batch, seq, steps)
                      for dtype in ("float32", "bfloat16") for impl in ("ours", "hf")]
    return list(peaks.values()) + mfu_rows(train_rows, peaks, cfg)


def format_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["kind"] == "matmul_peak":
            g = r["gflops"]
            lines.append(f"matmul peak {r['dtype']:<9} {r['threads']} threads, n={r['best_size']}: "
                         f"{r['peak_gflops']:.1f} GFLOP/s (median {g['median']:.1f}, min {g['min']:.1f})")
            if "model_gemm_gflops" in r:
                m = r["model_gemm_gflops"]
                lines.append(f"  the training step's own GEMM shapes ({r['model_gemm_shapes'][0][0]} tokens): "
                             f"{m['median']:.1f} GFLOP/s ({m['min']:.1f}-{m['max']:.1f})")
    lines.append(f"{'impl':<13}{'MP':>3} {'dtype':<9}{'GFLOP/step':>11}{'achieved GFLOP/s':>18}{'peak':>8}{'MFU':>7}")
    for r in rows:
        if r["kind"] == "train_step":
            lines.append(f"{r['impl']:<13}{r['mp']:>3} {r['dtype']:<9}{r['model_gflop_per_step']:>11.0f}"
                         f"{r['achieved_gflops']:>18.1f}{r['peak_gflops']:>8.1f}{100 * r['mfu']:>6.1f}%")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller GEMMs and the quick training configuration")
    p.add_argument("--gemm_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gemm_worker:
        print("RESULT " + json.dumps(gemm_worker(*json.loads(args.gemm_worker))), flush=True)
        return
    print(format_table(run(args.quick)))


if __name__ == "__main__":
    main()
