"""GRPO arithmetic and reward parsing against hand-computed values."""
import math

import pytest
import torch

from llama_rlhf.runtime import UsageError
from llama_rlhf.training.grpo_loss import group_advantages, k3_kl, token_terms, token_weights
from llama_rlhf.rewards import (accuracy_reward, build_rewards, extract_answer, format_reward,
                                         make_length_reward, score)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    adv = group_advantages(r, 4, "group", eps=0.0 + 1e-4)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    assert torch.allclose(adv[:4], expected, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4)), "a group with equal rewards carries no signal"
    assert torch.allclose(group_advantages(r, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    batch = group_advantages(r, 4, "batch")
    assert torch.allclose(batch, group_advantages(r, 4, "none") / (r.std() + 1e-4))
    with pytest.raises(ValueError, match="--scale_rewards"):
        group_advantages(r, 4, "rank")


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -1.5])
    d = ref - logp
    assert torch.allclose(k3_kl(logp, ref), torch.exp(d) - d - 1)
    assert k3_kl(logp, ref)[0].item() == 0.0 and (k3_kl(logp, ref) >= 0).all()
    assert abs(k3_kl(torch.tensor([-2.0]), torch.tensor([-1.0])).item() - (math.e - 2)) < 1e-6


def test_clipped_surrogate_and_clip_fractions_by_hand():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))  # ratios 1.5, 1, 0.5
    adv = torch.tensor([2.0, -1.0])
    t = token_terms(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # A > 0: min(r A, clip(r) A) -> 1.28*2, 1*2, 0.5*2 ; A < 0: min(-r, -clip(r)) -> -1.5, -1, -0.8
    expected = -torch.tensor([[2.56, 2.0, 1.0], [-1.5, -1.0, -0.8]])
    assert torch.allclose(t.loss, expected, atol=1e-6)
    assert t.high_clipped.tolist() == [[True, False, False], [False, False, False]]
    assert t.low_clipped.tolist() == [[False, False, False], [False, False, True]]
    with_kl = token_terms(logp, old, adv, 0.2, 0.28, beta=0.1, ref_logp=torch.zeros(2, 3))
    assert torch.allclose(with_kl.loss - t.loss, 0.1 * k3_kl(logp, torch.zeros(2, 3)), atol=1e-6)
    # gradient flows through the unclipped branch only
    lp = logp.clone().requires_grad_()
    token_terms(lp, old, adv, 0.2, 0.28).loss.sum().backward()
    assert lp.grad[0, 0] == 0 and lp.grad[1, 2] == 0 and abs(lp.grad[0, 1].item() + 2.0) < 1e-6


def test_loss_type_weights_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kw = dict(global_sequences=4, global_tokens=10, global_micro_batches=2, max_completion_length=4)
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    share = {lt: (per_token * token_weights(mask, lt, **kw)).sum().item() for lt in ("grpo", "bnpo", "dr_grpo", "dapo")}
    assert abs(share["grpo"] - (2.0 + 4.0) / 4) < 1e-6  # sequence means 2 and 4, over 4 sequences
    assert abs(share["bnpo"] - (10.0 / 4) / 2) < 1e-6  # token mean of this batch, over 2 micro-batches
    assert abs(share["dr_grpo"] - 10.0 / (4 * 4)) < 1e-6
    assert abs(share["dapo"] - 10.0 / 10) < 1e-6
    with pytest.raises(ValueError, match="--loss_type"):
        token_weights(mask, "ppo", **kw)


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("<answer>7</answer> and <answer> 8 </answer>", " 8 "),
    ("work...\n#### 1,234", "1,234"),
    ("\\boxed{unclosed", None),
    ("", None),
    ("no answer here", None),
    ("<answer>3</answer> #### 5", "3"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion, answer, reward", [
    ("<answer>1,000</answer>", "1000", 1.0),
    ("\\boxed{0.75}", "3/4", 1.0),
    ("#### 12.", "12", 1.0),
    ("<answer>Paris</answer>", "paris", 1.0),
    ("<answer>13</answer>", "12", 0.0),
    ("12", "12", 0.0),  # no marked final answer
    ("<answer></answer>", "12", 0.0),
    ("<answer>1/0</answer>", "1", 0.0),
])
def test_accuracy_reward(completion, answer, reward):
    assert accuracy_reward(completion, {"answer": answer}) == reward


@pytest.mark.parametrize("completion, reward", [
    ("<think>a</think><answer>4</answer>", 1.0),
    ("  <think>\nwork\n</think>\n<answer> 4 </answer>\n", 1.0),
    ("<think>a</think>", 0.0),
    ("<answer>4</answer>", 0.0),
    ("<think>a</think><answer>4</answer> trailing", 0.0),
    ("<think>a<think>b</think><answer>4</answer>", 0.0),
    ("<think>a</think><answer>4</answer><answer>5</answer>", 0.0),
    ("<think>a</think><answer> </answer>", 0.0),
    ("", 0.0),
])
def test_format_reward(completion, reward):
    assert format_reward(completion, {}) == reward


def test_length_reward_band():
    fn = make_length_reward(10, 20)
    assert [fn("", {"completion_tokens": n}) for n in (10, 15, 20)] == [1.0, 1.0, 1.0]
    assert fn("", {"completion_tokens": 5}) == 0.0 and fn("", {"completion_tokens": 40}) == 0.0
    assert fn("", {"completion_tokens": 30}) == 0.5 and fn("", {"completion_tokens": 7.5}) == 0.5


def test_reward_specs_and_user_functions(tmp_path):
    assert [n for n, _, _ in build_rewards("accuracy,format", "1,0.5")] == ["accuracy", "format"]
    with pytest.raises(UsageError, match="unknown reward 'acc'"):
        build_rewards("acc", None)
    with pytest.raises(UsageError, match="2 values for 1"):
        build_rewards("format", "1,2")
    with pytest.raises(UsageError, match="reward file .*missing.py not found"):
        build_rewards(f"{tmp_path}/missing.py:f", None)
    user = tmp_path / "my_reward.py"
    user.write_text("def f(completion, sample):\n    return len(completion) / 10\n"
                    "def bad(completion, sample):\n    raise KeyError('answer')\n")
    rewards = build_rewards(f"{user}:f,format", None)
    assert score(rewards, "<think>x</think><answer>1</answer>", {}) == [3.4, 1.0]
    with pytest.raises(UsageError, match="defines no function 'g'"):
        build_rewards(f"{user}:g", None)
    with pytest.raises(UsageError, match="raised KeyError"):
        score(build_rewards(f"{user}:bad", None), "x", {})
