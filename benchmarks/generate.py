"""Greedy decoding throughput: this framework's generate vs transformers' generate, same prompts, same run.

SmolLM2-135M-Instruct in fp32 and in bf16 (weights loaded in that dtype on both sides; MP=1, one process),
chat prompts of mixed lengths, batch 1, 16 and 64, 128 new tokens each (no early stop: end tokens are ignored
on both sides), greedy. tokens/s counts new tokens over the wall time of the whole generate call (prefill and,
on CPU, the weight packing of inference/packed.py included, but our model is frozen as in solver_generate, so
after the first call at a batch size the packed copies are reused), best of two interleaved runs. One torch
thread on both sides, and in the full run fp32 again with two threads (the whole 2-core machine here). The greedy
outputs are compared (fraction of tokens before the first difference); each row records the 1-minute load
average when it was measured. The chat prompts share SmolLM2's system prompt (24 of their 31-42 tokens), which our
prefill runs once per batch (inference/prefix.py) and transformers once per prompt; the full run also times our
side with every prompt prefilled whole at batch 16 and 64 (fp32, one thread), so that lever shows on its own.

    python -m benchmarks.generate [--quick] [--unpacked] [--whole_prefill] [--threads 1,2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUESTIONS = ["What is 2+2?", "Write a haiku about the sea.", "Hi", "List three colours and explain why people like them.",
             "Explain photosynthesis to a child.", "What is the capital of France?",
             "Give me a recipe for pancakes with blueberries and maple syrup.", "Tell me a joke."]


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    prompts = []
    for i in range(batch):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                            add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


def time_hf(model, tokenizer, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    import torch
    from transformers import GenerationConfig
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    model.generation_config.eos_token_id = None  # otherwise merged in from the checkpoint: run all new_tokens
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, generation_config=config)
    seconds = time.perf_counter() - start
    return seconds, out[:, batch["input_ids"].shape[1]:].tolist()


def time_ours(model, ps, prompts, new_tokens: int, pack: bool = True,
              share: bool = True) -> tuple[float, list[list[int]]]:
    from llama_rlhf.inference.engine import generate
    from llama_rlhf.inference.sampling import SamplingParams
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    start = time.perf_counter()
    out = generate(model, prompts, params, end_ids=(), ps=ps, max_batch_size=len(prompts), pack_weights=pack,
                   share_prefixes=share)
    seconds = time.perf_counter() - start
    return seconds, [c[0].token_ids for c in out]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's tokens equal before the first difference (fp32 near-ties may flip a token
    late in a long greedy run; everything after that legitimately differs)."""
    total = 0.0
    for x, y in zip(a, b):
        same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        total += same / max(len(x), 1)
    return total / len(a)


def run(quick: bool = False, threads: tuple[int, ...] | None = None, pack: bool = True,
        share: bool = True) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, ROOT)
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.parallel.cpu_allocator import keep_freed_memory
    from llama_rlhf.parallel.state import single_process_state
    from tools.fetch_smollm2 import ensure_smollm2

    model_dir = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ps = single_process_state()
    batches, new_tokens, repeats = ((1, 16), 32, 2) if quick else ((1, 16, 64), 128, 2)
    rows = []
    settings = [(n, torch.float32) for n in threads] if threads else (
        [(1, torch.float32), (1, torch.bfloat16)] + ([] if quick else [(2, torch.float32)]))
    for n_threads, dtype in settings:
        torch.set_num_threads(n_threads)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        ours = load_pretrained(model_dir, "llama-hf", ps, dtype=dtype).requires_grad_(False)  # as solver_generate
        keep_freed_memory(ps.device)  # generate does this too; before HF's first run, so both sides get it
        time_ours(ours, ps, chat_prompts(tokenizer, 2), 4, pack, share)  # warm-up
        time_hf(hf, tokenizer, chat_prompts(tokenizer, 2), 4)
        for batch in batches:
            prompts = chat_prompts(tokenizer, batch)
            # the shared-prefix lever on its own: the same call with every prompt prefilled whole
            lever = share and not quick and batch > 1 and n_threads == 1 and dtype == torch.float32
            hf_times, our_times, whole_times = [], [], []
            for _ in range(repeats):  # interleaved, best of ``repeats``: the machine may be shared
                hf_s, hf_out = time_hf(hf, tokenizer, prompts, new_tokens)
                our_s, our_out = time_ours(ours, ps, prompts, new_tokens, pack, share)
                hf_times.append(hf_s)
                our_times.append(our_s)
                if lever:
                    whole_times.append(time_ours(ours, ps, prompts, new_tokens, pack, share=False)[0])
            hf_s, our_s = min(hf_times), min(our_times)
            tokens = batch * new_tokens
            rows.append({"benchmark": "generate", "model": "SmolLM2-135M-Instruct", "dtype": str(dtype).split(".")[1],
                         "mp": 1, "batch": batch, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
                         "packed_weights": pack, "transformers_tokens_per_s": tokens / hf_s,
                         "llama_rlhf_tokens_per_s": tokens / our_s, "speedup_vs_transformers": hf_s / our_s,
                         "transformers_s": hf_s, "llama_rlhf_s": our_s, "greedy_agreement": agreement(hf_out, our_out),
                         "shared_prefixes": share, "load_average_1min": os.getloadavg()[0]})
            if whole_times:
                rows[-1].update(whole_prefill_tokens_per_s=tokens / min(whole_times),
                                whole_prefill_speedup_vs_transformers=hf_s / min(whole_times))
        del hf, ours
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'dtype':>9}{'thr':>4}{'batch':>6}{'new':>5}{'transformers tok/s':>20}{'llama_rlhf tok/s':>18}{'speedup':>9}"
          f"{'agree':>7}{'load':>6}{'whole-prompt prefill':>22}")
    for r in rows:
        whole = (f"{r['whole_prefill_tokens_per_s']:>13.1f} {r['whole_prefill_speedup_vs_transformers']:>6.2f}x"
                 if "whole_prefill_tokens_per_s" in r else "")
        print(f"{r['dtype']:>9}{r.get('threads', 1):>4}{r['batch']:>6}{r['new_tokens']:>5}{r['transformers_tokens_per_s']:>20.1f}"
              f"{r['llama_rlhf_tokens_per_s']:>18.1f}{r['speedup_vs_transformers']:>8.2f}x"
              f"{r['greedy_agreement']:>7.2f}{r.get('load_average_1min', float('nan')):>6.1f}{whole:>22}")  # old rows: no load


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1 and 16, 32 new tokens")
    p.add_argument("--threads", default=None,
                   help="comma-separated torch thread counts for both sides, fp32 only (default: 1 thread fp32 and "
                        "bf16, then 2 threads fp32 in the full run)")
    p.add_argument("--unpacked", action="store_true",
                   help="our side without oneDNN-packed weights (generate(pack_weights=False)), to measure that lever")
    p.add_argument("--whole_prefill", action="store_true",
                   help="our side prefills every prompt whole (generate(share_prefixes=False)); by default the full "
                        "run also times that at batch 16 and 64, fp32, one thread, to measure the shared prefix")
    args = p.parse_args()
    threads = tuple(int(n) for n in args.threads.split(",")) if args.threads else None
    print_table(run(args.quick, threads, not args.unpacked, not args.whole_prefill))


if __name__ == "__main__":
    main()
