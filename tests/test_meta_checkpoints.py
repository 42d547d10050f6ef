"""Meta original checkpoints (--model_type llama / llama3) against transformers.

A random Llama 2 and a random Llama 3.1-style HF model are written out in Meta's own format by an independent
inverse conversion (rotate-half -> interleaved RoPE rows, fairscale splits over 2 shards, params.json,
tokenizer.model), then loaded by us at MP 1, 2 and 4: logits, loss and gradients must equal the HF model's.
Llama 2 keeps vocab_size -1 (taken from its sentencepiece tokenizer) and splits the embedding on dim 1;
Llama 3 splits it on dim 0, uses GQA (KV heads split at MP 2, replicated at MP 4), scaled RoPE at positions
where the scaling matters, and ties the output to the embedding (no output.weight, as in Llama 3.2).
"""
import base64
import io
import json
import os
import re

import pytest
import sentencepiece as spm
import torch

from llama_rlhf.checkpoint.hf import CheckpointError
from llama_rlhf.checkpoint.meta import meta_config, open_meta_checkpoint
from llama_rlhf.models.config import ConfigError
from llama_rlhf.models.families import detect, get_family
from tests.distributed import assert_check, run_checks
from tests.family_reference import (assert_changes, batch, build_hf_model, check_parity, hf_logits, load_hf,
                                    read_diffs, write_reference)

LAYOUTS = [(1, 1), (2, 1), (4, 1), (2, 2)]
TEXT = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
        "Sphinx of black quartz, judge my vow; 0123456789.", "How vexingly quick daft zebras jump?"]

# HF key -> (Meta key, fairscale split dim: 0 column-parallel, 1 row-parallel, None replicated, permute q/k)
HF_TO_META = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight", "embedding", None),
    (r"model\.norm\.weight", "norm.weight", None, None),
    (r"lm_head\.weight", "output.weight", 0, None),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight", 0, "q"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight", 0, "k"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight", 0, None),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight", 1, None),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight", 0, None),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight", 0, None),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight", 1, None),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight", None, None),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight", None, None),
]


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half rows of each head back to Meta's interleaved pairs (the inverse of the load permute)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def write_meta_checkpoint(folder: str, hf_model, params: dict, n_shards: int, embedding_dim: int) -> None:
    """Write ``hf_model`` as Meta's consolidated.NN.pth shards + params.json (fairscale splits)."""
    os.makedirs(folder, exist_ok=True)
    cfg = hf_model.config
    heads = {"q": cfg.num_attention_heads, "k": cfg.num_key_value_heads}
    shards = [{} for _ in range(n_shards)]
    for hf_key, tensor in hf_model.state_dict().items():
        if hf_key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied (Llama 3.2 style): Meta's file has no output.weight
        rule = next(r for r in HF_TO_META if re.fullmatch(r[0], hf_key))
        meta_key, split, permute = re.sub(rule[0], rule[1], hf_key), rule[2], rule[3]
        if permute:
            tensor = half_to_interleaved(tensor, heads[permute])
        split = embedding_dim if split == "embedding" else split
        pieces = [tensor] * n_shards if split is None else tensor.chunk(n_shards, split)
        for shard, piece in zip(shards, pieces):
            shard[meta_key] = piece.clone()
    for i, shard in enumerate(shards):
        if "rope_theta" not in params:  # Llama 2 releases carry a precomputed RoPE table
            shard["rope.freqs"] = torch.randn(cfg.hidden_size // cfg.num_attention_heads // 2)
        torch.save(shard, os.path.join(folder, f"consolidated.{i:02d}.pth"))
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)


def write_sentencepiece(folder: str) -> int:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 10), model_writer=model, vocab_size=90,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()


def write_tiktoken(folder: str) -> int:
    """A Llama 3 style tokenizer.model: the 256 byte tokens as `base64 rank` lines (+256 specials = 512)."""
    with open(os.path.join(folder, "tokenizer.model"), "w") as f:
        for b in range(256):
            f.write(f"{base64.b64encode(bytes([b])).decode()} {b}\n")
    return 256 + 256


def llama2_params():
    return {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}


