"""Generation against independent references.

- Greedy decoding equals transformers' greedy ``generate`` token for token (and its log-probs to 1e-4): the real
  SmolLM2-135M-Instruct on chat prompts of different lengths in one batch at MP 1 and 3, and a tiny random model
  of every HF family at MP 2, with continuous batching forced through two rows and a one-slot-slack cache (so
  rows are refilled, moved, and the timeline is compacted and shifted).
- A mixed-length batch gives the same tokens as each prompt alone.
- Sampling: reproducible per seed, identical on MP ranks, independent of batch layout (keyed random streams);
  top-k/top-p against hand-computed distributions; the inverse-CDF draw against exact quantiles; temperature
  near 0 equals greedy; sampled log-probs equal a cache-free recomputation under the filtered distribution.
"""
import json
import math
import os
import random

import pytest
import torch

from llama_rlhf.inference.engine import Generator, generate
from llama_rlhf.runtime import UsageError
from llama_rlhf.inference.sampling import SamplingParams, filtered_distribution, sample, uniforms
from tests.distributed import assert_check, grid, run_checks

NEW_TOKENS = 24
QUESTIONS = ["What is 2+2?", "Write one sentence about the sea at night, mentioning the moon and the harbour.", "Hi",
             "Name three colours."]
# with --max_seq_len 40, two decode rows and a one-slot-slack cache this schedule refills rows, moves rows,
# compacts the timeline (shift left) and makes room for a longer prompt under live rows (shift right); no end
# tokens, so the schedule does not depend on the model
FAMILY_LENGTHS, FAMILY_MAX_SEQ, FAMILY_NEW = [3, 30, 2, 4, 2, 25], 40, 12


class threads:
    """One torch thread inside the block (the 2-core machine is shared; two threads contend badly)."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def first_difference(a: list, b: list) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at token {i}: {a[i:i + 4]} vs {b[i:i + 4]} (lengths {len(a)}, {len(b)})"


# ---------------------------------------------------------------------------------------------------------------
# sampling pieces, single process
# ---------------------------------------------------------------------------------------------------------------

def hand_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """The filtered distribution by hand: softmax(logits / T), keep top-k, renormalise, keep the smallest most
    likely prefix reaching top_p, renormalise."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[:top_k or len(logits)]
    weights = {i: math.exp(logits[i] / temperature) for i in order}
    total = sum(weights.values())
    kept, mass = {}, 0.0
    for i in order:
        if mass >= top_p:
            break
        kept[i] = weights[i] / total
        mass += kept[i]
    norm = sum(kept.values())
    return {i: p / norm for i, p in kept.items()}


def as_dict(probs: torch.Tensor) -> dict[int, float]:
    return {t: float(probs[t]) for t in range(probs.shape[-1]) if probs[t] > 0}


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (0.7, 0, 0.8), (1.3, 4, 0.6),
                                                     (0.5, 0, 0.05), (1.0, 6, 1.0)])
def test_filters_match_hand_computed(temperature, top_k, top_p):
    rows = [[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.0, 0.1, 3.0, -2.0, 0.2, 0.3]]
    probs = filtered_distribution(torch.tensor(rows, dtype=torch.float64), SamplingParams(temperature, top_p, top_k))
    assert probs.shape == (2, 6), "probabilities come in token-id order over the whole vocabulary"
    for r, logits in enumerate(rows):
        got = as_dict(probs[r])
        want = hand_distribution(logits, temperature, top_k, top_p)
        assert set(got) == set(want), f"kept tokens {sorted(got)} vs hand-computed {sorted(want)}"
        for t in want:
            assert abs(got[t] - want[t]) < 1e-12, f"token {t}: {got[t]} vs {want[t]}"


