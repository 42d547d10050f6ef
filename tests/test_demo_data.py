"""The built-in demo data: make_demo_data.py reproduces every committed file byte for byte, and the GRPO demo's
train and held-out splits are disjoint (no shared prompt, no shared operand pair in either order); the
last_number reward the demo trains with, against hand-made completions."""
import importlib.util
import json
import os
import re

import pytest

from llama_rlhf.rewards import build_rewards, last_number, last_number_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "data")
FILES = ("sft_arithmetic.jsonl", "grpo_arithmetic.jsonl", "prompts.jsonl", "dpo_arithmetic.jsonl",
         "dpo_arithmetic_heldout.jsonl",
         "grpo_train.jsonl", "grpo_heldout.jsonl")
SUM = re.compile(r"^What is (\d+) \+ (\d+)\?$")


def load_script():
    spec = importlib.util.spec_from_file_location("make_demo_data", os.path.join(ROOT, "examples", "make_demo_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def operands(record):
    m = SUM.match(record["instruction"])
    assert m, record
    a, b = int(m.group(1)), int(m.group(2))
    assert record["answer"] == str(a + b), record
    return a, b


def test_script_reproduces_committed_files(tmp_path):
    load_script().main(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(FILES)
    for name in FILES:
        with open(os.path.join(DATA, name), "rb") as f, open(tmp_path / name, "rb") as g:
            assert f.read() == g.read(), f"examples/data/{name} differs from make_demo_data.py's output"


def test_grpo_splits_disjoint():
    train, heldout = read("grpo_train.jsonl"), read("grpo_heldout.jsonl")
    train_pairs = {frozenset(operands(r)) for r in train}
    heldout_pairs = {frozenset(operands(r)) for r in heldout}
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in heldout}
    assert not train_pairs & heldout_pairs
    # 78 unordered pairs of 1..12: 24 held out (one order each), the other 54 trained in both orders
    assert len(heldout) == len(heldout_pairs) == 24
    assert len(train_pairs) == 54 and len(train) == 54 * 2 - len([p for p in train_pairs if len(p) == 1])
    assert len(train_pairs | heldout_pairs) == 78
    assert all(1 <= x <= 12 for r in train + heldout for x in operands(r))


@pytest.mark.parametrize("text, expected", [
    ("4 + 9 = 13", "13"), ("5-3 is 2.", "2"), ("It is -4.", "-4"), ("1,000 apples", "1,000"),
    ("x = 2.5.", "2.5"), ("13, no wait: 12", "12"), ("no digits here", None), ("", None)])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_last_number_reward():
    sample = {"answer": "13"}
    assert last_number_reward("4 + 9 = 13", sample) == 1.0
    assert last_number_reward("The answer is 13.", sample) == 1.0
    assert last_number_reward("13.0", sample) == 1.0  # numeric comparison, as accuracy
    assert last_number_reward("13 + 1 = 14", sample) == 0.0  # only the last number counts
    assert last_number_reward("thirteen", sample) == 0.0
    assert last_number_reward("1,000", {"answer": "1000"}) == 1.0
    [(name, fn, weight)] = build_rewards("last_number", None)
    assert (name, fn, weight) == ("last_number", last_number_reward, 1.0)
    assert fn.required_fields == ("answer",)
