"""GPU check: the package's CUDA paths on one GPU in a few minutes; figures to gpu_check.json and gpu_check.md.

    bash scripts/gpu_check.sh SMOLLM2_DIR [OUT_DIR]          # or: python tools/gpu_check.py --smollm2 DIR

Needs one CUDA GPU with torch (2.11+), transformers and safetensors installed; no network. Sections:
logits of three tiny random families (Llama, Mistral with a sliding window, Gemma 2) in fp32 and bf16 against
transformers; greedy generation of SmolLM2 token for token against transformers; SFT (bf16 and fp16) and GRPO
steps at world 1 (losses finite, SFT's falling); train-step tokens/s and MFU against the measured bf16 matmul
peak, next to transformers + AdamW, on SmolLM2 and a ~1B random Llama; generation tokens/s at batch 1/16/64
against transformers' generate; peak memory of each. Exit status 0 only when every check passed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.gpu_report import write_report  # noqa: E402

NO_CUDA = "gpu_check: no CUDA device"
DEVICE = "cuda"  # (a CPU smoke test of this script sets "cpu")


def require_cuda():
    """torch, with a CUDA device, or a one-line exit naming what is missing."""
    import torch
    if not torch.cuda.is_available():
        raise SystemExit(f"{NO_CUDA}: torch {torch.__version__} (built for CUDA {torch.version.cuda or 'none'}) "
                         f"sees no GPU; run this on a machine with one (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ps():
    import torch
    from llama_rlhf.parallel.state import single_process_state
    return single_process_state(torch.device(DEVICE))


def _peak_mb(torch) -> float:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _fresh(torch) -> None:
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------------------------

TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral (window 16)": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "gemma2 (window 16, softcaps)": ("Gemma2Config", "Gemma2ForCausalLM",
                                      {"sliding_window": 16, "head_dim": 16, "query_pre_attn_scalar": 16}),
}


def parity(torch, work: str) -> list[dict]:
    """fp32 (TF32 off) and bf16 logits of tiny random models vs transformers on the same inputs."""
    import transformers
    from llama_rlhf.models.families import detect_model_type
    from llama_rlhf.models.pretrained import load_pretrained
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name, (config_cls, model_cls, extra) in TINY.items():
        folder = os.path.join(work, name.split()[0])
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256, **extra)
        getattr(transformers, model_cls)(config).save_pretrained(folder)
        ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        model_type = detect_model_type(folder)
        with torch.no_grad():
            hf32 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                     attn_implementation="eager").to(DEVICE).eval()
            want = hf32(ids).logits.float()
            del hf32
            for dtype in (torch.float32, torch.bfloat16):
                _fresh(torch)
                ours = load_pretrained(folder, model_type, _ps(), dtype=dtype).eval()
                got = ours(ids).float()[..., :512]
                row = {"model": name, "dtype": str(dtype).replace("torch.", ""),
                       "max_abs_diff": (got - want).abs().max().item(), "max_abs_logit": want.abs().max().item()}
                if dtype == torch.bfloat16:
                    hf16 = transformers.AutoModelForCausalLM.from_pretrained(
                        folder, dtype=dtype, attn_implementation="eager").to(DEVICE).eval()
                    row["transformers_bf16_diff"] = (hf16(ids).logits.float() - want).abs().max().item()
                    row["ok"] = row["max_abs_diff"] <= 2 * row["transformers_bf16_diff"] + 0.02
                    del hf16
                else:
                    row["ok"] = row["max_abs_diff"] <= 1e-3 * max(1.0, row["max_abs_logit"])
                rows.append(row)
                del ours
    torch.backends.cuda.matmul.allow_tf32 = True
    return rows


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    questions = ["What is 17 + 25?", "Name three primary colours.", "Write a haiku about rain.",
                 "Explain what a prime number is in one sentence.", "How many legs does a spider have?",
                 "Give a synonym for happy.", "What is the capital of France?", "Count from 1 to 5."]
    return [tokenizer.apply_chat_template([{"role": "user", "content": questions[i % len(questions)]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for i in range(n)]


def generation_parity(torch, smollm2: str, new_tokens: int = 48) -> dict:
    """Greedy SmolLM2 in fp32 (TF32 off): our sharded engine vs transformers' generate, token for token."""
    import transformers
    from llama_rlhf.inference.engine import generate
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.inference.sampling import SamplingParams
    torch.backends.cuda.matmul.allow_tf32 = False
    _fresh(torch)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    prompts = chat_prompts(tokenizer, 6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).to(DEVICE).eval()
    end = {tokenizer.eos_token_id}
    want = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]).to(DEVICE), max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
            want.append(out[0, len(p):].tolist())
    del hf
    ours = load_pretrained(smollm2, "llama-hf", _ps(), dtype=torch.float32).eval()
    got = [c[0].token_ids for c in generate(ours, prompts, SamplingParams(0.0, max_new_tokens=new_tokens), end,
                                            _ps(), max_batch_size=len(prompts), seed=0)]
    graphed = [c[0].token_ids for c in generate(ours, prompts, SamplingParams(0.0, max_new_tokens=new_tokens), end,
                                                _ps(), max_batch_size=len(prompts), seed=0, static_decode=True)]
    torch.backends.cuda.matmul.allow_tf32 = True
    same = sum(a == b[:len(a)] or b == a[:len(b)] for a, b in zip(want, got))
    same_graphed = sum(a == b for a, b in zip(got, graphed))  # the CUDA-graph step against the dynamic one
    return {"prompts": len(prompts), "identical": same, "cuda_graph_identical": same_graphed,
            "tokens_compared": sum(len(a) for a in want),
            "ok": same == len(prompts) and same_graphed == len(prompts), "peak_mb": _peak_mb(torch)}


