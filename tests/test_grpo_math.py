"""GRPO arithmetic against TRL's GRPOTrainer._compute_loss (float64) and hand-computed values; reward parsing."""
import itertools
import math
import types
from collections import defaultdict

import pytest
import torch

from llama_rlhf.runtime import UsageError
from llama_rlhf.training.grpo_loss import (LOSS_TYPES, LossConfig, group_advantages, k3_kl, loss_share, mean_and_std,
                                           token_terms, token_weights)
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
    cfg = LossConfig("grpo", eps_low=0.2, eps_high=0.28)
    t = token_terms(logp, old, adv, cfg)
    # A > 0: min(r A, clip(r) A) -> 1.28*2, 1*2, 0.5*2 ; A < 0: min(-r, -clip(r)) -> -1.5, -1, -0.8
    expected = -torch.tensor([[2.56, 2.0, 1.0], [-1.5, -1.0, -0.8]])
    assert torch.allclose(t.loss, expected, atol=1e-6)
    assert t.high_clipped.tolist() == [[True, False, False], [False, False, False]]
    assert t.low_clipped.tolist() == [[False, False, False], [False, False, True]]
    k3 = LossConfig("grpo", eps_low=0.2, eps_high=0.28, beta=0.1, kl_estimator="k3")
    with_kl = token_terms(logp, old, adv, k3, ref_logp=torch.zeros(2, 3))
    assert torch.allclose(with_kl.loss - t.loss, 0.1 * k3_kl(logp, torch.zeros(2, 3)), atol=1e-6)
    corrected = token_terms(logp, old, adv, LossConfig("grpo", 0.2, 0.28, beta=0.1), ref_logp=torch.zeros(2, 3))
    assert torch.allclose(corrected.loss - t.loss, 0.1 * k3_kl(logp, torch.zeros(2, 3)) * logp.exp(), atol=1e-6)
    # gradient flows through the unclipped branch only
    lp = logp.clone().requires_grad_()
    token_terms(lp, old, adv, cfg).loss.sum().backward()
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


def trl_compute_loss(cfg: LossConfig, logp, old, adv, ref, mask, entropy, *, accumulation: int, processes: int,
                     steps_per_generation: int, num_items: float, max_completion_length: int):
    """TRL's own GRPOTrainer._compute_loss on one micro-batch: a stand-in trainer holds what it reads, the model's
    log-probs and entropies are the given tensors, one process of ``processes`` (collectives are the identity)."""
    from trl import GRPOTrainer
    n, t = logp.shape
    args = types.SimpleNamespace(use_bias_correction_kl=cfg.kl_estimator == "k3_corrected", delta=cfg.delta,
                                 sapo_temperature_pos=cfg.sapo_temperature_pos,
                                 sapo_temperature_neg=cfg.sapo_temperature_neg,
                                 steps_per_generation=steps_per_generation)
    accelerator = types.SimpleNamespace(num_processes=processes, sync_gradients=True, gather=lambda x: x,
                                        reduce=lambda x, reduction: x)
    trainer = types.SimpleNamespace(
        args=args, accelerator=accelerator, model=types.SimpleNamespace(training=True), beta=cfg.beta,
        loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level, epsilon_low=cfg.eps_low,
        epsilon_high=cfg.cispo_epsilon_max if cfg.loss_type == "cispo" else cfg.eps_high,
        current_gradient_accumulation_steps=accumulation, max_completion_length=max_completion_length,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, entropy_coef=cfg.entropy_coef,
        _entropy_bonus_enabled=cfg.entropy_coef != 0.0, use_adaptive_entropy=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy, None))
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "ref_per_token_logps": ref, "num_items_in_batch": torch.tensor(num_items, dtype=torch.float64)}
    if old is not None:
        inputs["old_per_token_logps"] = old
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def trl_cases():
    """Loss type x ratio level x (beta, KL estimator) x (processes, accumulation, optimizer steps per
    generation); delta, the entropy bonus, on-policy ratios and a truncated (masked) completion cycle through."""
    layouts = ((1, 1, 1), (2, 2, 1), (2, 1, 2), (1, 3, 2))
    kls = ((0.0, "k3"), (0.04, "k3"), (0.04, "k3_corrected"))
    for i, (loss_type, level, (beta, kl), layout) in enumerate(itertools.product(LOSS_TYPES, ("token", "sequence"),
                                                                                 kls, layouts)):
        cfg = LossConfig(loss_type, 0.2, 0.28, beta, kl, level, delta=1.4 if i % 2 else None,
                         cispo_epsilon_max=1.25, entropy_coef=0.01 if i % 3 == 0 else 0.0)
        yield i, cfg, layout, i % 4 == 1, i % 5 == 0


