"""Impossible layouts and broken checkpoints: a clear error on every rank, non-zero exits, no hang."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, launch_ranks
from tests.test_train import expect_failure_on_every_rank

DATA = os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir)


def run(ckpt, tmp_path, world, *extra):
    args = ["--ckpt_dir", ckpt, "--model_type", "llama-hf", "--train_file", DATA, "--save_dir",
            str(tmp_path / "out"), "--max_steps", "1", "--dtype", "float32", *extra]
    return launch_ranks("solver_train.py", args, world=world, timeout=90)


def broken_copy(src, dst, drop_key=None, config_changes=None):
    shutil.copytree(src, dst)
    if drop_key:
        tensors = load_file(os.path.join(dst, "model.safetensors"))
        del tensors[drop_key]
        save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if config_changes:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            config = json.load(f)
        config.update(config_changes)
        with open(path, "w") as f:
            json.dump(config, f)
    return dst


def test_world_not_divisible_by_mp_times_sp(tiny_model, tmp_path):
    results = run(tiny_model, tmp_path, 3, "--model_parallel_size", "2")
    expect_failure_on_every_rank(results, "world size 3 is not divisible by --model_parallel_size 2",
                                 "--sequence_parallel_size 1")


def test_heads_not_divisible_by_mp(tiny_model, tmp_path):
    results = run(tiny_model, tmp_path, 3, "--model_parallel_size", "3")
    expect_failure_on_every_rank(results, "num_attention_heads 4 is not divisible by --model_parallel_size 3")


def test_missing_key_is_named(tiny_model, tmp_path):
    ckpt = broken_copy(tiny_model, str(tmp_path / "ckpt"), drop_key="model.layers.1.mlp.up_proj.weight")
    results = run(ckpt, tmp_path, 2, "--model_parallel_size", "2")
    expect_failure_on_every_rank(results, "missing keys: model.layers.1.mlp.up_proj.weight")


def test_wrong_shape_is_named(tiny_model, tmp_path):
    ckpt = broken_copy(tiny_model, str(tmp_path / "ckpt"), config_changes={"intermediate_size": 96})
    results = run(ckpt, tmp_path, 2, "--model_parallel_size", "2")
    expect_failure_on_every_rank(results, "model.layers.0.mlp.gate_proj.weight has shape [128, 64] but the config "
                                          "gives [96, 64]")


def test_missing_checkpoint_directory(tmp_path):
    results = run(str(tmp_path / "no_such_ckpt"), tmp_path, 2)
    expect_failure_on_every_rank(results, "no_such_ckpt")
    assert all("does not exist" in r.stderr or "not found" in r.stderr for r in results)