def test_inverse_cdf_draw_matches_exact_quantiles():
    probs = torch.tensor([[0.1, 0.0, 0.45, 0.25, 0.2, 0.0]], dtype=torch.float64)
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # evenly spaced quantiles
    tokens, logprobs = sample(probs.expand(n, -1), u)
    counts = torch.bincount(tokens, minlength=6).double() / n
    assert (counts - probs[0]).abs().max() < 2.0 / n, f"draw frequencies {counts.tolist()}"
    assert torch.allclose(logprobs, probs[0, tokens].log())
    edge, _ = sample(probs, torch.tensor([1.0 - 2.0 ** -53]))
    assert edge.item() == 4, "u next to 1 must still land on the last token with probability > 0"


def test_two_level_draw_equals_one_cumsum_over_a_large_vocabulary():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 3000, generator=g, dtype=torch.float64) ** 4  # not a multiple of the block size
    probs[1, 1000:2900] = 0.0  # whole empty blocks
    probs[2, :-1] = 0.0  # all mass on the last token
    probs /= probs.sum(-1, keepdim=True)
    u = torch.rand(20000, generator=g, dtype=torch.float64)
    for r in range(3):
        tokens, logprobs = sample(probs[r].expand(len(u), -1), u)
        want = torch.searchsorted(probs[r].cumsum(0), u, right=True)
        assert torch.equal(tokens, want), f"row {r}: {(tokens != want).sum()} draws differ from the one-level CDF"
        assert torch.allclose(logprobs, probs[r, tokens].log(), atol=1e-12)


def test_top_p_beyond_the_candidates_sorts_those_rows(monkeypatch):
    import llama_rlhf.inference.sampling as sampling
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0.1, 0.0, 0.2, -0.1, 0.05, 0.0, 0.3, 0.1]],
                          dtype=torch.float64)
    params = SamplingParams(1.0, top_p=0.9)
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 3)  # row 0's nucleus fits in 3 candidates, row 1's does not
    probs = filtered_distribution(logits, params)
    for r in range(2):
        got = as_dict(probs[r])
        want = hand_distribution(logits[r].tolist(), 1.0, 0, 0.9)
        assert set(got) == set(want) and all(abs(got[t] - want[t]) < 1e-12 for t in want), (r, got, want)


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(1.0, top_p=0.95)])
def test_draw_is_stable_under_rounding_noise(params):
    """A near-flat distribution perturbed like MP reduction-order rounding: the same uniform picks the same token
    almost always (a draw over probability-sorted tokens moves 55 of these 400 draws: near-equal tokens swap)."""
    g = torch.Generator().manual_seed(0)
    logits = 0.01 * torch.randn(400, 5000, generator=g, dtype=torch.float64)
    noisy = logits + 1e-6 * torch.randn(logits.shape, generator=g, dtype=torch.float64)
    u = torch.rand(400, generator=g, dtype=torch.float64)
    a, _ = sample(filtered_distribution(logits, params), u)
    b, _ = sample(filtered_distribution(noisy, params), u)
    assert (a != b).sum() <= 8, f"{(a != b).sum()} of 400 draws moved"


def splitmix_reference(seed: int, keys: list[int]) -> float:
    """The same counter-based hash in Python integers."""
    mask = (1 << 64) - 1

    def mix(x):
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    h = mix(seed & mask)
    for k in keys:
        h = mix(h ^ (k & mask))
    return (h >> 11) * 2.0 ** -53


def test_uniforms_are_the_keyed_hash_and_uniform():
    rnd = random.Random(0)
    keys = [[rnd.randrange(10 ** 9), rnd.randrange(8), rnd.randrange(4096)] for _ in range(300)]
    got = uniforms(1234, torch.tensor(keys)).tolist()
    assert got == [splitmix_reference(1234, k) for k in keys]
    grid_keys = torch.tensor([[p, s, t] for p in range(50) for s in range(4) for t in range(100)])
    u = uniforms(7, grid_keys)
    assert u.min() >= 0 and u.max() < 1 and len(set(u.tolist())) == len(u)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (counts / len(u) - 0.1).abs().max() < 0.01, counts
    assert not torch.equal(u, uniforms(8, grid_keys)), "the seed must change every draw"