def test_loss_equals_trl_compute_loss():
    torch.set_default_dtype(torch.float64)
    try:
        worst = 0.0
        for i, cfg, (processes, accumulation, steps), on_policy, truncate in trl_cases():
            g = torch.Generator().manual_seed(i)
            micro, batch, length, max_len = processes * accumulation * steps, 3, 6, 8  # micro-batches of 3 x 6
            lengths = torch.randint(1, length + 1, (micro, batch), generator=g)
            mask = (torch.arange(length) < lengths.unsqueeze(-1)).double()  # [micro, batch, T]
            if truncate:
                mask[0, 1] = 0.0  # a truncated completion, left out of the loss
            logp = -0.1 - 3 * torch.rand(micro, batch, length, generator=g)
            old = logp + 0.3 * torch.randn(micro, batch, length, generator=g)  # ratios on both sides of the clip
            ref = logp + 0.5 * torch.randn(micro, batch, length, generator=g)
            adv = torch.randn(micro, batch, generator=g)
            entropy = 2 * torch.rand(micro, batch, length, generator=g)
            num_items = mask.sum().item()  # the whole generation batch (every process, every step)
            for step in range(steps):
                ours_total = trl_total = 0.0
                leaves = []
                for m in range(step * processes * accumulation, (step + 1) * processes * accumulation):
                    lp, ent = logp[m].clone().requires_grad_(), entropy[m].clone().requires_grad_()
                    lp2, ent2 = logp[m].clone().requires_grad_(), entropy[m].clone().requires_grad_()
                    counts = dict(global_sequences=processes * accumulation * batch, global_tokens=num_items / steps,
                                  global_micro_batches=processes * accumulation, max_completion_length=max_len)
                    terms = token_terms(lp, lp.detach() if on_policy else old[m], adv[m], cfg, ref[m], mask[m])
                    ours_total = ours_total + loss_share(terms, token_weights(mask[m], cfg.loss_type, **counts), ent,
                                                         token_weights(mask[m], "bnpo", **counts), cfg.entropy_coef)
                    trl = trl_compute_loss(cfg, lp2, None if on_policy else old[m], adv[m], ref[m], mask[m], ent2,
                                           accumulation=accumulation, processes=processes,
                                           steps_per_generation=steps * accumulation, num_items=num_items,
                                           max_completion_length=max_len)
                    trl_total = trl_total + trl / processes  # DDP averages the processes' gradients
                    leaves.append((lp, lp2, ent, ent2))
                (ours_total + trl_total).backward()  # separate leaves: each side's gradient lands on its own
                where = f"case {i}: {cfg} layout {(processes, accumulation, steps)} step {step}"
                err = abs(ours_total.item() - trl_total.item())
                assert err <= 1e-6 * max(1.0, abs(trl_total.item())), f"{where}: loss {ours_total} vs TRL {trl_total}"
                for lp, lp2, ent, ent2 in leaves:
                    grad_err = (lp.grad - lp2.grad).abs().max().item()
                    assert grad_err <= 1e-6 * max(1.0, lp2.grad.abs().max().item()), f"{where}: d/dlogp {grad_err}"
                    if cfg.entropy_coef:
                        assert (ent.grad - ent2.grad).abs().max().item() <= 1e-9, f"{where}: d/dentropy"
                worst = max(worst, err)
        print(f"TRL parity: {i + 1} cases, worst loss difference {worst:.1e}")
    finally:
        torch.set_default_dtype(torch.float32)


def test_kl_gradients_by_hand():
    """On policy (ratio 1): d(beta k3)/dlogp = beta (1 - p_ref / p); the corrected estimator's is the reverse
    KL's, beta (log p - log p_ref) (DeepSeek-V3.2, eq. 8)."""
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64), torch.tensor([[-1.5, -1.0, -0.5]])
    adv = torch.zeros(1, dtype=torch.float64)
    for estimator, expected in (("k3", 0.1 * (1 - (ref - logp).exp())), ("k3_corrected", 0.1 * (logp - ref))):
        lp = logp.clone().requires_grad_()
        t = token_terms(lp, lp.detach(), adv, LossConfig("dapo", beta=0.1, kl_estimator=estimator), ref_logp=ref)
        t.loss.sum().backward()
        assert torch.allclose(lp.grad, expected, atol=1e-12), estimator
        assert torch.allclose(t.kl, k3_kl(logp, ref), atol=1e-12), "on policy both estimate the same value"


