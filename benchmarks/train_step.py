"""Training-step throughput and peak memory: this framework vs HF transformers + torch AdamW, same work.

SmolLM2-135M-Instruct, batch 4 x seq 512 (quick: 2 x 256), random tokens, one optimizer step per iteration
(forward, backward, AdamW). Each configuration runs in its own process(es) so peak RSS is its own. At MP=1
transformers and ours run as interleaved pairs (2 rounds; quick: 1), step times pooled per side, and the
speedup is the median of the per-pair ratios. Part of our CPU speed is glibc malloc tuning
(llama_rlhf/parallel/cpu_allocator.py), which any process could adopt: transformers is also run once with the
same settings, and that ratio is reported next to the main one.

    python -m benchmarks.train_step [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _batch(vocab, batch, seq, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return ids, ids.clone()


def worker_hf(model_dir, dtype_name, batch, seq, steps):
    """transformers' forward/backward (its own loss) + torch AdamW on fp32 weights, autocast for bf16."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    ids, labels = _batch(model.config.vocab_size, batch, seq)
    dtype = getattr(torch, dtype_name)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times[1:], float(loss)


def worker_ours(model_dir, dtype_name, batch, seq, steps):
    """This framework's train step (vocab-parallel loss, grad sync, clipping, AdamW) at the launched layout."""
    import torch

    from llama_rlhf.data import Row
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.parallel.cpu_allocator import keep_freed_memory
    from llama_rlhf.parallel.state import init_parallel
    from llama_rlhf.training.distributed_optimizer import DistributedAdamW
    from llama_rlhf.training.sft import train_step
    mp = int(os.environ.get("WORLD_SIZE", "1"))
    ps = init_parallel(mp, 1)
    model = load_pretrained(model_dir, "llama-hf", ps)
    model.train()
    opt = DistributedAdamW(model, ps, stage=0, lr=1e-5)
    keep_freed_memory(ps.device)  # as the training loops do
    ids, _ = _batch(model.cfg.vocab_size, batch, seq)
    rows = [Row(r.tolist(), r[1:].tolist() + [-100], list(range(seq)), [0] * seq) for r in ids]
    trained = batch * (seq - 1)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        result = train_step(model, opt, [rows], trained, ps, getattr(torch, dtype_name), 0, 0.0, False)
        times.append(time.perf_counter() - t)
    return times[1:], result.loss


def run_worker(args):
    if args.impl == "hf_malloc":  # transformers with this framework's malloc settings
        import torch

        from llama_rlhf.parallel.cpu_allocator import keep_freed_memory
        keep_freed_memory(torch.device("cpu"))
    fn = worker_ours if args.impl == "ours" else worker_hf
    times, loss = fn(args.model_dir, args.dtype, args.batch, args.seq, args.steps)
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "times": times, "loss": loss, "peak_rss_mb": peak_rss_mb()}
    print("RESULT " + json.dumps(record), flush=True)


def measure(impl, mp, dtype, model_dir, batch, seq, steps):
    """Run one configuration in fresh processes; returns median step time and the largest per-rank peak RSS."""
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--worker", "--impl", impl, "--dtype", dtype,
           "--model_dir", model_dir, "--batch", str(batch), "--seq", str(seq), "--steps", str(steps)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    if impl == "ours":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(mp), "--master_port",
               str(29700 + mp), "-m"] + cmd[2:]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    records = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    times = sorted(records[0]["times"])
    tokens = batch * seq
    return {"impl": "llama_rlhf" if impl == "ours" else "transformers", "mp": mp, "dtype": dtype,
            "batch": batch, "seq": seq, "step_s_median": statistics.median(times), "step_s_min": times[0],
            "step_s_max": times[-1], "tokens_per_s": tokens / statistics.median(times),
            "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in records), "loss": records[0]["loss"],
            "step_times": times}