def test_sampling_params_reject_bad_values():
    for kwargs, fragment in [({"temperature": -1}, "--temperature"), ({"top_p": 0.0}, "--top_p"),
                             ({"top_k": -2}, "--top_k"), ({"max_new_tokens": 0}, "--max_new_tokens"),
                             ({"num_samples": 0}, "--num_samples_per_prompt")]:
        with pytest.raises(UsageError, match=fragment):
            SamplingParams(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2 against transformers
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_case(smollm2_dir, smollm2_hf, tmp_path_factory):
    """Chat prompts and transformers' greedy continuation of each prompt alone (stops at its end token)."""
    tokenizer, model = smollm2_hf
    prompts, tokens, logprobs = [], [], []
    with threads(), torch.no_grad():
        for q in QUESTIONS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
            new = out.sequences[0, len(ids):].tolist()
            lp = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, new)]
            prompts.append(ids)
            tokens.append(new)
            logprobs.append(lp)
    assert len({len(p) for p in prompts}) == len(prompts), "prompts must differ in length"
    assert any(t[-1] == tokenizer.eos_token_id for t in tokens), "no reference stops at the end token"
    assert any(len(t) == NEW_TOKENS for t in tokens), "no reference runs to max_new_tokens"
    path = str(tmp_path_factory.mktemp("smollm2_gen") / "reference.json")
    with open(path, "w") as f:
        json.dump({"dir": smollm2_dir, "prompts": prompts, "tokens": tokens, "logprobs": logprobs}, f)
    return path


def compare_with_reference(results, ref, what):
    for i, (per_prompt, tokens, logprobs) in enumerate(zip(results, ref["tokens"], ref["logprobs"])):
        got = per_prompt[0]
        assert got.token_ids == tokens, f"{what}, prompt {i}: {first_difference(got.token_ids, tokens)}"
        assert got.finish_reason == ("stop" if len(tokens) < NEW_TOKENS else "length"), (what, i, got.finish_reason)
        d = max(abs(a - b) for a, b in zip(got.logprobs, logprobs))
        assert d < 1e-4, f"{what}, prompt {i}: greedy log-probs differ from transformers' by {d:.2e}"


def smollm2_generate(ref, ps, rows):
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.tokenizer import load_tokenizer
    model = load_pretrained(ref["dir"], "llama-hf", ps)
    end_ids = load_tokenizer(ref["dir"], model_type="llama-hf").end_ids
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    return model, end_ids, params, generate(model, ref["prompts"], params, end_ids, ps, max_batch_size=rows)


def test_smollm2_greedy_matches_transformers_mp1(smollm2_case):
    from llama_rlhf.parallel.state import single_process_state
    ref = json.load(open(smollm2_case))
    ps = single_process_state()
    with threads():
        model, end_ids, params, batched = smollm2_generate(ref, ps, rows=len(ref["prompts"]))
        compare_with_reference(batched, ref, "MP=1, one batch")
        alone = [generate(model, [p], params, end_ids, ps, max_batch_size=1)[0] for p in ref["prompts"]]
        assert [a[0].token_ids for a in alone] == [b[0].token_ids for b in batched], "batch != each prompt alone"
        compare_with_reference(generate(model, ref["prompts"], params, end_ids, ps, max_batch_size=2), ref,
                               "MP=1, two rows (continuous batching)")
        compare_with_reference(generate(model, ref["prompts"], params, end_ids, ps, max_batch_size=len(ref["prompts"]),
                                        pack_weights=False), ref, "MP=1, unpacked weights")
        compare_with_reference(generate(model, ref["prompts"], params, end_ids, ps, max_batch_size=3,
                                        static_decode=True), ref, "MP=1, fixed-shape (CUDA-graph) step")


def check_smollm2_mp3(case_file):
    ref = json.load(open(case_file))
    ps = grid(3, 1)
    _, _, _, results = smollm2_generate(ref, ps, rows=len(ref["prompts"]))
    compare_with_reference(results, ref, "MP=3")
    assert_same_on_mp_ranks(results, ps)


