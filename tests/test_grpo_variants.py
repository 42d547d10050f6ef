"""GRPO loss variants end to end (solver_grpo.py): equal rewards under batch scaling at DP=2 take every step
(issue 20's NaN), and GSPO and CISPO raise the reward on the synthetic even-token task of tests/test_grpo.py."""
import json
import os
import re

import pytest

from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, torchrun
from tests.test_grpo import grpo_args

DATA = os.path.join(ROOT, "examples", "data", "grpo_arithmetic.jsonl")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, smollm2_dir):
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir)


def run(tiny_chat, tmp_path, name, reward_source, *extra, nproc=1):
    reward_file = tmp_path / f"{name}.py"
    reward_file.write_text(reward_source)
    out = str(tmp_path / name)
    proc = torchrun("solver_grpo.py", grpo_args(tiny_chat, DATA, out, f"{reward_file}:reward", *extra), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], proc.stdout


def test_equal_rewards_with_batch_scaling_at_dp2_take_every_step(tiny_chat, tmp_path):
    metrics, stdout = run(tiny_chat, tmp_path, "constant", "def reward(completion, sample):\n    return 0.41\n",
                          "--scale_rewards", "batch", "--beta", "0.04", "--max_steps", "2", nproc=2)
    assert len(metrics) == 2
    for m in metrics:
        assert m["reward_std"] == 0.0 or m["reward_std"] < 1e-15, m
        for key in ("loss", "grad_norm", "kl"):
            assert m[key] == m[key] and abs(m[key]) < 1e-6, f"{key} {m[key]}: advantages must be 0, not NaN"
        assert m["skipped"] == 0 and m["skipped_steps"] == 0, m
    assert len(re.findall(r"\| skipped 0 \|", stdout)) == 2, stdout[-2000:]


EVEN_IDS = ("def reward(completion, sample):\n"
            "    ids = sample['completion_ids']\n"
            "    return sum(t % 2 == 0 for t in ids) / max(len(ids), 1)\n")


@pytest.mark.parametrize("variant", [
    # GSPO: sequence-level ratios; two optimizer steps per rollout batch, so the second slice is off policy
    ("gspo", "--loss_type", "grpo", "--importance_sampling_level", "sequence", "--steps_per_rollout", "2",
     "--warmup_steps", "4"),
    # CISPO: two passes over each rollout batch, and an entropy bonus
    ("cispo", "--loss_type", "cispo", "--num_iterations", "2", "--entropy_coef", "0.001"),
])
def test_reward_rises_with_gspo_and_cispo(tiny_chat, tmp_path, variant):
    name, *flags = variant
    metrics, stdout = run(tiny_chat, tmp_path, name, EVEN_IDS, "--max_steps", "8", *flags)
    rewards = [m["reward_mean"] for m in metrics]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"{name}: mean reward of the first 3 steps {first:.3f}, of the last 3 {last:.3f}: "
          + " ".join(f"{r:.2f}" for r in rewards))
    assert last >= first + 0.2, f"{name}: mean reward did not rise: {rewards}"
    assert all(m["skipped_steps"] == 0 for m in metrics)
    assert f"loss {flags[1]} ({'sequence' if name == 'gspo' else 'token'} ratios)" in stdout
    if name == "gspo":  # the schedule counts optimizer steps (2 per rollout step): the lr of each step's last
        assert [m["lr"] for m in metrics[:3]] == [0.5e-2, 1e-2, 1e-2]
        assert any(m["clip_low"] + m["clip_high"] > 0 for m in metrics), "the off-policy slice never clipped"
