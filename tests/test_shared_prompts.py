"""GRPO update with shared prompts (training/update_batch.py): one row per prompt holding all of its samples'
completions gives the same log-probs, entropies, loss and gradients as one row per sample, on every kind of
attention the families use (GQA, qkv bias + qk-norm, sliding windows, soft-capping with sandwich norms)."""
import dataclasses

import pytest
import torch

from llama_rlhf.models.attention import shared_prefix_mask
from llama_rlhf.models.config import ModelConfig
from llama_rlhf.models.init import init_weights
from llama_rlhf.models.pretrained import build_model
from llama_rlhf.parallel.state import single_process_state
from llama_rlhf.training import update_batch
from llama_rlhf.training.grpo import Prompt, Rollout, grpo_backward
from llama_rlhf.training.grpo_loss import LossConfig
from llama_rlhf.training.logprobs import token_logprobs

BASE = ModelConfig("llama-hf", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64)
CONFIGS = {
    "llama": BASE,
    "qwen3-like": dataclasses.replace(BASE, qkv_bias=True, qk_norm=True),
    "mistral-window": dataclasses.replace(BASE, sliding_window=5),  # shorter than the prompts + completions
    "gemma2-like": dataclasses.replace(BASE, hidden_act="gelu_tanh", norm_weight_offset=1.0, embed_scale=32 ** 0.5,
                                       sandwich_norm=True, attn_logit_softcap=20.0, final_logit_softcap=15.0,
                                       sliding_window=4, sliding_window_layers=[True, False],
                                       tie_word_embeddings=True),
}


