"""Run plots from metrics.jsonl: ``python -m llama_rlhf.plot LOG_DIR [--out PNG]``.

SFT runs: loss (and eval loss), learning rate, gradient norm, tokens per second. GRPO runs: mean reward and the
reward per function, KL, clip fraction, completion length, and the evaluation scores (eval/mean@n, eval/pass@k,
eval/maj@n) when the run had --eval_file. Preference (DPO) runs: loss, implicit rewards of the chosen and rejected
responses, their margin, preference accuracy (chosen reward > rejected), response log-probs and the gradient norm,
each with its --eval_file counterpart (eval_*) where the run evaluated. matplotlib is needed only here (an
optional import).
"""
from __future__ import annotations

import argparse
import os

from .jsonl import read_jsonl
from .runtime import UsageError, run_main


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that hold a number under ``key``."""
    pts = [(r["step"], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and "step" in r]
    return [s for s, _ in pts], [v for _, v in pts]


def panels(records: list[dict]) -> tuple[str, list[tuple[str, list[str]]]]:
    """The run's kind (sft, grpo or dpo) and its panels as (title, metric keys)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    if "rewards/margins" in keys:
        both = lambda *names: [p + n for n in names for p in ("", "eval_")]  # noqa: E731
        return "dpo", [("loss", both("loss")), ("rewards (beta x log-ratio to the reference)",
                                                 both("rewards/chosen", "rewards/rejected")),
                       ("reward margin (chosen - rejected)", both("rewards/margins")),
                       ("preference accuracy (chosen reward > rejected)", both("rewards/accuracies")),
                       ("response log-probs", both("logps/chosen", "logps/rejected")),
                       ("gradient norm", ["grad_norm"])]
    if "reward_mean" in keys:
        evals = [k for k in keys if k.startswith("eval/") and k.split("/", 1)[1].split("@")[0] in ("mean", "pass", "maj")]
        out = [("reward", ["reward_mean"] + [k for k in keys if k.startswith("reward/")]),
               ("KL to the reference", ["kl"]), ("clip fraction", ["clip_low", "clip_high"]),
               ("completion length (tokens)", ["completion_len_mean", "completion_len_max"])]
        if evals:
            out.append(("held-out accuracy", evals))
        return "grpo", out
    return "sft", [("loss", ["loss", "eval_loss"]), ("learning rate", ["lr"]), ("gradient norm", ["grad_norm"]),
                   ("tokens per second", ["tokens_per_s"])]


def label(key: str) -> str:
    return key.rsplit(":", 1)[-1] if ":" in key else key  # user rewards: the function name, not the whole path


def plot_run(log_dir: str, out: str | None = None) -> str:
    """Draw ``log_dir/metrics.jsonl``'s panels into a PNG (default ``log_dir/metrics.png``); returns its path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("python -m llama_rlhf.plot needs matplotlib: pip install matplotlib") from None
    path = os.path.join(log_dir, "metrics.jsonl")
    records = [obj for _, obj in read_jsonl(path)]
    if not any("step" in r for r in records):
        raise UsageError(f"{path} holds no step records to plot")
    kind, chosen = panels(records)
    chosen = [(title, [k for k in keys if series(records, k)[0]]) for title, keys in chosen]
    chosen = [(title, keys) for title, keys in chosen if keys]
    cols = 2
    rows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, chosen):
        for key in keys:
            steps, values = series(records, key)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label(key))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.suptitle(f"{kind.upper()} run: {os.path.abspath(log_dir)}", fontsize=10)
    fig.tight_layout()
    out = out or os.path.join(log_dir, "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log_dir", help="a run's --log_dir (the folder holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG to write (default: LOG_DIR/metrics.png)")
    args = p.parse_args(argv)
    print(f"wrote {plot_run(args.log_dir, args.out)}")


if __name__ == "__main__":
    run_main(main)