def assert_same_on_mp_ranks(results, ps):
    import torch.distributed as dist
    mine = [[(c.token_ids, c.finish_reason) for c in per_prompt] for per_prompt in results]
    everyone = [None] * ps.mp_size
    dist.all_gather_object(everyone, mine, group=ps.mp_group)
    assert all(e == mine for e in everyone), "MP ranks disagree on the generated tokens"


def test_smollm2_greedy_matches_transformers_mp3(smollm2_case):
    assert_check(run_checks(3, [check_smollm2_mp3], smollm2_case), "check_smollm2_mp3")


# ---------------------------------------------------------------------------------------------------------------
# a tiny random model of every family at MP 2, and sampling, in one 2-rank group
# ---------------------------------------------------------------------------------------------------------------

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, attention_dropout=0.0, max_position_embeddings=64)


def internlm3_folder(root: str, llama) -> str:
    """An InternLM3 checkpoint (its own config.json field names) holding the weights of ``llama``."""
    from safetensors.torch import save_file
    folder = os.path.join(root, "internlm3")
    os.makedirs(folder)
    save_file({k: v.contiguous() for k, v in llama.state_dict().items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    config = {"architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3", "vocab_size": 101,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "qkv_bias": True, "bias": True,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "rope_theta": 50000000,
              "rope_scaling": {"factor": 6.0, "rope_type": "dynamic"}, "tie_word_embeddings": False}
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    return folder


def family_models(root: str) -> list[tuple[str, str, object]]:
    """(name, model_type, transformers model) for a tiny random model of every family, saved under root/name."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    from tests.family_reference import build_hf_model, load_hf
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    specs = [
        ("llama", "llama-hf", LlamaConfig(**{**COMMON, "num_attention_heads": 8, "num_key_value_heads": 4}),
         LlamaForCausalLM),  # two KV heads per rank at MP 2, each shared by two query heads
        ("llama_kv1_tied", "llama-hf", LlamaConfig(**{**COMMON, "num_key_value_heads": 1}, tie_word_embeddings=True,
                                                   attention_bias=True), LlamaForCausalLM),
        ("llama_mha", "llama-hf", LlamaConfig(**{**COMMON, "num_key_value_heads": 4}), LlamaForCausalLM),
        ("llama3", "llama3-hf", LlamaConfig(**{**COMMON, "max_position_embeddings": 131072},
                                            rope_parameters={"rope_theta": 500000.0, **scaling}), LlamaForCausalLM),
        ("qwen2", "qwen", Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1e6, use_sliding_window=True,
                                      sliding_window=4, max_window_layers=1), Qwen2ForCausalLM),
        ("qwen3", "qwen3", Qwen3Config(**COMMON, head_dim=32, rope_theta=1e6), Qwen3ForCausalLM),
        ("gemma2", "gemma2", Gemma2Config(**COMMON, head_dim=32, query_pre_attn_scalar=24, sliding_window=4,
                                          attn_logit_softcapping=3.0, final_logit_softcapping=2.0, rope_theta=1e4,
                                          hidden_activation="gelu_pytorch_tanh"), Gemma2ForCausalLM),
        ("mistral", "mistral", MistralConfig(**COMMON, sliding_window=4, rope_theta=1e4), MistralForCausalLM),
        ("internlm3_as_llama", None, LlamaConfig(**COMMON, head_dim=16, attention_bias=True, mlp_bias=True,
                                                 rope_theta=50000000.0), LlamaForCausalLM),
    ]
    models = []
    for seed, (name, model_type, config, cls) in enumerate(specs):
        folder = os.path.join(root, name)
        build_hf_model(folder, config, cls, seed)
        model = load_hf(folder)  # eager attention (soft-capping), fp32
        if model_type is None:  # InternLM3: transformers' Llama with the same weights is the reference
            name, model_type, folder = "internlm3", "internlm3", internlm3_folder(root, model)
        models.append((name, model_type, folder, model))
    return models


@pytest.fixture(scope="module")
def family_cases(tmp_path_factory):
    """Every family's folder, prompts and transformers' greedy continuation of each prompt alone."""
    root = str(tmp_path_factory.mktemp("family_gen"))
    rnd = random.Random(0)
    prompts = [[rnd.randrange(3, 101) for _ in range(n)] for n in FAMILY_LENGTHS]
    cases = []
    with threads(), torch.no_grad():
        for name, model_type, folder, model in family_models(root):
            model.generation_config.eos_token_id = None  # run every prompt to its length limit
            refs = []
            for p in prompts:
                n = min(FAMILY_NEW, FAMILY_MAX_SEQ - len(p))
                out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=n, do_sample=False, pad_token_id=0)
                refs.append(out[0, len(p):].tolist())
            cases.append({"name": name, "model_type": model_type, "folder": folder, "prompts": prompts,
                          "tokens": refs})
    path = os.path.join(root, "cases.json")
    json.dump(cases, open(path, "w"))
    return path


def load_case(cases_file, name):
    case = next(c for c in json.load(open(cases_file)) if c["name"] == name)
    from llama_rlhf.models.pretrained import load_pretrained
    ps = grid(2, 1)
    return case, ps, load_pretrained(case["folder"], case["model_type"], ps)


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=FAMILY_NEW)


def check_family(cases_file, name):
    case, ps, model = load_case(cases_file, name)
    prompts = case["prompts"]
    engine = Generator(model.eval(), prompts, GREEDY, (), ps, 2, FAMILY_MAX_SEQ, 0, None, None, None, 10,
                       cache_slack=1, prefill_tokens=8)  # also one prompt per prefill
    with torch.inference_mode():
        squeezed = engine.run()
    stats = engine.stats
    assert stats["shifts_left"] and stats["shifts_right"] and stats["row_moves"], stats
    static = Generator(model.eval(), prompts, GREEDY, (), ps, 2, FAMILY_MAX_SEQ, 0, None, None, None, 10,
                       cache_slack=1, prefill_tokens=8, static_decode=True)  # the CUDA-graph step, run eagerly
    with torch.inference_mode():
        static_squeezed = static.run()
    assert static.stats == stats, (static.stats, stats)
    one_batch = generate(model, prompts, GREEDY, (), ps, max_batch_size=len(prompts), max_seq_len=FAMILY_MAX_SEQ)
    eager = generate(model, prompts, GREEDY, (), ps, max_batch_size=len(prompts), max_seq_len=FAMILY_MAX_SEQ,
                     pack_weights=False)  # plain F.linear: the packed default must pick the same tokens
    for i, want in enumerate(case["tokens"]):
        for results, what in ((one_batch, "one batch"), (squeezed, "two rows, one-slot slack"),
                              (eager, "unpacked weights"), (static_squeezed, "fixed-shape step, two rows")):
            got = results[i][0]
            assert got.token_ids == want, f"{name} MP=2 {what}, prompt {i}: {first_difference(got.token_ids, want)}"
            assert got.finish_reason == "length"
    alone = generate(model, [prompts[1]], GREEDY, (), ps, max_batch_size=1, max_seq_len=FAMILY_MAX_SEQ)
    assert alone[0][0].token_ids == one_batch[1][0].token_ids, f"{name}: batch != the prompt alone"
    assert_same_on_mp_ranks(one_batch, ps)


def check_sampling(cases_file):
    """Reproducible per seed, different across seeds and samples, identical on MP ranks, layout-independent."""
    case, ps, model = load_case(cases_file, "llama")
    prompts = case["prompts"]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=FAMILY_NEW, num_samples=3)

    def run(seed, rows=8, subset=None):
        chosen = list(range(len(prompts))) if subset is None else subset
        out = generate(model, [prompts[i] for i in chosen], params, (), ps, max_batch_size=rows,
                       max_seq_len=FAMILY_MAX_SEQ, seed=seed, prompt_keys=chosen)
        return [[(c.token_ids, c.logprobs) for c in per_prompt] for per_prompt in out]

    first, again, other = run(5), run(5), run(6)
    assert first == again, "the same seed must reproduce the same samples"
    assert first != other, "another seed must give other samples"
    assert all(len({tuple(t) for t, _ in per_prompt}) > 1 for per_prompt in first), "a prompt's samples are equal"
    for rows, subset in ((2, None), (1, [4, 1])):  # other batch layouts, other neighbours
        alt = run(5, rows, subset)
        for j, i in enumerate(subset or range(len(prompts))):
            assert [t for t, _ in alt[j]] == [t for t, _ in first[i]], f"prompt {i}: samples depend on the layout"
    out = generate(model, prompts, params, (), ps, max_batch_size=8, max_seq_len=FAMILY_MAX_SEQ, seed=5)
    assert_same_on_mp_ranks(out, ps)
    eager = generate(model, prompts, params, (), ps, max_batch_size=8, max_seq_len=FAMILY_MAX_SEQ, seed=5,
                     prompt_keys=list(range(len(prompts))), pack_weights=False)
    for i, (packed_row, eager_row) in enumerate(zip(first, eager)):
        assert [t for t, _ in packed_row] == [c.token_ids for c in eager_row], f"prompt {i}: packed != unpacked"
        d = max(abs(a - b) for (_, lp), c in zip(packed_row, eager_row) for a, b in zip(lp, c.logprobs))
        assert d < 1e-5, f"prompt {i}: sampled log-probs of packed and unpacked weights differ by {d:.2e}"
    static = generate(model, prompts, params, (), ps, max_batch_size=8, max_seq_len=FAMILY_MAX_SEQ, seed=5,
                      static_decode=True)
    for i, (packed_row, static_row) in enumerate(zip(first, static)):
        assert [t for t, _ in packed_row] == [c.token_ids for c in static_row], f"prompt {i}: fixed-shape step"
        d = max(abs(a - b) for (_, lp), c in zip(packed_row, static_row) for a, b in zip(lp, c.logprobs))
        assert d < 1e-5, f"prompt {i}: sampled log-probs of the fixed-shape step differ by {d:.2e}"


def check_temperature_to_zero_is_greedy(cases_file):
    case, ps, model = load_case(cases_file, "llama")
    kwargs = dict(max_batch_size=4, max_seq_len=FAMILY_MAX_SEQ)
    greedy = generate(model, case["prompts"], GREEDY, (), ps, **kwargs)
    cold = generate(model, case["prompts"], SamplingParams(1e-4, max_new_tokens=FAMILY_NEW), (), ps, seed=3, **kwargs)
    assert [g[0].token_ids for g in greedy] == [c[0].token_ids for c in cold]


def check_sampled_logprobs(cases_file):
    """Each sampled token's log-prob equals the filtered distribution recomputed by a cache-free forward."""
    from llama_rlhf.parallel.comm import gather_from_group
    case, ps, model = load_case(cases_file, "gemma2")
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=FAMILY_NEW, num_samples=2)
    out = generate(model, case["prompts"], params, (), ps, max_batch_size=3, max_seq_len=FAMILY_MAX_SEQ, seed=1)
    worst = 0.0
    with torch.no_grad():
        for prompt, per_prompt in zip(case["prompts"], out):
            for c in per_prompt:
                ids = torch.tensor([prompt + c.token_ids[:-1]])
                logits = gather_from_group(model(ids), ps.mp_group)[0, len(prompt) - 1:]  # [new, V_padded]
                probs = filtered_distribution(logits.float(), params)
                for step, token in enumerate(c.token_ids):
                    assert probs[step, token] > 0, f"token {token} was filtered out"
                    worst = max(worst, abs(math.log(probs[step, token].item()) - c.logprobs[step]))
    assert worst < 1e-4, f"sampled log-probs differ from the recomputation by {worst:.2e}"


def check_mp_greedy_and_sampled_choice(*_):
    """next_tokens on vocab-parallel slices equals the single-process choice on the full rows (ties: lowest id)."""
    from llama_rlhf.inference.sampling import next_tokens
    ps = grid(2, 1)
    full = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    full[0, 3] = full[0, 12] = full[0].max() + 1.0  # a tie across the two ranks
    local = full[:, 8 * ps.mp_rank:8 * (ps.mp_rank + 1)]
    token, logprob = next_tokens(local, GREEDY, ps, vocab_start=8 * ps.mp_rank)
    assert token.tolist() == full.argmax(-1).tolist() and token[0] == 3
    want = torch.log_softmax(full.double(), -1).gather(-1, token.view(-1, 1)).squeeze(-1)
    assert torch.allclose(logprob, want, atol=1e-6)
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.95)
    keys = torch.tensor([[i, 0, 0] for i in range(5)])
    token, logprob = next_tokens(local, params, ps, vocab_start=8 * ps.mp_rank, seed=11, keys=keys)
    want_token, want_logprob = sample(filtered_distribution(full, params), uniforms(11, keys))
    assert token.tolist() == want_token.tolist() and torch.allclose(logprob, want_logprob, atol=1e-12)