def _solver(script: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def training(torch, smollm2: str, work: str) -> list[dict]:
    """solver_train (bf16, fp16 with loss scaling) and solver_grpo (bf16) for a few steps on SmolLM2."""
    data = os.path.join(ROOT, "examples", "data")
    rows = []
    for dtype, steps in (("bfloat16", 12), ("float16", 12)):
        out = os.path.join(work, f"sft_{dtype}")
        proc = _solver("solver_train.py", [
            "--ckpt_dir", smollm2, "--train_file", os.path.join(data, "sft_arithmetic.jsonl"), "--save_dir", out,
            "--use_chat_template", "true", "--max_seq_len", "256", "--max_batch_size", "8", "--max_steps", str(steps),
            "--lr", "1e-4", "--lr_scheduler", "constant", "--dtype", dtype], 180)
        if proc.returncode != 0:
            raise RuntimeError(f"solver_train --dtype {dtype} failed:\n{proc.stderr[-3000:]}")
        m = _metrics(out)
        losses = [r["loss"] for r in m]
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        rows.append({"run": f"SFT {dtype}", "steps": len(m), "loss_first3": first, "loss_last3": last,
                     "skipped": sum(r["skipped"] for r in m), "tokens_per_s": m[-1]["tokens_per_s"],
                     "peak_mb": max(r["peak_memory_mb"] for r in m),
                     "ok": all(math.isfinite(x) for x in losses) and last < first
                     and sum(r["skipped"] for r in m[3:]) == 0})
    out = os.path.join(work, "grpo")
    proc = _solver("solver_grpo.py", [
        "--ckpt_dir", smollm2, "--train_file", os.path.join(data, "grpo_arithmetic.jsonl"), "--save_dir", out,
        "--use_chat_template", "true", "--max_seq_len", "320", "--reward_funcs", "accuracy,format",
        "--num_samples_per_prompt", "8", "--max_batch_size", "4", "--max_new_tokens", "64", "--max_steps", "4",
        "--lr", "1e-6", "--beta", "0.04", "--dtype", "bfloat16"], 240)
    if proc.returncode != 0:
        raise RuntimeError(f"solver_grpo failed:\n{proc.stderr[-3000:]}")
    m = _metrics(out)
    rows.append({"run": "GRPO bf16", "steps": len(m), "loss_first3": m[0]["loss"], "loss_last3": m[-1]["loss"],
                 "reward_first": m[0]["reward_mean"], "reward_last": m[-1]["reward_mean"],
                 "tokens_per_s": sum(r["tokens_per_s"] for r in m) / len(m),
                 "peak_mb": max(r["peak_memory_mb"] for r in m),
                 "ok": all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in m)})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------------------------

