"""Scores of n sampled answers per prompt (pure functions): mean@n, unbiased pass@k, maj@n, and the summary
of a scored results file.

A sample is *correct* when its value of the deciding reward (``accuracy`` when it is among the rewards, else the
first one) is >= 1. Per prompt with c correct of n samples: mean@n = c / n, and pass@k is the unbiased estimator
1 - C(n - c, k) / C(n, k) of "at least one of k samples is correct" (Chen et al. 2021, HumanEval). maj@n is the
majority vote over the samples' numeric final answers (the accuracy reward's extraction): 1 if the most common
value equals the line's numeric ``answer``; a tie between several values scores the fraction of them that are
right (the expected score of a fair tie-break); no numeric answer among the samples scores 0. Prompts whose
reference answer is not a number take no part in maj@n. Every score is the mean over prompts.
"""
from __future__ import annotations

from math import comb

from ..rewards import as_number, extract_answer, numbers_match
from ..runtime import UsageError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from c correct among n samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_vote(predicted: list[str | None], expected) -> float | None:
    """maj@n of one prompt (see the module docstring); None when ``expected`` is not a number."""
    target = as_number(str(expected))
    if target is None:
        return None
    clusters: list[list] = []  # [value, votes], values equal under numbers_match share a cluster
    for text in predicted:
        value = as_number(text) if text is not None else None
        if value is None:
            continue
        for cluster in clusters:
            if numbers_match(cluster[0], value):
                cluster[1] += 1
                break
        else:
            clusters.append([value, 1])
    if not clusters:
        return 0.0
    top = max(votes for _, votes in clusters)
    tied = [value for value, votes in clusters if votes == top]
    return sum(numbers_match(value, target) for value in tied) / len(tied)


def default_pass_k(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [k for k in (2 ** i for i in range(n.bit_length())) if k <= n]
    return ks + ([n] if n not in ks else [])


def parse_pass_k(text: str | None, n: int) -> list[int]:
    """--pass_k "1,4,8" -> [1, 4, 8], each within 1..n (n = --num_samples_per_prompt); None -> default_pass_k."""
    if text is None:
        return default_pass_k(n)
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise UsageError(f"--pass_k {text!r}: expected a comma list of integers, e.g. 1,4,8") from None
    if not ks or ks[0] < 1:
        raise UsageError(f"--pass_k {text!r}: every k must be >= 1")
    if ks[-1] > n:
        raise UsageError(f"--pass_k {ks[-1]} is larger than --num_samples_per_prompt {n}: pass@k needs at least k "
                         f"samples per prompt")
    return ks


def deciding_reward(names: list[str]) -> str:
    """The reward whose value >= 1 marks a sample correct."""
    return "accuracy" if "accuracy" in names else names[0]


def summarize(rows: list[dict], names: list[str], ks: list[int]) -> dict:
    """Scores of scored results rows (each with "rewards" {name: [per sample]}, "reward" [per sample], and for
    maj@n "answer" and "predicted_answer"): mean reward overall and per function, mean@n, pass@k, maj@n."""
    if not rows:
        raise ValueError("no rows to summarize")
    n = len(rows[0]["reward"])
    if any(len(r["reward"]) != n for r in rows):
        raise ValueError("every prompt needs the same number of samples")
    decide = deciding_reward(names)
    summary = {"prompts": len(rows), "samples_per_prompt": n, "correct_by": decide,
               "reward": sum(sum(r["reward"]) for r in rows) / (len(rows) * n)}
    for name in names:
        summary[f"reward/{name}"] = sum(sum(r["rewards"][name]) for r in rows) / (len(rows) * n)
    correct = [sum(v >= 1.0 for v in r["rewards"][decide]) for r in rows]
    summary[f"mean@{n}"] = sum(c / n for c in correct) / len(rows)
    for k in ks:
        summary[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(rows)
    if "accuracy" in names:
        votes = [majority_vote(r["predicted_answer"], r["answer"]) for r in rows]
        votes = [v for v in votes if v is not None]
        if votes:
            summary[f"maj@{n}"] = sum(votes) / len(votes)
            summary["maj_prompts"] = len(votes)
    return summary


def predicted_answers(texts: list[str]) -> list[str | None]:
    """Each completion's final answer as the accuracy reward extracts it (None: no answer)."""
    return [extract_answer(t) for t in texts]


def format_table(summary: dict) -> str:
    """The summary as a small aligned table (one score per line)."""
    head = (f"scores over {summary['prompts']} prompts x {summary['samples_per_prompt']} samples "
            f"(correct: {summary['correct_by']} >= 1)")
    lines = [head]
    for key, value in summary.items():
        if key in ("prompts", "samples_per_prompt", "correct_by", "maj_prompts"):
            continue
        note = f"  ({summary['maj_prompts']} prompts with a numeric answer)" if key.startswith("maj@") else ""
        lines.append(f"  {key:<24} {value:8.4f}{note}")
    return "\n".join(lines)