def check_bfloat16(cases_file):
    """bf16 weights (the solver's default), and fp32 weights under bf16 autocast: the cached decode picks the
    tokens a cache-free greedy loop picks with the same model, and the cache holds bf16."""
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.parallel.comm import gather_from_group
    case, ps, fp32_model = load_case(cases_file, "llama")
    bf16_model = load_pretrained(case["folder"], case["model_type"], ps, dtype=torch.bfloat16)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    for model, compute in ((bf16_model, None), (fp32_model, torch.bfloat16)):
        engine = Generator(model.eval(), case["prompts"], params, (), ps, 3, FAMILY_MAX_SEQ, 0, None, compute,
                           None, 10)
        assert engine.cache.k[0].dtype == torch.bfloat16
        with torch.inference_mode():
            results = engine.run()
            for prompt, per_prompt in zip(case["prompts"], results):
                ids = list(prompt)
                for _ in range(4):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute is not None):
                        logits = gather_from_group(model(torch.tensor([ids])), ps.mp_group)[0, -1]
                    ids.append(int(logits.float().argmax()))
                assert per_prompt[0].token_ids == ids[len(prompt):], (compute, per_prompt[0].token_ids, ids)


FAMILIES = ["llama", "llama_kv1_tied", "llama_mha", "llama3", "qwen2", "qwen3", "gemma2", "mistral", "internlm3"]


def make_family_check(name):
    def check(cases_file):
        check_family(cases_file, name)
    check.__name__ = f"check_{name}"
    check.__qualname__ = check.__name__
    return check


# module-level functions so the spawned workers can import them by name
for _name in FAMILIES:
    globals()[f"check_{_name}"] = make_family_check(_name)
MP2_CHECKS = [globals()[f"check_{n}"] for n in FAMILIES] + [check_sampling, check_temperature_to_zero_is_greedy,
                                                            check_sampled_logprobs, check_mp_greedy_and_sampled_choice,
                                                            check_bfloat16]


@pytest.fixture(scope="module")
def mp2_report(family_cases):
    return run_checks(2, MP2_CHECKS, family_cases)


def test_every_family_is_registered():
    from llama_rlhf.models.families import FAMILIES as REGISTRY
    covered = {"llama-hf", "llama3-hf", "qwen", "qwen3", "gemma2", "mistral", "internlm3"}
    assert covered <= set(REGISTRY), f"families not registered: {covered - set(REGISTRY)}"


@pytest.mark.parametrize("name", [c.__name__ for c in MP2_CHECKS])
def test_mp2(mp2_report, name):
    assert_check(mp2_report, name)