def _timed(torch, fn, repeats: int) -> float:
    """Seconds per call of ``fn`` (after one warm-up call), CUDA-synchronised."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def matmul_peak(torch) -> dict:
    n = 8192
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    seconds = _timed(torch, lambda: a @ b, 20)
    return {"shape": f"{n}x{n}x{n}", "tflops": 2 * n ** 3 / seconds / 1e12}


def _random_llama_1b(work: str) -> str:
    from benchmarks.model_size import save_random_llama
    folder = os.path.join(work, "llama_1b")
    save_random_llama(folder, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=5632)
    return folder


def _batch(torch, vocab: int, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels.roll(-1, 1), "position_ids": torch.arange(seq).repeat(batch, 1),
            "segment_ids": torch.zeros(batch, seq, dtype=torch.long)}


def _train_ours(torch, folder: str, batch: dict, steps: int) -> tuple[float, float, object]:
    from llama_rlhf.models.families import detect_model_type
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.training.distributed_optimizer import DistributedAdamW
    from llama_rlhf.training.sft import forward_loss_sum
    ps = _ps()
    model = load_pretrained(folder, detect_model_type(folder), ps).train()
    opt = DistributedAdamW(model, ps, stage=0, lr=1e-5)
    tokens = int((batch["labels"] != -100).sum())

    def step():
        opt.start_micro_batch(last=True)
        (forward_loss_sum(model, batch, ps, torch.bfloat16, False) / tokens).backward()
        opt.step(1.0)

    seconds = _timed(torch, step, steps)
    cfg = model.cfg
    del model, opt
    return seconds, _peak_mb(torch), cfg


def _train_hf(torch, folder: str, batch: dict, steps: int) -> tuple[float, float]:
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="sdpa").to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids, labels = batch["input_ids"].to(DEVICE), batch["input_ids"].to(DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _timed(torch, step, steps)
    del model, opt
    return seconds, _peak_mb(torch)


def train_speed(torch, smollm2: str, work: str, peak_tflops: float) -> list[dict]:
    from benchmarks.mfu import train_flops_per_token
    rows = []
    for name, folder, (b, s) in (("SmolLM2-135M", smollm2, (8, 1024)), ("Llama ~1B (random)", None, (4, 1024))):
        folder = folder or _random_llama_1b(work)
        batch = _batch(torch, 49152, b, s)
        _fresh(torch)
        ours_s, ours_mb, cfg = _train_ours(torch, folder, batch, 5)
        _fresh(torch)
        hf_s, hf_mb = _train_hf(torch, folder, batch, 5)
        flops = train_flops_per_token(cfg, s)
        for impl, seconds, mb in (("ours", ours_s, ours_mb), ("transformers+AdamW", hf_s, hf_mb)):
            tps = b * s / seconds
            rows.append({"model": name, "impl": impl, "batch_x_seq": f"{b}x{s}", "tokens_per_s": tps,
                         "mfu": tps * flops / (peak_tflops * 1e12), "peak_mb": mb})
        rows[-2]["vs_transformers"] = hf_s / ours_s
        _fresh(torch)
    return rows


def generation_speed(torch, smollm2: str, new_tokens: int = 64) -> list[dict]:
    import transformers
    from llama_rlhf.inference.engine import generate
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.inference.sampling import SamplingParams
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    tokenizer.padding_side = "left"
    rows = []
    _fresh(torch)
    ours = load_pretrained(smollm2, "llama-hf", _ps(), dtype=torch.bfloat16).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).to(DEVICE).eval()
    for batch in (1, 16, 64):
        prompts = chat_prompts(tokenizer, batch)
        params = SamplingParams(0.0, max_new_tokens=new_tokens)
        ours_s = _timed(torch, lambda: generate(ours, prompts, params, set(), _ps(), max_batch_size=batch), 2)
        graph_s = _timed(torch, lambda: generate(ours, prompts, params, set(), _ps(), max_batch_size=batch,
                                                 static_decode=True), 2)  # capture included in every call
        enc = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(DEVICE)
        with torch.no_grad():
            hf_s = _timed(torch, lambda: hf.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                     do_sample=False, pad_token_id=tokenizer.eos_token_id), 2)
        rows.append({"batch": batch, "new_tokens": new_tokens, "ours_tokens_per_s": batch * new_tokens / ours_s,
                     "cuda_graph_tokens_per_s": batch * new_tokens / graph_s,
                     "transformers_tokens_per_s": batch * new_tokens / hf_s, "vs_transformers": hf_s / ours_s,
                     "cuda_graph_vs_transformers": hf_s / graph_s})
    rows[-1]["peak_mb"] = _peak_mb(torch)
    return rows


# ---------------------------------------------------------------------------------------------------------------

def environment(torch) -> dict:
    import transformers
    try:
        import flash_attn
        flash = flash_attn.__version__
    except Exception:  # noqa: BLE001 - optional
        flash = "not installed"
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "flash_attn": flash,
            "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smollm2", required=True, help="the SmolLM2-135M-Instruct HF folder (tools/fetch_smollm2.py)")
    p.add_argument("--out", default=".", help="where gpu_check.json and gpu_check.md go")
    p.add_argument("--skip", default="", help="comma list of sections to leave out (e.g. train_speed)")
    args = p.parse_args(argv)
    torch = require_cuda()
    if not os.path.isfile(os.path.join(args.smollm2, "config.json")):
        raise SystemExit(f"gpu_check: --smollm2 {args.smollm2} is not an HF folder (no config.json); "
                         f"python tools/fetch_smollm2.py prints where it is")
    skip = {s for s in args.skip.split(",") if s}
    t0 = time.time()
    results = {"environment": environment(torch), "errors": {}, "failures": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        sections = [("parity", lambda: parity(torch, work)),
                    ("generation_parity", lambda: generation_parity(torch, args.smollm2)),
                    ("training", lambda: training(torch, args.smollm2, work)),
                    ("matmul_peak", lambda: matmul_peak(torch)),
                    ("train_speed", lambda: train_speed(torch, args.smollm2, work,
                                                        results.get("matmul_peak", {}).get("tflops", float("nan")))),
                    ("generation_speed", lambda: generation_speed(torch, args.smollm2))]
        for name, run in sections:
            if name in skip:
                continue
            started = time.time()
            print(f"gpu_check: {name} ...", flush=True)
            try:
                results[name] = run()
            except Exception:  # noqa: BLE001 - one failing section must not hide the others' figures
                results["errors"][name] = traceback.format_exc()
                results["failures"].append(f"{name} raised")
            rows = results.get(name)
            for row in rows if isinstance(rows, list) else [rows] if rows else []:
                if row.get("ok") is False:
                    what = " ".join(str(row[k]) for k in ("model", "dtype", "run") if k in row)
                    results["failures"].append(f"{name}: {what or 'not ok'}")
            print(f"gpu_check: {name} done in {time.time() - started:.0f} s", flush=True)
            write_report({**results, "seconds": time.time() - t0, "passed": False}, args.out)  # partial figures
    results["seconds"] = time.time() - t0
    results["passed"] = not results["failures"]
    json_path, md_path = write_report(results, args.out)
    print(f"gpu_check: {'passed' if results['passed'] else 'FAILED'} in {results['seconds']:.0f} s: {md_path}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
