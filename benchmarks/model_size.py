"""How the training step's cost grows with model size: random Llama models of three sizes (SmolLM2's vocabulary
and tied embeddings), this framework vs transformers + torch AdamW at MP=1 fp32, same batch, same run.

Each model is built and saved by transformers, then each side is timed in its own process by
``benchmarks.train_step.measure`` (same worker, same steps, peak RSS its own).

    python -m benchmarks.model_size [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (hidden, layers, heads, kv heads, intermediate): head size 64, SwiGLU width ~2.7x hidden
SIZES = ((256, 4, 4, 2, 704), (512, 8, 8, 4, 1408), (768, 12, 12, 4, 2048))


def save_random_llama(folder: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> int:
    """A random LlamaForCausalLM saved as safetensors; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, tie_word_embeddings=True,
                         max_position_embeddings=2048, rope_theta=10000.0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(quick: bool = False) -> list[dict]:
    sys.path.insert(0, ROOT)
    from benchmarks.train_step import measure
    batch, seq, steps = (2, 256, 2) if quick else (2, 256, 3)
    rows = []
    for size in SIZES[:2] if quick else SIZES:
        with tempfile.TemporaryDirectory() as folder:
            params = save_random_llama(folder, *size)
            hf = measure("hf", 1, "float32", folder, batch, seq, steps)
            ours = measure("ours", 1, "float32", folder, batch, seq, steps)
        shape = dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate"), size), params_m=params / 1e6)
        rows.append(dict(hf, **shape))
        rows.append(dict(ours, **shape, speedup_vs_transformers=ours["tokens_per_s"] / hf["tokens_per_s"],
                         rss_ratio_vs_transformers=ours["peak_rss_mb_per_rank"] / hf["peak_rss_mb_per_rank"]))
    return rows


def print_table(rows):
    print(f"{'impl':<13}{'params':>9}{'hidden x layers':>17}{'tok/s':>9}{'step s (min-max)':>22}{'peak RSS MB':>13}"
          f"{'vs HF':>8}")
    for r in rows:
        ratio = f"{r['speedup_vs_transformers']:.2f}x" if "speedup_vs_transformers" in r else ""
        span = f"{r['step_s_median']:.2f} ({r['step_s_min']:.2f}-{r['step_s_max']:.2f})"
        print(f"{r['impl']:<13}{r['params_m']:>8.1f}M{r['hidden']:>11} x {r['layers']:<3}{r['tokens_per_s']:>9.0f}"
              f"{span:>22}{r['peak_rss_mb_per_rank']:>13.0f}{ratio:>8}")
    if rows:
        print(f"(random Llama models, vocab 49152 tied, MP=1 fp32, batch {rows[0]['batch']} x seq {rows[0]['seq']})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    print_table(run(p.parse_args().quick))


if __name__ == "__main__":
    main()
