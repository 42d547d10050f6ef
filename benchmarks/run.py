"""Run every benchmark, print one table, and write benchmarks/results/<machine>.{md,json,png}.

    python -m benchmarks [--quick] [--only train_step,grpo_step] [--machine NAME]

Each benchmark module ``benchmarks/<name>.py`` exposes ``run(quick) -> list[dict]``; this file runs them in
turn (a failing one is recorded and the rest still run), adds a sequence-length sweep of ring attention for
the plot, pairs every figure of ours with the competitor's figure from the same run, and checks the targets of
issues 9 and 13. Figures are medians of several runs with [min-max]; the load average is recorded around every
benchmark (the machine may be shared). ``--quick`` writes ``<machine>-quick.*``, ``--only`` writes
``<machine>-<names>.*`` (e.g. ``<machine>-model_size.md``), so neither overwrites the full results.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import platform
import re
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# order matters: mfu reuses train_step's rows (same run), and the long ones come last
BENCHMARKS = ("train_step", "mfu", "model_size", "memory", "generate", "ring_attention", "load", "comm", "lora",
              "data", "grpo_step", "dpo_step")


# ---------------------------------------------------------------------------------------------------------
# machine facts
# ---------------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    import torch
    facts = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
             "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
             "platform": platform.platform(), "hostname": platform.node(),
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        with open("/proc/meminfo") as f:
            facts["memory_gb"] = round(int(f.readline().split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    for name in ("transformers", "trl", "accelerate"):
        try:
            facts[name] = importlib.import_module(name).__version__
        except ImportError:
            facts[name] = "not installed"
    return facts


def machine_name(facts: dict) -> str:
    """A file-name slug that identifies the hardware (host names are random in containers)."""
    slug = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", " ", facts["cpu_model"].lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    device = "" if facts["device"] == "cpu" else "-" + re.sub(r"[^a-z0-9]+", "-", facts["device"].lower())
    return f"{slug}-{facts['usable_cores']}cores{device}"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------

def sequence_sweep(quick: bool) -> list[dict]:
    """Ring attention (CPU flash kernel) at more sequence lengths than benchmarks.ring_attention runs, for the
    plot of time and memory against sequence length and SP."""
    from benchmarks import ring_attention
    seqs, sps = ((1024, 4096), (1, 2)) if quick else ((2048, 4096), (1, 2, 4))
    return [ring_attention.measure(sp, seq, "cpu_flash", 2 if quick else 3) for seq in seqs for sp in sps]


def run_one(name: str, quick: bool, results: dict) -> dict:
    """Run benchmark ``name``; returns {rows, seconds, load_before, load_after[, error]}."""
    entry = {"load_before": load_average()}
    start = time.perf_counter()
    try:
        if name == "ring_attention_sweep":
            rows = sequence_sweep(quick)
        else:
            module = importlib.import_module(f"benchmarks.{name}")
            if name == "mfu" and results.get("train_step", {}).get("rows"):
                rows = module.run(quick, train_rows=results["train_step"]["rows"])
            else:
                rows = module.run(quick)
        entry["rows"] = rows
    except ModuleNotFoundError as exc:
        entry["rows"], entry["error"] = [], f"not available: {exc}"
    except Exception as exc:  # noqa: BLE001 - one failing benchmark must not lose the others' figures
        entry["rows"], entry["error"] = [], f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
    entry["seconds"] = round(time.perf_counter() - start, 1)
    entry["load_after"] = load_average()
    return entry


def detail_text(name: str, rows: list[dict]) -> str:
    """The benchmark's own table (its format_table, or what its print_table prints)."""
    if not rows:
        return ""
    if name == "ring_attention_sweep":
        name = "ring_attention"
    module = importlib.import_module(f"benchmarks.{name}")
    if hasattr(module, "format_table"):
        return module.format_table(rows)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        module.print_table(rows)
    return buffer.getvalue().rstrip()


# ---------------------------------------------------------------------------------------------------------
# the summary table: ours vs the competitor, pair by pair
# ---------------------------------------------------------------------------------------------------------