def llama3_params():
    return {"dim": 64, "ffn_dim_multiplier": 1.3, "multiple_of": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
            "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 512}


def build_cases(root: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM
    cases = {}
    meta = os.path.join(root, "llama2_meta")
    os.makedirs(meta)
    vocab = write_sentencepiece(meta)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=4096, tie_word_embeddings=False, attention_dropout=0.0)
    model = build_hf_model(os.path.join(root, "llama2_hf"), cfg, LlamaForCausalLM, seed=11)
    write_meta_checkpoint(meta, model, llama2_params(), n_shards=2, embedding_dim=1)
    ids, labels, positions = batch(vocab, seed=11, position_offset=100)
    write_reference(model, ids, labels, positions, os.path.join(meta, "reference.pt"))
    cases["llama2"] = {"name": "llama2", "folder": meta, "model_type": "llama", "hf": os.path.join(root, "llama2_hf"),
                       "ref": os.path.join(meta, "reference.pt")}

    meta = os.path.join(root, "llama3_meta")
    os.makedirs(meta)
    vocab = write_tiktoken(meta)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=131072,
                      rope_parameters={"rope_theta": 500000.0, **scaling}, tie_word_embeddings=True,
                      attention_dropout=0.0)
    hf_dir = os.path.join(root, "llama3_hf")
    model = build_hf_model(hf_dir, cfg, LlamaForCausalLM, seed=12)
    write_meta_checkpoint(meta, model, llama3_params(), n_shards=2, embedding_dim=0)
    ids, labels, positions = batch(vocab, seed=12, position_offset=20000)
    write_reference(model, ids, labels, positions, os.path.join(meta, "reference.pt"))
    assert_changes(hf_logits(model, ids, positions), hf_logits(load_hf(hf_dir, rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0}), ids, positions), "Llama 3.1 RoPE scaling")
    cases["llama3"] = {"name": "llama3", "folder": meta, "model_type": "llama3", "hf": hf_dir,
                       "ref": os.path.join(meta, "reference.pt")}
    return cases


def check_llama2_meta(cases):
    check_parity(cases["llama2"], LAYOUTS)


def check_llama3_meta(cases):
    check_parity(cases["llama3"], LAYOUTS)


CHECKS = [check_llama2_meta, check_llama3_meta]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return build_cases(str(tmp_path_factory.mktemp("meta")))


@pytest.fixture(scope="module")
def report(cases):
    return run_checks(4, CHECKS, cases)


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_meta_checkpoint_matches_transformers(report, cases, name):
    assert_check(report, name)
    diffs = read_diffs(cases[name.split("_")[1]])
    assert set(diffs) == {f"mp{mp}_sp{sp}" for mp, sp in LAYOUTS}
    print(f"{name}: " + ", ".join(f"{k} logits {v['logits']:.1e} grad {v['grad']:.1e}" for k, v in diffs.items()))


# ------------------------------------------------------------------------------------ pytest process


