"""LoRA SFT step: full fine-tuning vs LoRA r=16 vs QLoRA nf4 here, and transformers + PEFT on the same LoRA work.

SmolLM2-135M-Instruct, fp32, random tokens, batch 2 x 256 (quick: 1 x 128), one optimizer step per iteration
(forward, backward, AdamW over the trainable parameters). LoRA r=16, alpha 32, on all seven linears of every layer
(PEFT: ``target_modules="all-linear"``, which leaves out lm_head as we do). Each configuration runs in its own
process, so its peak RSS is its own. Reported: tokens/s (median step), peak RSS per rank, the bytes the optimizer
holds, and ours / PEFT as a ratio. (The GRPO-with-LoRA comparison against TRL is not measured here yet.)

    python -m benchmarks.lora [--quick]
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
RANK, ALPHA = 16, 32


def worker_peft(model_dir, batch, seq, steps):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.train_step import _batch, peak_rss_mb
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    ids, labels = _batch(model.config.vocab_size, batch, seq)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("RESULT " + json.dumps({"times": times[1:], "loss": float(loss), "peak_rss_mb": peak_rss_mb(),
                                  "trainable": trainable}), flush=True)


def worker_ours(model_dir, mode, batch, seq, steps):
    import torch

    from benchmarks.train_step import _batch, peak_rss_mb
    from llama_rlhf.data import Row
    from llama_rlhf.models.lora import LoRASpec, apply_lora, freeze_base
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.models.quant import quantize_base
    from llama_rlhf.parallel.cpu_allocator import keep_freed_memory
    from llama_rlhf.parallel.state import init_parallel
    from llama_rlhf.training.distributed_optimizer import DistributedAdamW
    from llama_rlhf.training.sft import train_step
    ps = init_parallel(1, 1)
    model = load_pretrained(model_dir, "llama-hf", ps)
    quant = None
    if mode == "qlora":
        quant = quantize_base(model, "nf4")
    if mode != "full":
        apply_lora(model, LoRASpec(RANK, ALPHA), seed=0)
        freeze_base(model, torch.float32)
    model.train()
    opt = DistributedAdamW(model, ps, stage=0, lr=1e-4, param_dtype=torch.float32)
    keep_freed_memory(ps.device)
    ids, _ = _batch(model.cfg.vocab_size, batch, seq)
    rows = [Row(r.tolist(), r[1:].tolist() + [-100], list(range(seq)), [0] * seq) for r in ids]
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        result = train_step(model, opt, [rows], batch * (seq - 1), ps, torch.float32, 0, 1.0, False)
        times.append(time.perf_counter() - t)
    held = opt.memory_breakdown(model)
    print("RESULT " + json.dumps({"times": times[1:], "loss": result.loss, "peak_rss_mb": peak_rss_mb(),
                                  "trainable": held["trainable_parameters"], "held": held,
                                  "quant_bytes_per_param": quant and quant["bytes_per_param"]}), flush=True)


def measure(model_dir: str, impl: str, mode: str, batch: int, seq: int, steps: int) -> dict:
    spec = json.dumps([model_dir, batch, seq, steps] if impl == "peft" else [model_dir, mode, batch, seq, steps])
    if impl == "peft":
        cmd = [sys.executable, "-m", "benchmarks.lora", "--worker_peft", spec]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29781",
               "-m", "benchmarks.lora", "--worker_ours", spec]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lora worker ({impl} {mode}) failed:\n{proc.stderr[-3000:]}")
    r = next(json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    median = statistics.median(r["times"])
    return {"benchmark": "lora", "impl": impl, "mode": mode, "batch": batch, "seq": seq,
            "step_s_median": median, "step_s_min": min(r["times"]), "step_s_max": max(r["times"]),
            "tokens_per_s": batch * seq / median, "peak_rss_mb_per_rank": r["peak_rss_mb"],
            "trainable_parameters": r["trainable"], "loss": r["loss"], "held_bytes": r.get("held"),
            "quant_bytes_per_param": r.get("quant_bytes_per_param")}


def run(quick: bool = False) -> list[dict]:
    sys.path.insert(0, ROOT)
    from tools.fetch_smollm2 import ensure_smollm2
    model_dir = ensure_smollm2()
    batch, seq, steps = (1, 128, 2) if quick else (2, 256, 3)
    rows = [measure(model_dir, "llama_rlhf", mode, batch, seq, steps) for mode in ("full", "lora", "qlora")]
    rows.append(measure(model_dir, "peft", "lora", batch, seq, steps))
    peft_row = rows[-1]
    for r in rows[:3]:
        r["speedup_vs_peft"] = r["tokens_per_s"] / peft_row["tokens_per_s"]
        r["peak_rss_vs_peft"] = r["peak_rss_mb_per_rank"] / peft_row["peak_rss_mb_per_rank"]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'impl':<11}{'mode':<7}{'tok/s':>8}{'step s':>8}{'peak MB':>9}{'trainable':>11}{'vs PEFT':>9}"]
    for r in rows:
        ratio = f"{r['speedup_vs_peft']:.2f}x" if "speedup_vs_peft" in r else ""
        lines.append(f"{r['impl']:<11}{r['mode']:<7}{r['tokens_per_s']:>8.0f}{r['step_s_median']:>8.2f}"
                     f"{r['peak_rss_mb_per_rank']:>9.0f}{r['trainable_parameters']:>11}{ratio:>9}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker_ours", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker_peft", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_ours:
        worker_ours(*json.loads(args.worker_ours))
        return
    if args.worker_peft:
        worker_peft(*json.loads(args.worker_peft))
        return
    print(format_table(run(args.quick)))


if __name__ == "__main__":
    main()