def stat(median, low=None, high=None) -> dict:
    return {"median": median, "min": low if low is not None else median, "max": high if high is not None else median}


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        m, lo, hi = value["median"], value["min"], value["max"]
        if lo == hi == m:
            return f"{m:.{digits}f}"
        return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"
    return f"{value:.{digits}f}"


def line(benchmark, config, metric, ours, competitor=None, competitor_name="", ratio=None, ratio_kind="",
         digits=1) -> dict:
    """One row of the summary. ratio_kind: 'faster' (competitor time / ours or our rate / theirs),
    'memory' (ours / theirs), 'of minimum' (measured / theoretical)."""
    return {"benchmark": benchmark, "configuration": config, "metric": metric, "ours": ours,
            "competitor": competitor, "competitor_name": competitor_name, "ratio": ratio, "ratio_kind": ratio_kind,
            "digits": digits}


def rate(amount: float, seconds: dict) -> dict:
    """amount / time for a {median, min, max} time: the rate's median and range."""
    return stat(amount / seconds["median"], amount / seconds["max"], amount / seconds["min"])


def step_rate(step: dict, tokens: int) -> dict:
    """tokens/s (median and range) of a row with step_s_median / step_s_min / step_s_max."""
    return rate(tokens, stat(step["step_s_median"], step["step_s_min"], step["step_s_max"]))


def summarize_train_step(rows):
    out = []
    hf = {r["dtype"]: r for r in rows if r["impl"] == "transformers"}
    for r in rows:
        if r["impl"] != "llama_rlhf":
            continue
        config = f"SmolLM2 train step {r['batch']}x{r['seq']} {r['dtype']} MP={r['mp']}"
        if r.get("status") == "refused":
            out.append(line("train_step", f"{config} ({r['reason']})", "tokens/s", "refused"))
            continue
        tokens = r["batch"] * r["seq"]
        ours = step_rate(r, tokens)
        ref = hf.get(r["dtype"])
        out.append(line("train_step", config, "tokens/s", ours, step_rate(ref, tokens) if ref else None,
                        "transformers+AdamW", r.get("speedup_vs_transformers"), "faster", 0))
        same = r.get("transformers_same_malloc")
        if same:
            out.append(line("train_step", config, "tokens/s", ours, step_rate(same, tokens),
                            "transformers+AdamW, our malloc settings", r["speedup_vs_transformers_same_malloc"],
                            "faster", 0))
        out.append(line("train_step", config, "peak RSS MB/rank", r["peak_rss_mb_per_rank"],
                        ref["peak_rss_mb_per_rank"] if ref else None, "transformers+AdamW",
                        r.get("rss_ratio_vs_transformers"), "memory", 0))
    return out


def summarize_model_size(rows):
    out = []
    hf = {r["hidden"]: r for r in rows if r["impl"] == "transformers"}
    for r in rows:
        ref = hf.get(r["hidden"])
        if r["impl"] != "llama_rlhf" or ref is None:
            continue
        config = (f"random Llama {r['params_m']:.0f}M params ({r['hidden']} x {r['layers']} layers) train step "
                  f"{r['batch']}x{r['seq']} float32 MP=1")
        tokens = r["batch"] * r["seq"]
        out.append(line("model_size", config, "tokens/s", step_rate(r, tokens), step_rate(ref, tokens),
                        "transformers+AdamW", r["speedup_vs_transformers"], "faster", 0))
        out.append(line("model_size", config, "peak RSS MB/rank", r["peak_rss_mb_per_rank"],
                        ref["peak_rss_mb_per_rank"], "transformers+AdamW", r["rss_ratio_vs_transformers"],
                        "memory", 0))
    return out


