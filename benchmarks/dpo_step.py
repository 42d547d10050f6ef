"""DPO step time and peak memory: this framework's solver_dpo vs TRL's DPOTrainer, same work, same run.

SmolLM2-135M-Instruct, fp32 on the CPU, one process each with the same thread count. Both sides get the same
preference pairs (the first pairs of examples/data/dpo_arithmetic.jsonl as TRL conversational records: a user
prompt, one assistant message chosen and one rejected) in the same order (our solver's deterministic epoch order
is written out as TRL's dataset, read sequentially), the same pairs per step (no gradient accumulation), the same
maximum length (no pair reaches it), loss sigmoid, beta, a constant learning rate, AdamW without weight decay,
max_grad_norm 1.0, and reference log-probs computed once before training on both sides (ours always;
TRL with ``precompute_ref_log_probs=True``, so neither holds a second model). The token ids are checked: the
prompt + response ids TRL's dataset holds equal our token pipeline's (``same_input_ids``); the trained response
tokens are counted on each side (TRL also trains the newline after the end-of-turn token: one token more per
sequence, the same forward and backward work).

Ours: ``torchrun solver_dpo.py``; a step's time is the difference of consecutive ``elapsed_s`` in its
metrics.jsonl. TRL: a TrainerCallback times each optimizer step (on_step_begin -> on_step_end). The first step
of each side is warm-up and dropped. Peak memory is each process's own VmHWM (ours: the solver's
``peak_memory_mb``), so it includes the model load and the reference pass on both sides.

    python -m benchmarks.dpo_step [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.worker import run_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "data", "dpo_arithmetic.jsonl")
SEED = 1234


def settings(quick: bool) -> list[dict]:
    """One dict per compared configuration."""
    base = {"loss_type": "sigmoid", "beta": 0.1, "lr": 1e-6, "max_grad_norm": 1.0, "max_seq_len": 256,
            "dtype": "float32"}
    if quick:
        return [dict(base, pairs=2, steps=2)]
    return [dict(base, pairs=8, steps=4)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def conversational(record: dict) -> dict:
    """Any of the demo file's three shapes -> {"prompt": [user], "chosen": [assistant], "rejected": [assistant]}."""
    if "instruction" in record:
        prompt = [{"role": "user", "content": record["instruction"]}]
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": record["chosen"]}],
                "rejected": [{"role": "assistant", "content": record["rejected"]}]}
    if "prompt" in record:
        return {k: record[k] for k in ("prompt", "chosen", "rejected")}
    return {"prompt": record["chosen"][:-1], "chosen": record["chosen"][-1:], "rejected": record["rejected"][-1:]}


