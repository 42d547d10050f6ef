"""glibc malloc tuning for CPU training: freed large blocks stay in the process (no page faults next step)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import json, sys, torch
from llama_rlhf.parallel.cpu_allocator import keep_freed_memory
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:"))
applied = keep_freed_memory(torch.device(sys.argv[1]))
before = rss_mb()
block = torch.ones(64 * 2**20)  # 256 MB, touched
del block
print(json.dumps({"applied": applied, "kept_mb": rss_mb() - before}))
"""


def probe(device: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, device], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT, **env), check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_memory_is_kept_on_cpu():
    tuned = probe("cpu")
    assert tuned["applied"] is True
    assert tuned["kept_mb"] > 200, tuned  # the freed 256 MB block stays resident for reuse


def test_defaults_untouched_when_disabled_or_not_cpu():
    for result in (probe("cpu", LLAMA_RLHF_MALLOC_TUNING="0"), probe("meta")):
        assert result["applied"] is False
        assert result["kept_mb"] < 50, result  # glibc returns the freed block to the system