@pytest.mark.parametrize("which,shard_counts", [("llama2", (1, 2, 4)), ("llama3", (1, 2))])
def test_any_slice_of_any_shard_count_equals_the_hf_tensor(cases, tmp_path, which, shard_counts):
    """Every key, whole and sliced along each dim at odd offsets, reads exactly the HF tensor."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(cases[which]["hf"], dtype=torch.float32)
    state = hf.state_dict()
    params = llama2_params() if which == "llama2" else llama3_params()
    for n in shard_counts:
        folder = str(tmp_path / f"{which}_{n}")
        write_meta_checkpoint(folder, hf, params, n_shards=n, embedding_dim=1 if which == "llama2" else 0)
        cfg = meta_config(params | {"vocab_size": hf.config.vocab_size}, "params.json", cases[which]["model_type"],
                          folder)
        source = open_meta_checkpoint(folder, cfg)
        expected_keys = set(state) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
        assert source.keys() == expected_keys
        for key in expected_keys:
            full = state[key]
            assert source.shape(key) == tuple(full.shape), key
            assert torch.equal(source.read(key), full), key
            for dim in range(full.dim()):
                size = full.shape[dim]
                for start, stop in ((0, size), (1, size - 3), (size // 3, size // 3 + 5), (size - 2, size)):
                    assert torch.equal(source.read(key, dim, start, stop), full.narrow(dim, start, stop - start)), \
                        (n, key, dim, start, stop)


def test_params_json_gives_the_hf_config(cases):
    from transformers import AutoConfig
    for which in ("llama2", "llama3"):
        ours = get_family(cases[which]["model_type"]).read_config(cases[which]["folder"])
        hf = AutoConfig.from_pretrained(cases[which]["hf"])
        assert (ours.vocab_size, ours.intermediate_size, ours.num_kv_heads, ours.head_dim, ours.rope_theta) == (
            hf.vocab_size, hf.intermediate_size, hf.num_key_value_heads, hf.head_dim, hf.rope_parameters["rope_theta"])
        assert ours.tie_word_embeddings == hf.tie_word_embeddings
    l3 = get_family("llama3").read_config(cases["llama3"]["folder"])
    assert l3.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    assert l3.max_position_embeddings == 131072
    l2 = get_family("llama").read_config(cases["llama2"]["folder"])  # Llama 2's fixed base, no rope_theta field
    assert l2.max_position_embeddings == 4096 and l2.rope_scaling is None and l2.rope_theta == 10000.0
    with pytest.warns(UserWarning, match="no rope_theta; using 500000"):
        assert meta_config(llama3_params() | {"rope_theta": None}, "p", "llama3").rope_theta == 500000.0
    # Meta's FFN rule on the real sizes: Llama 2 7B and Llama 3 8B
    big = {"n_heads": 32, "n_layers": 32, "norm_eps": 1e-5, "vocab_size": 32000}
    assert meta_config(big | {"dim": 4096, "multiple_of": 256}, "p", "llama").intermediate_size == 11008
    l3_8b = meta_config(big | {"dim": 4096, "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "rope_theta": 5e5},
                        "p", "llama3")
    assert l3_8b.intermediate_size == 14336
    # Llama 3.2 1B: trained with factor 32 (its HF config), not the reference code's 8
    l32 = meta_config({"dim": 2048, "n_heads": 32, "n_kv_heads": 8, "n_layers": 16, "multiple_of": 256,
                       "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 5e5, "use_scaled_rope": True,
                       "vocab_size": 128256}, "p", "llama3")
    assert l32.rope_scaling["factor"] == 32.0 and l32.intermediate_size == 8192


def test_detection_of_meta_originals(cases):
    assert detect(cases["llama2"]["folder"])[0] == "llama"
    model_type, why = detect(cases["llama3"]["folder"])
    assert model_type == "llama3" and "params.json" in why and "tiktoken" in why


def test_meta_bad_input(cases, tmp_path):
    src = cases["llama2"]["folder"]
    # params.json missing a field
    bad = tmp_path / "no_dim"
    bad.mkdir()
    (bad / "params.json").write_text(json.dumps({k: v for k, v in llama2_params().items() if k != "dim"}))
    with pytest.raises(ConfigError, match=r"no_dim/params.json: required field 'dim' is missing"):
        get_family("llama").read_config(str(bad))
    # vocab_size -1 without a tokenizer
    bad = tmp_path / "no_tokenizer"
    bad.mkdir()
    (bad / "params.json").write_text(json.dumps(llama2_params()))
    os.symlink(os.path.join(src, "consolidated.00.pth"), bad / "consolidated.00.pth")
    with pytest.raises(ConfigError, match=r"vocab_size -1.*tokenizer file .*no_tokenizer/tokenizer.model does not"):
        get_family("llama").read_config(str(bad))
    # a Llama 3 original as --model_type llama, and the other way round
    with pytest.raises(ConfigError, match="use --model_type llama3, not llama"):
        get_family("llama").read_config(cases["llama3"]["folder"])
    with pytest.raises(ConfigError, match="use --model_type llama, not llama3"):
        get_family("llama3").read_config(src)
    # an HF checkpoint as a Meta type
    with pytest.raises(ConfigError, match=r"reads params.json.*looks like --model_type llama3-hf"):
        get_family("llama3").read_config(cases["llama3"]["hf"])
    # a shard missing from the middle
    gap = tmp_path / "gap"
    gap.mkdir()
    for name in ("params.json", "tokenizer.model", "consolidated.00.pth"):
        os.symlink(os.path.join(src, name), gap / name)
    os.symlink(os.path.join(src, "consolidated.01.pth"), gap / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"incomplete: consolidated.01.pth missing \(found 2 of 3 shards\)"):
        get_family("llama").read_config(str(gap))
    # shards that disagree on their keys
    odd = tmp_path / "odd"
    odd.mkdir()
    shard = torch.load(os.path.join(src, "consolidated.01.pth"), weights_only=True)
    del shard["layers.1.ffn_norm.weight"]
    torch.save(shard, odd / "consolidated.01.pth")
    os.symlink(os.path.join(src, "consolidated.00.pth"), odd / "consolidated.00.pth")
    cfg = meta_config(llama2_params() | {"vocab_size": 90}, "params.json", "llama")
    with pytest.raises(CheckpointError, match=r"disagree on their keys.*layers.1.ffn_norm.weight"):
        open_meta_checkpoint(str(odd), cfg)