def write_pairs(work: str, cfg: dict) -> tuple[str, str]:
    """The pairs of exactly one epoch (pairs x (warm-up + steps)); returns (our jsonl, TRL's ordered jsonl)."""
    from llama_rlhf.data import epoch_order
    n = cfg["pairs"] * (cfg["steps"] + 1)
    with open(DATA, encoding="utf-8") as f:
        rows = [conversational(json.loads(line)) for line in f if line.strip()][:n]
    ours, theirs = os.path.join(work, "pairs.jsonl"), os.path.join(work, "pairs_trl_order.jsonl")
    with open(ours, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(theirs, "w", encoding="utf-8") as f:  # the order our solver visits them (epoch 0, same seed)
        f.writelines(json.dumps(rows[i]) + "\n" for i in epoch_order(n, SEED, 0))
    return ours, theirs


def run_ours(model_dir: str, pairs: str, work: str, cfg: dict) -> dict:
    save_dir = os.path.join(work, "ours")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
           str(_free_port()), os.path.join(ROOT, "solver_dpo.py"), "--ckpt_dir", model_dir, "--train_file", pairs,
           "--save_dir", save_dir, "--use_chat_template", "--max_batch_size", str(cfg["pairs"]),
           "--max_seq_len", str(cfg["max_seq_len"]), "--loss_type", cfg["loss_type"], "--beta", str(cfg["beta"]),
           "--lr", str(cfg["lr"]), "--lr_scheduler", "constant", "--warmup_steps", "0", "--weight_decay", "0",
           "--max_grad_norm", str(cfg["max_grad_norm"]), "--dtype", cfg["dtype"], "--max_steps",
           str(cfg["steps"] + 1), "--seed", str(SEED)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"solver_dpo failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(save_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    elapsed = [r["elapsed_s"] for r in records]
    steps = [b - a for a, b in zip(elapsed, elapsed[1:])]  # from the second step on: the first is warm-up
    return {"step_s": steps, "loss": [r["loss"] for r in records], "process_wall_s": wall,
            "peak_memory_mb": max(r["peak_memory_mb"] for r in records)}


def run_trl(model_dir: str, pairs: str, work: str, cfg: dict) -> dict:
    return run_worker("benchmarks.dpo_step", {**cfg, "model_dir": model_dir, "pair_file": pairs, "work": work,
                      "out": os.path.join(work, "trl_result.json")}, "TRL DPOTrainer")


def trl_worker(spec: dict) -> None:
    """Run TRL's DPOTrainer with ``spec``'s settings; write per-step timings, losses and its tokens to spec['out']."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    with open(spec["pair_file"], encoding="utf-8") as f:
        dataset = Dataset.from_list([json.loads(line) for line in f if line.strip()])
    steps, losses = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    config = DPOConfig(
        output_dir=os.path.join(spec["work"], "trl"), per_device_train_batch_size=spec["pairs"],
        gradient_accumulation_steps=1, loss_type=[spec["loss_type"]], beta=spec["beta"],
        max_length=spec["max_seq_len"], precompute_ref_log_probs=True, precompute_ref_batch_size=spec["pairs"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=spec["max_grad_norm"], use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        max_steps=spec["steps"] + 1, logging_steps=1, save_strategy="no", report_to="none", seed=SEED,
        train_sampling_strategy="sequential", dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32},
        disable_tqdm=True)
    trainer = DPOTrainer(model=spec["model_dir"], args=config, train_dataset=dataset, callbacks=[StepTimer()])
    tokens = [{k: list(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in trainer.train_dataset]
    trainer.train()
    if len(steps) != spec["steps"] + 1:
        raise RuntimeError(f"TRL ran {len(steps)} steps, expected {spec['steps'] + 1}")
    with open(spec["out"], "w", encoding="utf-8") as f:
        json.dump({"step_s": steps[1:], "loss": losses, "threads": torch.get_num_threads(),
                   "optimizer": str(config.optim), "peak_memory_mb": peak_rss_mb(), "tokens": tokens}, f)


def peak_rss_mb() -> float:
    """This process's own high-water mark (ru_maxrss would include the parent's across fork + exec)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def compare_tokens(model_dir: str, pairs: str, trl_tokens: list[dict], max_len: int) -> dict:
    """Our token pipeline's chosen and rejected sequences against TRL's prompt_ids + chosen_ids / rejected_ids:
    whether the input ids are the same (rows matched by content: TRL's file is in our epoch order), and how many
    response tokens each side trains on (TRL's conversational completions also train the newline after the
    end-of-turn token; ours stop at the end-of-turn token)."""
    from llama_rlhf.data.samples import DatasetStats, pair_arrays
    from llama_rlhf.parallel.cross_entropy import IGNORE_INDEX
    from llama_rlhf.tokenizer import load_tokenizer
    tok = load_tokenizer(model_dir)
    ours, trained = [], 0
    with open(pairs, encoding="utf-8") as f:
        for i, line in enumerate(f):
            sides = pair_arrays(json.loads(line), tok, True, None, max_len, f"{pairs}:{i + 1}", DatasetStats())
            ours.append(tuple(tuple(ids) for ids, _ in sides))
            trained += sum(t != IGNORE_INDEX for _, labels in sides for t in labels)
    theirs = [tuple(tuple(r["prompt_ids"] + r[k]) for k in ("chosen_ids", "rejected_ids")) for r in trl_tokens]
    return {"same_input_ids": sorted(ours) == sorted(theirs), "llama_rlhf_trained_tokens": trained,
            "trl_trained_tokens": sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trl_tokens)}


