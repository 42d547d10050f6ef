"""Shared-prefix prefill (inference/prefix.py): prompts prefilled together that start with the same tokens run
them once, and the cache, the first logits and every later token are those of prefilling each prompt whole, on
every kind of attention the families use (GQA, qkv bias + qk-norm, soft-capping with sandwich norms, a sliding
window wider than the prompts); where the arithmetic would differ (a narrower window) it does not apply.
SmolLM2's chat prompts, which share the system prompt, are compared with transformers in test_generation.py."""
import dataclasses

import pytest
import torch

from llama_rlhf.inference.engine import Generator, KVCache
from llama_rlhf.inference.prefix import MIN_SHARED_PREFIX, PrefixedWindow, shared_prefix_length
from llama_rlhf.inference.sampling import SamplingParams
from llama_rlhf.models.config import ModelConfig
from llama_rlhf.parallel.state import single_process_state
from tests.test_shared_prompts import model_for as sharp_model

BASE = ModelConfig("llama-hf", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64)
CONFIGS = {
    "llama": BASE,
    "qwen3-like": dataclasses.replace(BASE, qkv_bias=True, qk_norm=True),
    "gemma2-like": dataclasses.replace(BASE, hidden_act="gelu_tanh", norm_weight_offset=1.0, embed_scale=32 ** 0.5,
                                       sandwich_norm=True, attn_logit_softcap=20.0, final_logit_softcap=15.0,
                                       sliding_window=30, sliding_window_layers=[True, False],
                                       tie_word_embeddings=True),  # the window is wider than every prompt
}
PREFIX = [5, 17, 42, 8, 91, 3, 60, 23, 77, 14]  # 10 tokens every prompt below starts with
PROMPTS = [PREFIX + [33, 2, 71], PREFIX + [9], PREFIX + [50, 61, 1, 88, 4, 19, 27], PREFIX + [12, 44]]


def model_for(cfg):
    return sharp_model(cfg).eval()  # fp64, weights sharper than the tiny init so that differences would show


def engine(model, prompts, params, rows=8, **kwargs):
    return Generator(model, prompts, params, (), single_process_state(), rows, 40, 7, None, None, None, 10, **kwargs)


def test_shared_length_by_hand():
    p = PREFIX
    assert shared_prefix_length([p + [1, 2], p + [3]], {None}) == 10
    assert shared_prefix_length([p + [1], p + [1, 2]], {None}) == 10  # the shorter keeps its last token
    assert shared_prefix_length([p, p + [1]], {None}) == 9
    assert shared_prefix_length([p + [1]], {None}) == 0  # one prompt: nothing to share
    assert shared_prefix_length([p + [1], [0] + p], {None}) == 0
    short = p[:MIN_SHARED_PREFIX - 1]
    assert shared_prefix_length([short + [1], short + [2]], {None}) == 0  # not worth a second forward
    assert shared_prefix_length([p + [1], p + [2, 3]], {None, 12}) == 10  # the window holds the longest prompt
    assert shared_prefix_length([p + [1], p + [2, 3]], {None, 11}) == 0  # it does not: slot distances would lie


def test_right_aligned_layout_by_hand():
    """Row i of the result: padding, then the prefix's slots, then its own rest, in its last lengths[i] slots."""
    layers, heads, dim, prefix_len = 2, 2, 3, 4
    prefix = KVCache(layers, 1, heads, dim, prefix_len, torch.float64, torch.device("cpu"))
    for layer in range(layers):  # value = 100 * layer + slot for the prefix, 1000 + 100 * layer + slot for rests
        for cache, offset in ((prefix.k, 0), (prefix.v, 50)):
            cache[layer][:] = (100 * layer + offset + torch.arange(prefix_len)).view(1, 1, -1, 1).double()
    rests = [3, 1, 2]  # rest lengths; the longest sets the width
    window = PrefixedWindow(prefix, rows=3)
    width = prefix_len + max(rests)
    for layer in range(layers):
        k = (1000 + 100 * layer + torch.arange(max(rests))).double().view(1, -1, 1, 1).expand(3, -1, heads, dim)
        keys, values = window.update(layer, k, k + 50)
        assert keys.shape == (3, width, heads, dim)
    out = KVCache(0, 3, heads, dim, width, torch.float64, torch.device("cpu"))
    window.right_aligned(out, [prefix_len + n for n in rests])
    for i, n in enumerate(rests):
        begin = width - prefix_len - n
        assert out.valid[i].tolist() == [s >= begin for s in range(width)]
        for layer in range(layers):
            want = ([100 * layer + s for s in range(prefix_len)]
                    + [1000 + 100 * layer + s for s in range(max(rests) - n, max(rests))])
            assert out.k[layer][i, 0, begin:, 0].tolist() == want, (i, layer)
            assert out.v[layer][i, 1, begin:, 2].tolist() == [w + 50 for w in want], (i, layer)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_cache_and_logits_equal_whole_prompts(name):
    """fp64: the same first logits and the same keys/values in every valid slot, to 1e-10."""
    model = model_for(CONFIGS[name])
    gen = engine(model, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=4))
    with torch.inference_mode():
        whole_logits, whole = gen.prefill_whole([0, 1, 2, 3])
        shared_logits, shared = gen.prefill_shared([0, 1, 2, 3], len(PREFIX))
    assert gen.stats["shared_prefix_tokens"] == 3 * len(PREFIX)
    assert torch.equal(whole.valid, shared.valid)
    assert (whole_logits - shared_logits).abs().max() < 1e-10
    mask = whole.valid.view(4, 1, -1, 1)
    for layer in range(model.cfg.num_layers):
        for a, b in ((whole.k[layer], shared.k[layer]), (whole.v[layer], shared.v[layer])):
            assert a.shape == b.shape
            assert ((a - b) * mask).abs().max() < 1e-10, (name, layer)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_new_tokens=6),
                                    SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, num_samples=2)],
                         ids=["greedy", "sampled"])
def test_generation_equals_whole_prompt_prefill(name, params):
    """fp64: the same tokens and log-probs (1e-10) with and without sharing, in one batch and with continuous
    batching (two rows: prompts are admitted in pairs, or a prompt's two samples alone)."""
    model = model_for(CONFIGS[name])
    for rows in (8, 2):
        runs = {}
        for share in (True, False):
            gen = engine(model, PROMPTS, params, rows=rows, share_prefixes=share)
            with torch.inference_mode():
                runs[share] = gen.run()
            if rows == 8 or not share:  # all four prompts in one prefill / sharing off
                assert (gen.stats["shared_prefix_tokens"] > 0) == share, (rows, share, gen.stats)
        for got, want in zip(runs[True], runs[False]):
            for a, b in zip(got, want):
                assert a.token_ids == b.token_ids
                assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-10


def test_narrow_window_prefills_whole_prompts():
    cfg = dataclasses.replace(BASE, sliding_window=5)  # narrower than the prompts
    gen = engine(model_for(cfg), PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=3))
    with torch.inference_mode():
        gen.run()
    assert gen.stats["shared_prefix_tokens"] == 0 and gen.stats["prefills"] == 1