def summarize_mfu(rows):
    out = []
    for r in rows:
        if r["kind"] == "matmul_peak":
            g = r["gflops"]
            out.append(line("mfu", f"matmul peak {r['dtype']} ({r['threads']} threads, n={r['best_size']})",
                            "GFLOP/s (best [min-median])", stat(r["peak_gflops"], g["min"], g["median"])))
            if "model_gemm_gflops" in r:
                m = r["model_gemm_gflops"]
                out.append(line("mfu", f"the train step's GEMM shapes {r['dtype']} ({r['model_gemm_shapes'][0][0]} "
                                       "tokens)", "GFLOP/s", m, None, "", m["median"] / r["peak_gflops"],
                                "of peak"))
    hf = {(r["dtype"], r["mp"]): r for r in rows if r["kind"] == "train_step" and r["impl"] == "transformers"}
    for r in rows:
        if r["kind"] != "train_step" or r["impl"] != "llama_rlhf":
            continue
        ref = hf.get((r["dtype"], 1))
        achieved = stat(r["achieved_gflops"], *r["achieved_gflops_range"])
        config = f"train step {r['batch']}x{r['seq']} {r['dtype']} MP={r['mp']}"
        out.append(line("mfu", config, "achieved GFLOP/s", achieved,
                        stat(ref["achieved_gflops"], *ref["achieved_gflops_range"]) if ref else None,
                        "transformers+AdamW", r["achieved_gflops"] / ref["achieved_gflops"] if ref else None,
                        "faster"))
        out.append(line("mfu", config, "MFU %", 100 * r["mfu"], 100 * ref["mfu"] if ref else None,
                        "transformers+AdamW"))
    return out


def summarize_generate(rows):
    out = []
    for r in rows:
        config = (f"greedy batch {r['batch']}, {r['new_tokens']} new tokens, {r['dtype']}, "
                  f"{r.get('threads', 1)} thread{'s' if r.get('threads', 1) > 1 else ''}")
        out.append(line("generate", config, "tokens/s (best of runs)", r["llama_rlhf_tokens_per_s"],
                        r["transformers_tokens_per_s"], "transformers generate", r["speedup_vs_transformers"],
                        "faster"))
        if "whole_prefill_tokens_per_s" in r:  # the shared-prefix lever: our side with every prompt prefilled whole
            out.append(line("generate", config + ", every prompt prefilled whole", "tokens/s (best of runs)",
                            r["whole_prefill_tokens_per_s"], r["transformers_tokens_per_s"], "transformers generate",
                            r["whole_prefill_speedup_vs_transformers"], "faster"))
    return out


