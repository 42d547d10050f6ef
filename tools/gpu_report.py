"""Write the GPU check's figures (tools/gpu_check.py) as gpu_check.json and a readable gpu_check.md.

    python tools/gpu_report.py gpu_check.json [OUT_DIR]     # re-render the markdown from recorded figures
"""
from __future__ import annotations

import json
import os
import sys


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def table(rows: list[dict]) -> list[str]:
    """A markdown table over the union of the rows' keys (first-seen order)."""
    if not rows:
        return ["(no rows)"]
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return lines


SECTIONS = [  # (key in the results, heading)
    ("parity", "Logits vs transformers (tiny random models)"),
    ("generation_parity", "Greedy generation vs transformers (SmolLM2)"),
    ("training", "SFT and GRPO steps at world 1 (SmolLM2)"),
    ("matmul_peak", "Measured bf16 matmul peak"),
    ("train_speed", "Train step: tokens/s and MFU vs transformers + AdamW"),
    ("generation_speed", "Generation tokens/s vs transformers' generate"),
]


def render(results: dict) -> str:
    env = results.get("environment", {})
    passed = results.get("passed")
    lines = ["# GPU check", "",
             f"{env.get('gpu', '?')} | torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}) | transformers "
             f"{env.get('transformers', '?')} | flash-attn {env.get('flash_attn', 'not installed')} | "
             f"{results.get('seconds', 0):.0f} s", "",
             f"**{'PASSED' if passed else 'FAILED'}**" + (": " + "; ".join(results["failures"])
                                                           if results.get("failures") else ""), ""]
    for key, heading in SECTIONS:
        if key not in results:
            continue
        lines += [f"## {heading}", ""]
        value = results[key]
        lines += table(value if isinstance(value, list) else [value])
        lines.append("")
    for name, error in results.get("errors", {}).items():
        lines += [f"## Error in {name}", "", "```", error.strip()[-3000:], "```", ""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: str) -> tuple[str, str]:
    """gpu_check.json (the figures) and gpu_check.md (their tables) in ``out_dir``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, "gpu_check.json"), os.path.join(out_dir, "gpu_check.md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(render(results))
    return json_path, md_path


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python tools/gpu_report.py gpu_check.json [OUT_DIR]")
    with open(sys.argv[1], encoding="utf-8") as f:
        results = json.load(f)
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(sys.argv[1]))
    print(write_report(results, out)[1])


if __name__ == "__main__":
    main()