def measure(model_dir: str, cfg: dict) -> dict:
    work = tempfile.mkdtemp(prefix="dpo_bench_")
    try:
        ours_file, trl_file = write_pairs(work, cfg)
        ours = run_ours(model_dir, ours_file, work, cfg)
        trl = run_trl(model_dir, trl_file, work, cfg)
        tokens = compare_tokens(model_dir, ours_file, trl["tokens"], cfg["max_seq_len"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {"benchmark": "dpo_step", "model": "SmolLM2-135M-Instruct", "dtype": cfg["dtype"], "mp": 1,
           **{k: cfg[k] for k in ("pairs", "steps", "loss_type", "beta", "lr", "max_seq_len")},
           "reference": "precomputed (both)", **tokens,
           "tokens_per_step": sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
                                  for r in trl["tokens"]) / (cfg["steps"] + 1),
           "llama_rlhf_step_s": _stats(ours["step_s"]), "trl_step_s": _stats(trl["step_s"]),
           "llama_rlhf_first_loss": ours["loss"][0], "trl_first_loss": trl["loss"][0] if trl["loss"] else None,
           "llama_rlhf_peak_memory_mb": ours["peak_memory_mb"], "trl_peak_memory_mb": trl["peak_memory_mb"],
           "trl_threads": trl["threads"], "trl_optimizer": trl["optimizer"],
           "llama_rlhf_process_wall_s": ours["process_wall_s"], "trl_process_wall_s": trl["process_wall_s"]}
    row["speedup_vs_trl"] = row["trl_step_s"]["median"] / row["llama_rlhf_step_s"]["median"]
    row["memory_vs_trl"] = row["llama_rlhf_peak_memory_mb"] / row["trl_peak_memory_mb"]
    return row


def run(quick: bool = False) -> list[dict]:
    sys.path.insert(0, ROOT)
    from tools.fetch_smollm2 import ensure_smollm2
    model_dir = ensure_smollm2()
    return [measure(model_dir, cfg) for cfg in settings(quick)]


def format_table(rows: list[dict]) -> str:
    span = lambda s: f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
    lines = [f"{'pairs/step':>10} {'tokens':>7} {'ours step s':>19} {'TRL step s':>19} {'speedup':>8} "
             f"{'ours MB':>8} {'TRL MB':>8} {'same ids':>8} {'trained tokens ours/TRL':>24} "
             f"{'first loss ours/TRL':>20}"]
    for r in rows:
        first = f"{r['llama_rlhf_first_loss']:.4f} / " + (f"{r['trl_first_loss']:.4f}" if r["trl_first_loss"]
                                                          is not None else "-")
        lines.append(f"{r['pairs']:>10} {r['tokens_per_step']:>7.0f} {span(r['llama_rlhf_step_s']):>19} "
                     f"{span(r['trl_step_s']):>19} {r['speedup_vs_trl']:>7.2f}x {r['llama_rlhf_peak_memory_mb']:>8.0f} "
                     f"{r['trl_peak_memory_mb']:>8.0f} {str(r['same_input_ids']):>8} "
                     f"{r['llama_rlhf_trained_tokens']:>11} / {r['trl_trained_tokens']:<10} {first:>20}")
    lines.append("(seconds per optimizer step, median (min-max) over the timed steps; the first step of each side is "
                 "warm-up; MB: peak resident set of the one process; tokens: unpadded sequence tokens per step)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 pairs per step, 2 timed steps")
    p.add_argument("--trl_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return
    print(format_table(run(args.quick)))


if __name__ == "__main__":
    main()
