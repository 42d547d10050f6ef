"""scripts/gpu_check.sh on a machine without CUDA: one clear line, non-zero, nothing written; and the report
writer (tools/gpu_report.py) on recorded figures."""
import json
import os
import subprocess

from tests.launch import ROOT
from tools.gpu_report import render, write_report

RECORDED = {  # the shape tools/gpu_check.py writes (figures made up, but of the right kinds)
    "environment": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu128", "cuda": "12.8", "transformers": "4.57.1",
                    "flash_attn": "not installed", "memory_gb": 139.8},
    "errors": {}, "failures": [], "seconds": 301.4, "passed": True,
    "parity": [{"model": "llama", "dtype": "float32", "max_abs_diff": 2.1e-06, "max_abs_logit": 0.61, "ok": True},
               {"model": "mistral (window 16)", "dtype": "bfloat16", "max_abs_diff": 0.0156, "max_abs_logit": 0.6,
                "transformers_bf16_diff": 0.0117, "ok": True}],
    "generation_parity": {"prompts": 6, "identical": 6, "tokens_compared": 288, "ok": True, "peak_mb": 1310.2},
    "matmul_peak": {"shape": "8192x8192x8192", "tflops": 702.5},
    "train_speed": [{"model": "SmolLM2-135M", "impl": "ours", "batch_x_seq": "8x1024", "tokens_per_s": 151234.0,
                     "mfu": 0.241, "peak_mb": 20480.0, "vs_transformers": 1.31},
                    {"model": "SmolLM2-135M", "impl": "transformers+AdamW", "batch_x_seq": "8x1024",
                     "tokens_per_s": 115446.0, "mfu": 0.184, "peak_mb": 24576.0}],
    "generation_speed": [{"batch": 64, "new_tokens": 64, "ours_tokens_per_s": 5120.0,
                          "transformers_tokens_per_s": 2048.0, "vs_transformers": 2.5}],
}


def test_no_cuda_device_is_one_clear_line(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path / "smollm2"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("gpu_check: no CUDA device: torch "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_report_from_recorded_figures(tmp_path):
    json_path, md_path = write_report(RECORDED, str(tmp_path))
    with open(json_path) as f:
        assert json.load(f) == RECORDED
    md = open(md_path).read()
    assert md.startswith("# GPU check\n") and "NVIDIA H200 | torch 2.11.0+cu128 (CUDA 12.8)" in md
    assert "**PASSED**" in md and "flash-attn not installed | 301 s" in md
    assert "| model | dtype | max_abs_diff | max_abs_logit | ok | transformers_bf16_diff |" in md
    assert "| mistral (window 16) | bfloat16 | 0.0156 | 0.6 | yes | 0.0117 |" in md
    assert "| SmolLM2-135M | ours | 8x1024 | 151,234 | 0.241 | 20,480 | 1.31 |" in md
    assert "| 6 | 6 | 288 | yes | 1,310 |" in md and "| 8192x8192x8192 | 702 |" in md
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert len(headings) == 5  # no training section was recorded: none is rendered


def test_report_names_failures_and_errors():
    failed = {**RECORDED, "passed": False, "failures": ["parity: llama float32", "training raised"],
              "errors": {"training": "Traceback (most recent call last):\nRuntimeError: solver_train failed"},
              "parity": [{**RECORDED["parity"][0], "max_abs_diff": float("nan"), "ok": False}]}
    md = render(failed)
    assert "**FAILED**: parity: llama float32; training raised" in md
    assert "| llama | float32 | nan | 0.61 | NO |" in md
    assert "## Error in training" in md and "RuntimeError: solver_train failed" in md
