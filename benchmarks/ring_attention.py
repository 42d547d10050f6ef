"""Ring attention: forward+backward time and per-rank peak memory at SP = 1, 2, 4 on one long sequence.

Causal attention over 8192 tokens (quick: 2048), batch 1, 4 query heads / 2 KV heads (GQA), head size 32,
fp32, through ``ring_attention`` with the CPU flash block kernel; the same with the math kernel (which
materialises each block's scores) at half the length; and PyTorch SDPA on the whole sequence as the
single-process baseline. Each configuration runs in fresh processes (one per SP rank, gloo), the CPU cores
shared out among them.

Memory: each rank resets its peak resident set (VmHWM) to its current RSS through /proc/self/clear_refs after
start-up (imports, process group) and before creating its inputs; the figure is VmHWM after the last step minus
that RSS: everything the rank held at its worst moment for this attention (its q/k/v/dout chunks, the ring's
buffers, outputs and gradients), whatever the allocator kept. No tracemalloc.

    python -m benchmarks.ring_attention [--quick]
"""
from __future__ import annotations

import argparse
import os
import queue
import socket
import statistics
import time

BATCH, Q_HEADS, KV_HEADS, HEAD_DIM = 1, 4, 2, 32


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS; returns that RSS in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _worker(rank, world, port, seq, kernel, iters, results):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world))
    group = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.group.WORLD
    from llama_rlhf.parallel.ring_attention import ring_attention

    scale = HEAD_DIM ** -0.5

    def inputs(local):
        g = torch.Generator().manual_seed(rank)
        q = torch.randn(BATCH, local, Q_HEADS, HEAD_DIM, generator=g).requires_grad_()
        k, v = (torch.randn(BATCH, local, KV_HEADS, HEAD_DIM, generator=g).requires_grad_() for _ in range(2))
        return q, k, v, torch.randn(BATCH, local, Q_HEADS, HEAD_DIM, generator=g)

    def step(q, k, v, dout):
        if kernel == "sdpa":
            rep = Q_HEADS // KV_HEADS
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                                 v.repeat_interleave(rep, 2).transpose(1, 2), is_causal=True,
                                                 scale=scale).transpose(1, 2)
        else:
            out = ring_attention(q, k, v, group, scale, kernel=kernel)
        out.backward(dout)
        for t in (q, k, v):
            t.grad = None

    step(*inputs(64))  # load every kernel's code and thread pools before the memory baseline
    base = _reset_peak_rss()
    tensors = inputs(seq // world)
    step(*tensors)  # warm-up at full size
    times = []
    for _ in range(iters):
        if group is not None:
            dist.barrier()
        start = time.perf_counter()
        step(*tensors)
        if group is not None:
            dist.barrier()
        times.append(time.perf_counter() - start)
    results.put((rank, statistics.median(times), _status_kb("VmHWM") - base))
    if group is not None:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(sp: int, seq: int, kernel: str, iters: int) -> dict:
    """Spawn ``sp`` ranks, run ``iters`` timed forward+backward steps, return one result row."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, sp, port, seq, kernel, iters, results)) for r in range(sp)]
    for p in procs:
        p.start()
    rows = []
    try:
        while len(rows) < sp:
            try:
                rows.append(results.get(timeout=5.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a benchmark rank failed (SP={sp}, kernel={kernel})") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return {
        "config": "sdpa (whole sequence, 1 process)" if kernel == "sdpa" else f"ring {kernel} SP={sp}",
        "kernel": kernel, "sp": sp, "seq_len_tokens": seq, "tokens_per_rank": seq // sp, "batch": BATCH,
        "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
        "fwd_bwd_ms": 1000 * max(r[1] for r in rows),  # the slowest rank's median step
        "peak_mb_per_rank": max(r[2] for r in rows) / 1024,  # the worst rank's peak growth over its start-up RSS
        "memory_method": "VmHWM (reset via /proc/self/clear_refs after start-up) minus RSS at the reset",
        "cpu_cores": os.cpu_count(),
    }


def run(quick: bool = False) -> list[dict]:
    """One dict per configuration: SDPA baseline, ring (CPU flash) at SP 1/2/4, ring (math) at SP 1/2/4."""
    seq = 2048 if quick else 8192
    iters = 2 if quick else 3
    out = [measure(1, seq, "sdpa", iters)]
    out += [measure(sp, seq, "cpu_flash", iters) for sp in (1, 2, 4)]
    out += [measure(sp, seq // 2, "math", iters) for sp in (1, 2, 4)]
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'configuration':34} {'tokens':>7} {'tokens/rank':>11} {'fwd+bwd ms':>11} {'peak MB/rank':>13}"]
    for r in rows:
        lines.append(f"{r['config']:34} {r['seq_len_tokens']:>7} {r['tokens_per_rank']:>11} "
                     f"{r['fwd_bwd_ms']:>11.1f} {r['peak_mb_per_rank']:>13.1f}")
    lines.append(f"(B={BATCH}, {Q_HEADS} query / {KV_HEADS} KV heads, head size {HEAD_DIM}, fp32, causal; "
                 f"{os.cpu_count()} CPU cores shared by the ranks; memory: {rows[0]['memory_method']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2048 tokens instead of 8192, fewer iterations")
    args = parser.parse_args()
    print(format_table(run(args.quick)))


if __name__ == "__main__":
    main()