def summarize_ring_attention(rows, sweep=False):
    out = []
    sdpa = {r["seq_len_tokens"]: r for r in rows if r["kernel"] == "sdpa"}
    for r in rows:
        if r["kernel"] == "sdpa" and not sweep:
            continue
        ref = sdpa.get(r["seq_len_tokens"])
        config = f"{r['config']}, {r['seq_len_tokens']} tokens" + (" (sweep)" if sweep else "")
        out.append(line("ring_attention", config, "fwd+bwd ms", r["fwd_bwd_ms"], ref["fwd_bwd_ms"] if ref else None,
                        "torch SDPA, 1 process", ref["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ref else None, "faster"))
        out.append(line("ring_attention", config, "peak MB/rank", r["peak_mb_per_rank"],
                        ref["peak_mb_per_rank"] if ref else None, "torch SDPA, 1 process",
                        r["peak_mb_per_rank"] / ref["peak_mb_per_rank"] if ref else None, "memory"))
    return out


def summarize_load(rows):
    out = []
    hf = next((r for r in rows if r["impl"] == "transformers"), None)
    for r in rows:
        if r["impl"] != "llama_rlhf":
            continue
        config = f"load SmolLM2 fp32 MP={r['mp']}"
        if r["status"] != "ok":
            out.append(line("load", f"{config} ({r['reason']})", "peak RSS MB/rank", "refused"))
            continue
        out.append(line("load", config, "load s", r["load_s"], hf["load_s"], "transformers from_pretrained",
                        r["load_speedup_vs_transformers"], "faster", 2))
        out.append(line("load", config, "peak RSS MB/rank", r["peak_rss_mb_per_rank"], hf["peak_rss_mb_per_rank"],
                        "transformers from_pretrained", r["peak_ratio_vs_transformers"], "memory", 0))
        out.append(line("load", config, "peak increase over baseline MB/rank", r["increase_mb_per_rank"],
                        hf["increase_mb_per_rank"], "transformers from_pretrained",
                        r["increase_mb_per_rank"]["median"] / hf["increase_mb_per_rank"]["median"], "memory", 0))
    return out


def summarize_comm(rows):
    out = []
    for r in rows:
        config = f"{r['layout']} {r['phase']} per layer"
        unit = "all-reduce" if r["kind"] == "mp" else "P2P send"
        out.append(line("comm", config, f"{unit} calls", r["calls_per_layer"], r["min_calls_per_layer"],
                        "theoretical minimum", r["calls_per_layer"] / r["min_calls_per_layer"], "of minimum", 0))
        out.append(line("comm", config, f"{unit} bytes", r["bytes_per_layer"], r["min_bytes_per_layer"],
                        "theoretical minimum", r["bytes_per_layer"] / r["min_bytes_per_layer"], "of minimum", 0))
    return out


def variant_label(r) -> str:
    """", rollouts bfloat16+int8" for rows whose rollouts ran in another precision than the trainer, ", one update
    row per sample" for rows without shared prompts (else "")."""
    dtype, quant = r.get("rollout_dtype", r["dtype"]), r.get("rollout_quantization", "none")
    label = "" if dtype == r["dtype"] and quant == "none" else f", rollouts {dtype}" + (f"+{quant}" if quant != "none"
                                                                                       else "")
    return label + ("" if r.get("shared_prompts", True) else ", one update row per sample")


def summarize_grpo_step(rows):
    out = []
    for r in rows:
        config = (f"GRPO {r['prompts']} prompts x {r['group']}, {r['new_tokens']} new tokens, beta {r['beta']}, "
                  f"{r['dtype']}" + (f", LoRA r={r['lora_rank']}" if r.get("lora_rank") else "")
                  + variant_label(r))
        out.append(line("grpo_step", config, "step s", r["llama_rlhf_step_s"], r["trl_step_s"], "TRL GRPOTrainer",
                        r["speedup_vs_trl"], "faster", 2))
        out.append(line("grpo_step", config, "rollout s", r["llama_rlhf_rollout_s"], r["trl_rollout_s"],
                        "TRL GRPOTrainer",
                        r["trl_rollout_s"]["median"] / r["llama_rlhf_rollout_s"]["median"], "faster", 2))
        out.append(line("grpo_step", config, "completion tokens (mean)", r["llama_rlhf_completion_len"],
                        r["trl_completion_len"], "TRL GRPOTrainer"))
        if "trl_peak_memory_mb" in r:
            out.append(line("grpo_step", config, "peak RSS MB/rank", r["llama_rlhf_peak_memory_mb"],
                            r["trl_peak_memory_mb"], "TRL GRPOTrainer",
                            r["llama_rlhf_peak_memory_mb"] / r["trl_peak_memory_mb"], "memory", 0))
    return out


def summarize_dpo_step(rows):
    out = []
    for r in rows:
        config = f"DPO {r['pairs']} pairs/step, {r['loss_type']}, beta {r['beta']}, {r['dtype']}, reference precomputed"
        out.append(line("dpo_step", config, "step s", r["llama_rlhf_step_s"], r["trl_step_s"], "TRL DPOTrainer",
                        r["speedup_vs_trl"], "faster", 2))
        out.append(line("dpo_step", config, "peak RSS MB/rank", r["llama_rlhf_peak_memory_mb"],
                        r["trl_peak_memory_mb"], "TRL DPOTrainer", r["memory_vs_trl"], "memory", 0))
    return out


def summarize_memory(rows):
    out = []
    for r in rows:
        if r.get("kind") == "mfu":
            out.append(line("memory", f"bf16 train step {r['batch_per_rank']}x{r['seq']} world 1, zero stage "
                                      f"{r['zero_stage']}", "MFU %", 100 * r["mfu"]))
            continue
        config = f"SmolLM2 SFT step DP={r['dp']} {r['dtype']} zero stage {r['zero_stage']}"
        out.append(line("memory", config, "bytes/param (params+grads+optimizer)", r["bytes_per_param"],
                        r["bytes_per_param_theory"], "theory", r["bytes_per_param"] / r["bytes_per_param_theory"],
                        "of minimum", 2))
        out.append(line("memory", config, "peak RSS MB/rank", r["peak_rss_mb_per_rank"], None, "", None, "", 0))
        if "step_time_vs_stage0" in r:
            out.append(line("memory", config, "step time vs stage 0", r["step_time_vs_stage0"], None, "", None, "", 2))
    return out


def summarize_lora(rows):
    out = []
    peft_row = next((r for r in rows if r["impl"] == "peft"), None)
    for r in rows:
        if r["impl"] != "llama_rlhf":
            continue
        config = f"SmolLM2 SFT step {r['batch']}x{r['seq']} fp32, {r['mode']}" + ("" if r["mode"] == "full" else
                                                                                " r=16 all-linear")
        tokens = r["batch"] * r["seq"]
        theirs = step_rate(peft_row, tokens) if peft_row else None
        out.append(line("lora", config, "tokens/s", step_rate(r, tokens), theirs, "transformers+PEFT LoRA",
                        r.get("speedup_vs_peft"), "faster", 0))
        out.append(line("lora", config, "peak RSS MB/rank", r["peak_rss_mb_per_rank"],
                        peft_row["peak_rss_mb_per_rank"] if peft_row else None, "transformers+PEFT LoRA",
                        r.get("peak_rss_vs_peft"), "memory", 0))
    return out


def summarize_data(rows):
    out = []
    for r in rows:
        config = f"{r['samples'] // 1000}k chat samples, world {r['world']}"
        old = "in-memory loader (extrapolated)"
        out.append(line("data", config, "cached start s/rank", r["cached_s_per_rank"], r["old_s_per_rank_extrapolated"],
                        old, r["speedup_vs_old"], "faster", 2))
        out.append(line("data", config, "data memory growth MB/rank", r["cached_rss_mb_per_rank"],
                        r["old_rss_mb_per_rank_extrapolated"], old,
                        r["cached_rss_mb_per_rank"] / max(r["old_rss_mb_per_rank_extrapolated"], 1e-9), "memory", 0))
        out.append(line("data", config, "first run (cache build) s (extrapolated)", r["cold_s_extrapolated"],
                        r["old_s_per_rank_extrapolated"], old,
                        r["old_s_per_rank_extrapolated"] / r["cold_s_extrapolated"], "faster", 0))
    return out


SUMMARIZERS = {"train_step": summarize_train_step, "memory": summarize_memory, "mfu": summarize_mfu, "model_size": summarize_model_size,
               "generate": summarize_generate, "ring_attention": summarize_ring_attention,
               "ring_attention_sweep": lambda rows: summarize_ring_attention(rows, sweep=True),
               "load": summarize_load, "comm": summarize_comm, "lora": summarize_lora,
               "grpo_step": summarize_grpo_step, "dpo_step": summarize_dpo_step, "data": summarize_data}


def summary_table(results: dict) -> list[dict]:
    table = []
    for name, entry in results.items():
        if entry.get("rows"):
            table += SUMMARIZERS[name](entry["rows"])
    return table


def ratio_text(row) -> str:
    if row["ratio"] is None:
        return ""
    word = {"faster": "x faster", "memory": "x memory", "of minimum": "x minimum",
            "of peak": "x peak"}.get(row["ratio_kind"], "x")
    return f"{row['ratio']:.2f}{word}"


def table_markdown(table: list[dict]) -> str:
    lines = ["| benchmark | configuration | metric | llama_rlhf | competitor | vs competitor |",
             "|---|---|---|---:|---:|---:|"]
    for r in table:
        competitor = f"{fmt(r['competitor'], r['digits'])} ({r['competitor_name']})" if r["competitor"] is not None \
            else ""
        lines.append(f"| {r['benchmark']} | {r['configuration']} | {r['metric']} | {fmt(r['ours'], r['digits'])} | "
                     f"{competitor} | {ratio_text(r)} |")
    return "\n".join(lines)


def table_text(table: list[dict]) -> str:
    head = ("benchmark", "configuration", "metric", "llama_rlhf", "competitor", "vs competitor")
    body = [(r["benchmark"], r["configuration"], r["metric"], fmt(r["ours"], r["digits"]),
             fmt(r["competitor"], r["digits"]) if r["competitor"] is not None else "", ratio_text(r)) for r in table]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + body)


# ---------------------------------------------------------------------------------------------------------
# targets (issues 9 and 13)
# ---------------------------------------------------------------------------------------------------------

def target(name: str, goal: str, figures: list[tuple[str, float | None]], ok) -> dict:
    measured = [(label, value) for label, value in figures if value is not None]
    status = "not measured" if not measured else ("met" if all(ok(v) for _, v in measured) else "missed")
    return {"target": name, "goal": goal, "status": status,
            "figures": {label: round(value, 3) for label, value in measured}}


def evaluate_targets(results: dict) -> list[dict]:
    rows = {name: entry.get("rows") or [] for name, entry in results.items()}
    train = {r["dtype"]: r.get("speedup_vs_transformers") for r in rows.get("train_step", [])
             if r["impl"] == "llama_rlhf" and r["mp"] == 1 and r.get("status", "ok") == "ok"}
    mfu = {r["dtype"]: r["mfu"] for r in rows.get("mfu", [])
           if r["kind"] == "train_step" and r["impl"] == "llama_rlhf" and r["mp"] == 1}
    # generation: fp32 on the whole machine (both sides on every core the run used), one thread alongside
    gen_fp32 = [r for r in rows.get("generate", []) if r.get("dtype", "float32") == "float32"]
    most = max((r.get("threads", 1) for r in gen_fp32), default=1)
    gen = {r["batch"]: r["speedup_vs_transformers"] for r in gen_fp32 if r.get("threads", 1) == most}
    gen_one = {r["batch"]: r["speedup_vs_transformers"] for r in gen_fp32 if r.get("threads", 1) == 1}
    on_one = lambda batch: ({"also": {"one thread": round(gen_one[batch], 3)}}  # noqa: E731
                            if most > 1 and batch in gen_one else {})
    threads = f"{most} thread{'s' if most > 1 else ''}"
    load3 = next((r for r in rows.get("load", []) if r["impl"] == "llama_rlhf" and r["mp"] == 3
                  and r["status"] == "ok"), None)
    grpo = [r for r in rows.get("grpo_step", []) if r["beta"] == 0.0 and not variant_label(r)]
    zero_bf16 = [r for r in rows.get("memory", []) if r.get("kind") != "mfu" and r["zero_stage"] == 1]
    data = [r for r in rows.get("data", []) if r["samples"] >= 1_000_000]
    return [
        target("training throughput", ">= 1.3x transformers tokens/s, same dtype, MP=1",
               [(f"{d} speedup", v) for d, v in sorted(train.items())], lambda v: v >= 1.3),
        target("MFU", ">= 70% of the measured matmul peak",
               [(f"{d} MFU", v) for d, v in sorted(mfu.items())], lambda v: v >= 0.70),
        target("generation", f">= 2x transformers generate tokens/s at batch 16 (fp32, {threads} on both sides)",
               [("batch 16 speedup", gen.get(16))], lambda v: v >= 2.0) | on_one(16),
        target("generation batch 1", f">= 1.5x transformers generate tokens/s at batch 1 (fp32, {threads} on "
               "both sides)", [("batch 1 speedup", gen.get(1))], lambda v: v >= 1.5) | on_one(1),
        target("load memory", "per-rank peak RSS at MP=3 <= 0.45x MP=1",
               [("absolute peak ratio", load3["peak_ratio_vs_mp1"] if load3 else None)], lambda v: v <= 0.45)
        | {"also": {"increase over pre-load baseline ratio": round(load3["increase_ratio_vs_mp1"], 3)}
           if load3 else {}},
        target("GRPO step", ">= 2.5x faster than TRL GRPOTrainer",
               [("beta 0 speedup", grpo[0]["speedup_vs_trl"] if grpo else None)], lambda v: v >= 2.5),
        target("stage-1 bytes per parameter", "bf16 zero stage 1 <= 6 + 12/(DP x SP) bytes per local parameter",
               [(f"DP={r['dp']} measured / bound", r["bytes_per_param"] / (6 + 12 / r["dp"]))
                for r in zero_bf16 if r["dtype"] == "bfloat16"], lambda v: v <= 1.0),
        target("stage-1 step time", "zero stage 1 step within 5% of stage 0 at the same layout",
               [(f"DP={r['dp']} {r['dtype']} stage 1 / stage 0", r["step_time_vs_stage0"]) for r in zero_bf16],
               lambda v: v <= 1.05),
        target("data cached start", "a cached start of 1M samples <= 10 s per rank (world 2)",
               [("1M cached start s", data[0]["cached_s_per_rank"] if data else None)], lambda v: v <= 10.0),
        target("data memory", "per-rank memory growth for 1M samples' data <= 200 MB",
               [("1M growth MB/rank", data[0]["cached_rss_mb_per_rank"] if data else None)], lambda v: v <= 200.0),
    ]


def targets_markdown(targets: list[dict]) -> str:
    lines = []
    for t in targets:
        figures = ", ".join(f"{k} {v:g}" for k, v in t["figures"].items())
        extra = ", ".join(f"{k} {v:g}" for k, v in t.get("also", {}).items())
        lines.append(f"- **{t['target']}** ({t['goal']}): **{t['status']}**"
                     + (f" — {figures}" if figures else "") + (f" ({extra})" if extra else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# plot and files
# ---------------------------------------------------------------------------------------------------------

def plot(results: dict, path: str) -> str | None:
    """Throughput and memory against layout (train step, load) and sequence length (ring attention)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = {name: entry.get("rows") or [] for name, entry in results.items()}
    ring = [r for r in rows.get("ring_attention", []) + rows.get("ring_attention_sweep", [])
            if r["kernel"] == "cpu_flash"]
    train = [r for r in rows.get("train_step", []) if r.get("status", "ok") == "ok"]
    load = [r for r in rows.get("load", []) if r["status"] == "ok"]
    if not (ring or train or load):
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_tp, ax_mem), (ax_seq_tp, ax_seq_mem) = axes

    labels, tps, rss = [], [], []
    for r in train:
        short = {"float32": "fp32", "bfloat16": "bf16"}.get(r["dtype"], r["dtype"])
        labels.append(f"{'HF' if r['impl'] == 'transformers' else 'ours'}\n{short} MP{r['mp']}")
        tps.append(r["tokens_per_s"])
        rss.append(r["peak_rss_mb_per_rank"])
    colors = ["tab:gray" if lab.startswith("HF") else "tab:blue" for lab in labels]
    ax_tp.bar(range(len(labels)), tps, color=colors)
    ax_tp.set_xticks(range(len(labels)), labels, fontsize=8)
    ax_tp.set_ylabel("tokens/s")
    ax_tp.set_title("train step throughput by layout (SmolLM2-135M"
                    + (f", {train[0]['batch']}x{train[0]['seq']} tokens)" if train else ")"))

    mem_labels = [lab for lab in labels] + [f"load {'HF' if r['impl'] == 'transformers' else 'ours'}\nMP{r['mp']}"
                                            for r in load]
    mem_values = rss + [r["peak_rss_mb_per_rank"]["median"] for r in load]
    mem_colors = colors + ["tab:gray" if r["impl"] == "transformers" else "tab:orange" for r in load]
    ax_mem.bar(range(len(mem_labels)), mem_values, color=mem_colors)
    ax_mem.set_xticks(range(len(mem_labels)), mem_labels, fontsize=7)
    ax_mem.set_ylabel("peak RSS MB per rank")
    ax_mem.set_title("peak RSS per rank: train step (blue), load (orange), HF (grey)")

    for sp in sorted({r["sp"] for r in ring}):
        points = sorted((r["seq_len_tokens"], r) for r in ring if r["sp"] == sp)
        seqs = [s for s, _ in points]
        ax_seq_tp.plot(seqs, [s / (r["fwd_bwd_ms"] / 1000) for s, r in points], marker="o", label=f"SP={sp}")
        ax_seq_mem.plot(seqs, [r["peak_mb_per_rank"] for _, r in points], marker="o", label=f"SP={sp}")
    for ax, ylabel, title in ((ax_seq_tp, "tokens/s (fwd+bwd)", "ring attention throughput vs sequence length"),
                              (ax_seq_mem, "peak MB per rank", "ring attention memory vs sequence length")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ring:
            ax.legend()
    for ax, empty in ((ax_tp, not train), (ax_mem, not (train or load)), (ax_seq_tp, not ring), (ax_seq_mem, not ring)):
        if empty:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_results(results: dict, facts: dict, meta: dict, out_dir: str, stem: str) -> dict:
    """Write <stem>.json, <stem>.md and <stem>.png in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    table = summary_table(results)
    targets = evaluate_targets(results)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    png = plot(results, os.path.join(out_dir, stem + ".png"))
    if png:
        paths["png"] = png
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"machine": facts, **meta, "benchmarks": results, "table": table, "targets": targets}, f,
                  indent=1, default=str)
    md = [f"# Benchmarks: {stem}", "",
          f"`python -m benchmarks{' --quick' if meta.get('quick') else ''}` — {meta.get('started', '')}, "
          f"{meta.get('seconds', 0):.0f} s, load average before {meta.get('load_before')} / after "
          f"{meta.get('load_after')} (1, 5, 15 min; {facts['usable_cores']} cores).", "",
          "## Machine", ""]
    md += [f"- {k}: {v}" for k, v in facts.items()]
    md += ["", "## Summary", "",
           "Figures: median [min-max] over the timed runs. Ratios: 'x faster' = the competitor's time / ours "
           "(or our rate / theirs); 'x memory' = ours / theirs; 'x minimum' = measured / theoretical.", "",
           table_markdown(table), "", "## Targets", "", targets_markdown(targets), ""]
    if png:
        md += [f"![throughput and memory]({os.path.basename(png)})", ""]
    md += ["## Per benchmark", ""]
    for name, entry in results.items():
        md += [f"### {name}", "", f"{entry['seconds']} s, load average {entry['load_before']} -> "
                                  f"{entry['load_after']}", ""]
        if entry.get("error"):
            md += ["```", "error: " + entry["error"], "```", ""]
        text = detail_text(name, entry.get("rows") or [])
        if text:
            md += ["```", text, "```", ""]
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small configurations (under 10 minutes on 2 cores)")
    p.add_argument("--only", default=None,
                   help=f"comma list of benchmarks (default all: {', '.join(BENCHMARKS)}, ring_attention_sweep)")
    p.add_argument("--machine", default=None, help="results file name (default: CPU model and core count)")
    p.add_argument("--out", default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    names = list(BENCHMARKS) + ["ring_attention_sweep"]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SUMMARIZERS]
        if unknown:
            p.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(SUMMARIZERS)}")
    facts = machine_facts()
    stem = ((args.machine or machine_name(facts)) + ("-" + "-".join(names) if args.only else "")
            + ("-quick" if args.quick else ""))
    meta = {"quick": args.quick, "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_before": load_average()}
    start = time.perf_counter()
    results = {}
    for name in names:
        print(f"== {name} (load average {load_average()})", flush=True)
        results[name] = run_one(name, args.quick, results)
        entry = results[name]
        if entry.get("error"):
            print(f"   failed: {entry['error'].splitlines()[0]}", flush=True)
        else:
            print(detail_text(name, entry["rows"]), flush=True)
        print(f"   {entry['seconds']} s", flush=True)
    meta.update(seconds=time.perf_counter() - start, load_after=load_average())
    paths = write_results(results, facts, meta, args.out, stem)
    print()
    print(table_text(summary_table(results)))
    print()
    print(targets_markdown(evaluate_targets(results)))
    print(f"\n{meta['seconds']:.0f} s; wrote {', '.join(paths.values())}")


if __name__ == "__main__":
    main()