def test_sequence_level_ratio_cispo_sapo_delta_by_hand():
    log_ratio = torch.tensor([[0.3, -0.1, 0.4, 9.0], [0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    logp = torch.full((2, 4), -1.0, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    gspo = token_terms(logp, logp - log_ratio, adv, LossConfig("grpo", importance_sampling_level="sequence"),
                       mask=mask)
    seq_ratio = torch.tensor([math.exp(0.2), math.exp(0.5)], dtype=torch.float64)  # exp(mean over kept tokens)
    assert torch.allclose(gspo.ratio, seq_ratio.unsqueeze(-1).expand(2, 4))
    # every token of sequence 0 (A > 0, ratio 1.22) is clipped at 1.2; sequence 1 (A < 0, ratio 1.65) keeps its
    # unclipped, larger loss
    expected = torch.tensor([[-1.2], [2 * math.exp(0.5)]], dtype=torch.float64).expand(2, 4)
    assert torch.allclose(gspo.loss, expected) and gspo.high_clipped[0].all() and not gspo.high_clipped[1].any()
    # delta caps the unclipped ratio of the clipped surrogate: A < 0, ratio e^0.5 -> loss 2 x 1.4
    capped = token_terms(logp, logp - log_ratio, adv, LossConfig("grpo", importance_sampling_level="sequence",
                                                                 delta=1.4), mask=mask)
    assert abs(capped.loss[1, 0].item() - 2 * 1.4) < 1e-12
    # CISPO: REINFORCE with the detached weight min(ratio, eps_max): d loss / d logp = -min(r, eps_max) A
    lp = logp.clone().requires_grad_()
    cispo = token_terms(lp, logp - log_ratio, adv, LossConfig("cispo", cispo_epsilon_max=1.5))
    cispo.loss.sum().backward()
    assert torch.allclose(lp.grad, -log_ratio.exp().clamp(max=1.5) * adv.unsqueeze(-1))
    assert cispo.high_clipped.tolist() == [[False, False, False, True], [False, False, False, False]]
    # SAPO: -(4 / tau) sigmoid(tau (r - 1)) A; on policy its gradient is the plain policy gradient -A
    lp = logp.clone().requires_grad_()
    sapo = token_terms(lp, lp.detach(), adv, LossConfig("sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=2.0))
    sapo.loss.sum().backward()
    expected = torch.tensor([[-2.0], [2 * 2.0 / 2.0]], dtype=torch.float64).expand(2, 4)  # sigmoid(0) = 1/2
    assert torch.allclose(sapo.loss, expected)
    assert torch.allclose(lp.grad, -adv.unsqueeze(-1).expand(2, 4))


def test_entropy_bonus_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    entropy = torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0]])
    terms = token_terms(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), LossConfig("dapo"))
    w = token_weights(mask, "bnpo", global_sequences=2, global_tokens=3, global_micro_batches=2,
                      max_completion_length=3)
    share = loss_share(terms, w, entropy, w, entropy_coef=0.1)
    assert abs(share.item() - (-0.1 * 2.0 / 2)) < 1e-7  # token mean 2, one of two micro-batches


def test_batch_std_is_two_pass_and_never_nan():
    """The issue-20 case: equal rewards that binary cannot hold (0.41) gave a variance of about -1e-16 in one
    pass, so NaN advantages; two passes give a std of (about) 0, as TRL's nanstd does, and zero advantages."""
    from trl.trainer.utils import nanstd
    two_ranks = lambda t: 2 * t  # noqa: E731 - DP=2 with the same rewards on both ranks
    one_pass_nan = 0
    for value, n in itertools.product((0.1, 0.41, 0.7, 1.3), range(2, 13)):
        r = torch.full((n,), value, dtype=torch.float64)
        total, squares, count = 2 * r.sum(), 2 * r.pow(2).sum(), 2.0 * n
        one_pass_nan += ((squares - total ** 2 / count) / (count - 1)).sqrt().isnan().item()
        mean, std = mean_and_std(r, two_ranks)
        assert 0.0 <= std.item() < 1e-15 and abs(mean.item() - value) < 1e-15, (value, n, std)
        assert abs(std.item() - nanstd(torch.cat([r, r])).item()) < 1e-15
        adv = group_advantages(r, n // 2 if n % 2 == 0 else n, "batch", reduce=two_ranks)
        assert torch.isfinite(adv).all() and adv.abs().max().item() < 1e-10, (value, n, adv)  # 1 ulp / 1e-4
    assert one_pass_nan > 0, "the one-pass formula no longer shows the bug: this test lost its point"
    r = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.25, 2.0], dtype=torch.float64)
    std = mean_and_std(r)[1].item()  # Bessel, as TRL logs reward_std (its correction factor is float32)
    assert abs(std - r.std().item()) < 1e-15 and abs(std - nanstd(r).item()) < 1e-7 * std
    assert mean_and_std(r[:1])[1].item() == 0.0


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


@pytest.mark.parametrize("flags, fragment", [
    (["--steps_per_rollout", "3"], "--steps_per_rollout 3 must divide the rollouts of a rank per step "
                                   "(--max_batch_size 4 x --num_samples_per_prompt 2 = 8)"),
    (["--steps_per_rollout", "0"], "--steps_per_rollout must be >= 1"),
    (["--delta", "1.2", "--epsilon_high", "0.28"], "--delta 1.2 must exceed 1 + --epsilon_high (1.28)"),
    (["--loss_type", "sapo", "--sapo_temperature_neg", "0"], "--sapo_temperature_neg must be > 0"),
    (["--loss_type", "cispo", "--cispo_epsilon_max", "-1"], "--cispo_epsilon_max must be > 0"),
])
def test_bad_loss_flags_are_one_line_errors(flags, fragment):
    from solver_grpo import parse_args
    base = ["--ckpt_dir", "c", "--train_file", "t.jsonl", "--save_dir", "o", "--num_samples_per_prompt", "2"]
    with pytest.raises(UsageError) as err:
        parse_args(base + flags)
    assert fragment in str(err.value) and "\n" not in str(err.value)