def pooled(runs: list[dict]) -> dict:
    """One row from several runs of the same configuration: their step times pooled, the worst peak RSS."""
    times = sorted(t for r in runs for t in r["step_times"])
    tokens = runs[0]["batch"] * runs[0]["seq"]
    return dict(runs[0], step_s_median=statistics.median(times), step_s_min=times[0], step_s_max=times[-1],
                tokens_per_s=tokens / statistics.median(times), step_times=times, runs=len(runs),
                peak_rss_mb_per_rank=max(r["peak_rss_mb_per_rank"] for r in runs))


def run(quick: bool = False) -> list[dict]:
    sys.path.insert(0, ROOT)
    from tools.fetch_smollm2 import ensure_smollm2
    model_dir = ensure_smollm2()
    batch, seq, steps = (2, 256, 2) if quick else (4, 512, 3)
    rounds = 1 if quick else 2
    from benchmarks.load import mp_refusal
    rows = []
    for dtype in ("float32", "bfloat16"):
        # MP=1 against transformers in interleaved pairs (a shared machine's load drifts between runs); the
        # speedup is the median of the per-pair ratios
        pairs = [(measure("hf", 1, dtype, model_dir, batch, seq, steps),
                  measure("ours", 1, dtype, model_dir, batch, seq, steps)) for _ in range(rounds)]
        hf = pooled([h for h, _ in pairs])
        rows.append(hf)
        for mp in (1, 2, 3) if dtype == "float32" or not quick else (1,):
            refusal = mp_refusal(model_dir, mp)
            if refusal:  # e.g. SmolLM2's 9 heads cannot split over MP=2: say so, do not skip silently
                rows.append({"impl": "llama_rlhf", "mp": mp, "dtype": dtype, "batch": batch, "seq": seq,
                             "status": "refused", "reason": refusal})
                continue
            if mp == 1:
                ours = pooled([o for _, o in pairs])
                ours["speedup_per_pair"] = [o["tokens_per_s"] / h["tokens_per_s"] for h, o in pairs]
                ours["speedup_vs_transformers"] = statistics.median(ours["speedup_per_pair"])
                same_malloc = measure("hf_malloc", 1, dtype, model_dir, batch, seq, steps)
                ours["transformers_same_malloc"] = {k: same_malloc[k] for k in (
                    "tokens_per_s", "step_s_median", "step_s_min", "step_s_max", "peak_rss_mb_per_rank")}
                ours["speedup_vs_transformers_same_malloc"] = ours["tokens_per_s"] / same_malloc["tokens_per_s"]
            else:
                ours = measure("ours", mp, dtype, model_dir, batch, seq, steps)
                ours["speedup_vs_transformers"] = ours["tokens_per_s"] / hf["tokens_per_s"]
            ours["rss_ratio_vs_transformers"] = ours["peak_rss_mb_per_rank"] / hf["peak_rss_mb_per_rank"]
            rows.append(ours)
    return rows


def print_table(rows):
    print(f"{'impl':<13}{'MP':>3} {'dtype':<9}{'tok/s':>9}{'step s (min-max)':>22}{'peak RSS MB':>13}{'vs HF':>8}")
    for r in rows:
        if r.get("status") == "refused":
            print(f"{r['impl']:<13}{r['mp']:>3} {r['dtype']:<9}refused: {r['reason']}")
            continue
        ratio = f"{r['speedup_vs_transformers']:.2f}x" if "speedup_vs_transformers" in r else ""
        span = f"{r['step_s_median']:.2f} ({r['step_s_min']:.2f}-{r['step_s_max']:.2f})"
        print(f"{r['impl']:<13}{r['mp']:>3} {r['dtype']:<9}{r['tokens_per_s']:>9.0f}{span:>22}"
              f"{r['peak_rss_mb_per_rank']:>13.0f}{ratio:>8}")
        same = r.get("transformers_same_malloc")
        if same:
            span = f"{same['step_s_median']:.2f} ({same['step_s_min']:.2f}-{same['step_s_max']:.2f})"
            print(f"  (transformers with our malloc settings: {same['tokens_per_s']:.0f} tok/s, {span} s; "
                  f"ours {r['speedup_vs_transformers_same_malloc']:.2f}x)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("hf", "hf_malloc", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args)
    else:
        print_table(run(args.quick))


if __name__ == "__main__":
    main()
