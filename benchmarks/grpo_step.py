"""GRPO step time (rollout + update): this framework's solver_grpo vs TRL's GRPOTrainer, same work, same run.

SmolLM2-135M-Instruct, fp32 on the CPU, one process each with the same thread count. Both sides get:
the same prompts in the same order (examples/data/grpo_arithmetic.jsonl rendered with the chat template; our
solver's deterministic epoch order is written out as TRL's unshuffled dataset), the same group size G, prompts
per step, max_new_tokens, temperature 1.0, top_p 1.0, top_k 0 (no filter), beta, loss type (dapo), epsilon 0.2,
learning rate (constant), max_grad_norm 1.0, and the same reward function (this package's ``accuracy``).
TRL is set to one generation batch per optimizer step (prompts x G sequences, no gradient accumulation, no
vLLM, no gradient checkpointing since ours recomputes nothing, no bf16).

Ours: ``torchrun solver_grpo.py``; step_s / rollout_s are read from its metrics.jsonl. TRL: a TrainerCallback
times each optimizer step (on_step_begin -> on_step_end), and TRL's ``_generate`` is timed for the rollout
share. The first step of each side is warm-up and dropped. Completion lengths are reported too: sampling
differs between the two, so the work per step differs a little (both stop a sequence at the end token).

Rollout precision rows (ours only; TRL's row for the same settings is measured once and reused): --rollout_dtype
bfloat16 (a bf16 copy of the fp32 policy), --rollout_quantization int8 (int8 decoder linears, fp32 activations) and
both; the trainer stays fp32. Their rollout_logprob_diff_mean (sampler vs trainer, from metrics.jsonl) is reported.
``--threads N`` sets the thread count of both sides (OMP_NUM_THREADS for TRL, LLAMA_RLHF_NUM_THREADS for our ranks,
which otherwise take cores / local ranks: under load a spare thread costs far more than it gives).

    python -m benchmarks.grpo_step [--quick] [--threads N]
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
DATA = os.path.join(ROOT, "examples", "data", "grpo_arithmetic.jsonl")
SEED = 1234


def settings(quick: bool) -> list[dict]:
    """One dict per compared configuration."""
    base = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "loss_type": "dapo", "lr": 1e-6, "epsilon": 0.2,
            "max_grad_norm": 1.0, "max_seq_len": 256, "dtype": "float32"}
    precisions = [{"rollout_dtype": "bfloat16"}, {"rollout_quantization": "int8"},
                  {"rollout_dtype": "bfloat16", "rollout_quantization": "int8"}]
    if quick:
        row = dict(base, prompts=2, group=4, new_tokens=24, steps=3, beta=0.0)
        return [row] + [dict(row, **p) for p in precisions]
    full = [dict(base, prompts=4, group=4, new_tokens=48, steps=4, beta=beta) for beta in (0.0, 0.04)]
    full += [dict(full[0], **p) for p in precisions]
    full += [dict(full[0], shared_prompts=False)]  # the update with one row per sample (what TRL computes)
    # LoRA r=16 on every linear, the KL reference = the adapters-off model on both sides (TRL with a peft_config)
    return full + [dict(base, prompts=4, group=4, new_tokens=48, steps=4, beta=0.04, lr=1e-4, lora_rank=16)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def write_prompts(work: str, cfg: dict) -> tuple[str, str]:
    """The prompts of exactly one epoch (prompts x (warm-up + steps)); returns (our jsonl, TRL's ordered jsonl)."""
    from llama_rlhf.data import epoch_order
    n = cfg["prompts"] * (cfg["steps"] + 1)
    with open(DATA, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][:n]
    ours, theirs = os.path.join(work, "prompts.jsonl"), os.path.join(work, "prompts_trl_order.jsonl")
    with open(ours, "w", encoding="utf-8") as f:
        f.writelines(lines)
    with open(theirs, "w", encoding="utf-8") as f:  # the order our solver visits them (epoch 0, same seed)
        f.writelines(lines[i] for i in epoch_order(n, SEED, 0))
    return ours, theirs


def run_ours(model_dir: str, prompts: str, work: str, cfg: dict) -> dict:
    save_dir = os.path.join(work, "ours")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
           str(_free_port()), os.path.join(ROOT, "solver_grpo.py"), "--ckpt_dir", model_dir, "--train_file", prompts,
           "--save_dir", save_dir, "--use_chat_template", "--reward_funcs", "accuracy",
           "--num_samples_per_prompt", str(cfg["group"]), "--max_batch_size", str(cfg["prompts"]),
           "--max_new_tokens", str(cfg["new_tokens"]), "--max_seq_len", str(cfg["max_seq_len"]),
           "--temperature", str(cfg["temperature"]), "--top_p", str(cfg["top_p"]), "--top_k", str(cfg["top_k"]),
           "--lr", str(cfg["lr"]), "--beta", str(cfg["beta"]), "--loss_type", cfg["loss_type"],
           "--epsilon", str(cfg["epsilon"]), "--max_grad_norm", str(cfg["max_grad_norm"]), "--dtype", cfg["dtype"],
           "--max_steps", str(cfg["steps"] + 1), "--seed", str(SEED), "--log_completions_steps", "0"]
    if cfg.get("lora_rank"):
        cmd += ["--lora_rank", str(cfg["lora_rank"]), "--lora_alpha", str(2 * cfg["lora_rank"]),
                "--lora_target_modules", "all-linear"]
    if cfg.get("rollout_dtype"):
        cmd += ["--rollout_dtype", cfg["rollout_dtype"]]
    if cfg.get("rollout_quantization"):
        cmd += ["--rollout_quantization", cfg["rollout_quantization"]]
    if not cfg.get("shared_prompts", True):
        cmd += ["--shared_prompts", "false"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"solver_grpo failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(save_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    timed = records[1:]  # the first step is warm-up
    return {"step_s": [r["step_s"] for r in timed], "rollout_s": [r["rollout_s"] for r in timed],
            "completion_len": [r["completion_len_mean"] for r in timed],
            "reward_mean": [r["reward_mean"] for r in timed], "process_wall_s": wall,
            "logprob_diff": [r.get("rollout_logprob_diff_mean", float("nan")) for r in timed],
            "peak_memory_mb": max(r["peak_memory_mb"] for r in records)}


def run_trl(model_dir: str, prompts: str, work: str, cfg: dict) -> dict:
    return run_worker("benchmarks.grpo_step", {**cfg, "model_dir": model_dir, "prompt_file": prompts, "work": work,
                      "out": os.path.join(work, "trl_result.json")}, "TRL GRPOTrainer")


def trl_worker(spec: dict) -> None:
    """Run TRL's GRPOTrainer with ``spec``'s settings and write per-step timings to spec['out']."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llama_rlhf.rewards import accuracy_reward

    with open(spec["prompt_file"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}],
                                  "answer": str(r["answer"])} for r in rows])

    def accuracy(completions, answer, **_):
        return [accuracy_reward(c[0]["content"], {"answer": a}) for c, a in zip(completions, answer)]

    steps, rollouts, lengths = [], [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=os.path.join(spec["work"], "trl"), per_device_train_batch_size=spec["prompts"] * spec["group"],
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=spec["group"],
        max_completion_length=spec["new_tokens"], temperature=spec["temperature"], top_p=spec["top_p"],
        top_k=spec["top_k"], beta=spec["beta"], loss_type=spec["loss_type"], epsilon=spec["epsilon"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=spec["max_grad_norm"], num_iterations=1, scale_rewards="group", use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, use_vllm=False, max_steps=spec["steps"] + 1, logging_steps=1,
        save_strategy="no", report_to="none", shuffle_dataset=False, seed=SEED, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32}, log_completions=False, disable_tqdm=True)
    peft_config = None
    if spec.get("lora_rank"):
        from peft import LoraConfig
        peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=accuracy, args=config, train_dataset=dataset,
                          callbacks=[StepTimer()], peft_config=peft_config)
    generate = trainer._generate

    def timed_generate(prompts):
        start = time.perf_counter()
        result = generate(prompts)
        rollouts.append(time.perf_counter() - start)
        lengths.append(sum(len(ids) for ids in result[1]) / max(len(result[1]), 1))
        return result

    trainer._generate = timed_generate
    trainer.train()
    if len(steps) != spec["steps"] + 1:
        raise RuntimeError(f"TRL ran {len(steps)} steps, expected {spec['steps'] + 1}")
    with open(spec["out"], "w", encoding="utf-8") as f:
        json.dump({"step_s": steps[1:], "rollout_s": rollouts[1:], "completion_len": lengths[1:],
                   "threads": torch.get_num_threads(), "optimizer": str(config.optim),
                   "peak_memory_mb": peak_rss_mb()}, f)


def peak_rss_mb() -> float:
    """This process's own high-water mark (ru_maxrss would include the parent's across fork + exec)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def check_same_prompts(model_dir: str, prompts: str) -> bool:
    """Our chat rendering and transformers' apply_chat_template give the same prompt token ids."""
    from transformers import AutoTokenizer

    from llama_rlhf.tokenizer import load_tokenizer
    ours, theirs = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    with open(prompts, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        messages = [{"role": "user", "content": r["instruction"]}]
        ref = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
        if list(ours.encode_chat(messages, add_generation_prompt=True)) != ref:
            return False
    return True


ROLLOUT_KEYS = ("rollout_dtype", "rollout_quantization", "shared_prompts")  # ours only: TRL's run is reused


def measure(model_dir: str, cfg: dict, trl_runs: dict | None = None) -> dict:
    trl_runs = {} if trl_runs is None else trl_runs
    trl_key = json.dumps({k: v for k, v in cfg.items() if k not in ROLLOUT_KEYS}, sort_keys=True)
    work = tempfile.mkdtemp(prefix="grpo_bench_")
    try:
        ours_file, trl_file = write_prompts(work, cfg)
        same = check_same_prompts(model_dir, ours_file)
        ours = run_ours(model_dir, ours_file, work, cfg)
        if trl_key not in trl_runs:
            trl_runs[trl_key] = run_trl(model_dir, trl_file, work, cfg)
        trl = trl_runs[trl_key]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {"benchmark": "grpo_step", "model": "SmolLM2-135M-Instruct", "dtype": cfg["dtype"], "mp": 1,
           **{k: cfg[k] for k in ("prompts", "group", "new_tokens", "steps", "beta", "loss_type", "temperature",
                                  "top_p", "top_k", "lr")}, "lora_rank": cfg.get("lora_rank", 0),
           "rollout_dtype": cfg.get("rollout_dtype") or cfg["dtype"],
           "rollout_quantization": cfg.get("rollout_quantization") or "none",
           "shared_prompts": cfg.get("shared_prompts", True),
           "llama_rlhf_logprob_diff_mean": statistics.mean(ours["logprob_diff"]),
           "threads": os.environ.get("LLAMA_RLHF_NUM_THREADS", "default"),
           "llama_rlhf_peak_memory_mb": ours["peak_memory_mb"], "trl_peak_memory_mb": trl["peak_memory_mb"],
           "sequences_per_step": cfg["prompts"] * cfg["group"], "same_prompt_ids": same,
           "llama_rlhf_step_s": _stats(ours["step_s"]), "trl_step_s": _stats(trl["step_s"]),
           "llama_rlhf_rollout_s": _stats(ours["rollout_s"]), "trl_rollout_s": _stats(trl["rollout_s"]),
           "llama_rlhf_completion_len": statistics.mean(ours["completion_len"]),
           "trl_completion_len": statistics.mean(trl["completion_len"]),
           "trl_threads": trl["threads"], "trl_optimizer": trl["optimizer"],
           "llama_rlhf_process_wall_s": ours["process_wall_s"], "trl_process_wall_s": trl["process_wall_s"]}
    row["speedup_vs_trl"] = row["trl_step_s"]["median"] / row["llama_rlhf_step_s"]["median"]
    return row


def run(quick: bool = False) -> list[dict]:
    sys.path.insert(0, ROOT)
    from tools.fetch_smollm2 import ensure_smollm2
    model_dir = ensure_smollm2()
    trl_runs: dict = {}
    return [measure(model_dir, cfg, trl_runs) for cfg in settings(quick)]


def format_table(rows: list[dict]) -> str:
    span = lambda s: f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
    lines = [f"{'prompts x G':>11} {'new':>4} {'beta':>5} {'rollouts':>14} {'ours step s':>19} {'TRL step s':>19} "
             f"{'speedup':>8} {'ours rollout s':>19} {'TRL rollout s':>19} {'completion len ours/TRL':>24} "
             f"{'|dlogp|':>8}"]
    for r in rows:
        rollouts = r.get("rollout_dtype", r["dtype"]).replace("bfloat", "bf").replace("float", "fp")
        if r.get("rollout_quantization", "none") != "none":
            rollouts += "+" + r["rollout_quantization"]
        if r.get("lora_rank"):
            rollouts += f" lora{r['lora_rank']}"
        if not r.get("shared_prompts", True):
            rollouts += " unshared"
        lines.append(f"{r['prompts']:>5} x {r['group']:<3} {r['new_tokens']:>4} {r['beta']:>5} {rollouts:>14} "
                     f"{span(r['llama_rlhf_step_s']):>19} {span(r['trl_step_s']):>19} {r['speedup_vs_trl']:>7.2f}x "
                     f"{span(r['llama_rlhf_rollout_s']):>19} {span(r['trl_rollout_s']):>19} "
                     f"{r['llama_rlhf_completion_len']:>15.1f} / {r['trl_completion_len']:<6.1f} "
                     f"{r.get('llama_rlhf_logprob_diff_mean', float('nan')):>8.4f}")
    lines.append("(seconds per step, median (min-max) over the timed steps; the first step of each side is warm-up)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 prompts x 4 samples x 24 new tokens, 3 timed steps")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both sides (0: as the environment)")
    p.add_argument("--trl_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:  # TRL reads OMP_NUM_THREADS; our ranks set their own count unless LLAMA_RLHF_NUM_THREADS says
        os.environ["OMP_NUM_THREADS"] = os.environ["LLAMA_RLHF_NUM_THREADS"] = str(args.threads)
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return
    rows = run(args.quick)
    print(format_table(rows))


if __name__ == "__main__":
    main()