def rollouts(seed=0, groups=3, group_size=4):
    """Groups of samples with different completion lengths (one group of a single sample), shuffled so that a
    prompt's samples are not next to each other."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in range(groups):
        prompt = Prompt(p, torch.randint(0, 97, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist(),
                        {})
        for s in range(group_size if p else 1):
            n = int(torch.randint(1, 9, (1,), generator=g))
            r = Rollout(prompt, s, torch.randint(0, 97, (n,), generator=g).tolist(), "stop", [])
            r.advantage = float(torch.randn((), generator=g))
            r.old_logprobs = -3 - torch.rand(n, generator=g)
            r.ref_logprobs = -3 - torch.rand(n, generator=g)
            out.append(r)
    order = torch.randperm(len(out), generator=g).tolist()
    return [out[i] for i in order]


def model_for(cfg, dtype=torch.float64):
    model = build_model(cfg, single_process_state())
    init_weights(model, seed=3)
    with torch.no_grad():  # sharper than the tiny init, so differences would show
        for p in model.parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0)
    return model.to(dtype)


def test_mask_is_prefix_plus_own_branch_by_hand():
    branches = torch.tensor([[0, 0, 1, 1, 2, -1]])
    positions = torch.tensor([[0, 1, 2, 3, 2, 0]])
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0],
                         [1, 1, 0, 0, 0, 1]], dtype=torch.bool)  # padding sees the prefix and itself: finite
    assert torch.equal(shared_prefix_mask(branches, positions)[0, 0], want)
    windowed = want.clone()
    windowed[3, 0] = False  # position distance 3 >= window 3; slot 4 is 4 slots but 2 positions from slot 0: seen
    assert torch.equal(shared_prefix_mask(branches, positions, window=3)[0, 0], windowed)


def test_layout_rows_index_and_fallback(monkeypatch):
    rs = rollouts()
    shared = update_batch.completion_batch(rs, 0, ("adv",))
    single = update_batch.completion_batch(rs, 0, ("adv",), share_prompts=False)
    assert shared["input_ids"].shape[0] == 3 and single["input_ids"].shape[0] == len(rs) == 9
    prompts = {r.prompt.index: len(r.prompt.ids) for r in rs}
    real = sum(prompts.values()) + sum(len(r.completion_ids) for r in rs)  # each prompt once, then its completions
    assert int((shared["branches"] >= 0).sum()) == real
    for i, r in enumerate(rs):  # every label is predicted by the slot before it in its row (or the prompt's last)
        c, p = len(r.completion_ids), len(r.prompt.ids)
        assert shared["labels"][i, :c].tolist() == r.completion_ids and (shared["labels"][i, c:] == -100).all()
        flat = shared["input_ids"].reshape(-1)
        first = int(shared["index"][i, 0])
        assert flat[first - p + 1:first + 1].tolist() == r.prompt.ids  # the prompt ends at the first predictor
        assert flat[shared["index"][i, 1:c]].tolist() == r.completion_ids[:-1]  # token k <- token k - 1
        assert torch.allclose(shared["adv"][i, :c], torch.tensor(r.advantage))
    monkeypatch.setattr(update_batch, "SHARED_ROW_TOKENS", 10)  # rows that would be longer: one row per sample
    assert "branches" not in update_batch.completion_batch(rs, 0, ())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shared_log_probs_and_gradients_equal_one_row_per_sample(name):
    cfg, rs = CONFIGS[name], rollouts()
    ps = single_process_state()
    weight_gen = torch.Generator().manual_seed(1)
    results = []
    for share in (True, False):
        model = model_for(cfg)
        batch = update_batch.completion_batch(rs, 0, (), share_prompts=share)
        assert ("branches" in batch) == share
        logp, entropy = token_logprobs(model, batch, ps, 0.7, torch.float64, with_entropy=True, entropy_grad=True)
        if not results:
            weight = torch.rand(logp.shape, generator=weight_gen, dtype=torch.float64)
        (logp * weight + 0.1 * entropy * weight).sum().backward()
        results.append((logp.detach(), entropy.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (lp0, e0, g0), (lp1, e1, g1) = results
    assert torch.allclose(lp0, lp1, atol=1e-10, rtol=0) and torch.allclose(e0, e1, atol=1e-10, rtol=0)
    for n in g0:
        err = (g0[n] - g1[n]).abs().max() / g1[n].abs().max().clamp(min=1e-12)
        assert err < 1e-10, f"{name}: grad of {n} off by {err:.2e}"


@pytest.mark.parametrize("loss", [LossConfig("grpo", beta=0.04, kl_estimator="k3"), LossConfig("dapo"),
                                  LossConfig("cispo", importance_sampling_level="sequence", entropy_coef=0.03)])
def test_grpo_step_equal_with_and_without_shared_prompts_fp32(loss):
    rs, ps = rollouts(seed=4), single_process_state()
    tokens = sum(len(r.completion_ids) for r in rs)
    out = []
    for share in (True, False):
        model = model_for(BASE, torch.float32)
        stats = grpo_backward(model, rs, ps, temperature=0.7, compute_dtype=torch.float32, pad_id=0, loss=loss,
                              global_sequences=len(rs), global_tokens=tokens, global_micro_batches=1,
                              max_completion_length=8, mask_truncated=False, on_policy=False, share_prompts=share)
        out.append((stats.values.clone(), {n: p.grad for n, p in model.named_parameters()}))
    (v0, g0), (v1, g1) = out
    assert torch.allclose(v0, v1, rtol=1e-5, atol=1e-6), (v0, v1)
    for n in g0:
        err = (g0[n] - g1[n]).abs().max() / g1[n].abs().max().clamp(min=1e-12)
        assert err < 1e-5, f"{loss.loss_type}: grad of {n} off by {err:.2e}"


def test_bf16_autocast_shares_one_additive_mask_of_the_compute_dtype():
    rs, ps = rollouts(seed=5), single_process_state()
    model = model_for(CONFIGS["mistral-window"], torch.float32)
    out = []
    for share in (True, False):
        batch = update_batch.completion_batch(rs, 0, (), share_prompts=share)
        with torch.no_grad():
            out.append(token_logprobs(model, batch, ps, 1.0, torch.bfloat16)[0])
    assert (out[0] - out[1]).abs().max() < 0.1  # bf16 matmuls, summed in another order
    assert (out[0] != 0).sum() == sum(len(r.completion_ids) for r in rs)
