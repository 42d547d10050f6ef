"""Qwen1 (Qwen-7B/14B/72B) layout: a tiny Qwen2 model written out under Qwen1's names loads as --model_type qwen.

The weights of a transformers Qwen2ForCausalLM (q/k/v biases, untied head, as Qwen1) are renamed and fused the
way Qwen1 stores them: ``transformer.wte``, ``h.N.ln_1``/``ln_2``, one ``attn.c_attn`` (q, k, v rows, with
bias), ``attn.c_proj``, MLP ``w2`` (gate, under silu) / ``w1`` (up) / ``c_proj`` (down), ``ln_f``, ``lm_head``;
config.json in QWenConfig's fields (intermediate_size twice the MLP width, kv_channels, seq_length, ...), a
sharded safetensors index and a ``qwen.tiktoken`` tokenizer. Loaded by us at MP 1 and 2 it must reproduce the
Qwen2 reference's logits, loss and gradients.
"""
import base64
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from llama_rlhf.checkpoint.qwen1 import open_qwen_checkpoint
from llama_rlhf.models.config import ConfigError
from llama_rlhf.models.families import detect, get_family
from llama_rlhf.tokenizer import load_tokenizer
from tests.distributed import assert_check, run_checks
from tests.family_reference import batch, build_hf_model, check_parity, read_diffs, write_reference

LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def qwen1_state(hf_state: dict, num_layers: int) -> dict:
    """Qwen2 HF names -> Qwen1 names (q, k, v fused into c_attn row-wise)."""
    out = {"transformer.wte.weight": hf_state["model.embed_tokens.weight"],
           "transformer.ln_f.weight": hf_state["model.norm.weight"], "lm_head.weight": hf_state["lm_head.weight"]}
    for i in range(num_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.c_attn.{kind}"] = torch.cat([hf_state[src + f"self_attn.{p}_proj.{kind}"]
                                                          for p in ("q", "k", "v")])
        out[dst + "attn.c_proj.weight"] = hf_state[src + "self_attn.o_proj.weight"]
        out[dst + "ln_1.weight"] = hf_state[src + "input_layernorm.weight"]
        out[dst + "ln_2.weight"] = hf_state[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.w2.weight"] = hf_state[src + "mlp.gate_proj.weight"]  # a2 = w2(x); a1 * silu(a2)
        out[dst + "mlp.w1.weight"] = hf_state[src + "mlp.up_proj.weight"]
        out[dst + "mlp.c_proj.weight"] = hf_state[src + "mlp.down_proj.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def qwen1_config_json(vocab: int) -> dict:
    """config.json in Qwen-7B's form (its fields and their meaning)."""
    return {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
            "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
            "vocab_size": vocab, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 256, "kv_channels": 16, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000,
            "rotary_pct": 1.0, "seq_length": 64, "max_position_embeddings": 8192, "no_bias": True,
            "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True, "use_flash_attn": "auto",
            "bf16": False, "fp16": False, "fp32": False, "initializer_range": 0.02, "scale_attn_weights": True}


def write_qwen1_checkpoint(folder: str, hf_model) -> None:
    """Two safetensors files + index, config.json and a qwen.tiktoken (256 byte tokens + 208 specials)."""
    os.makedirs(folder)
    state = qwen1_state(hf_model.state_dict(), hf_model.config.num_hidden_layers)
    keys = sorted(state)
    files = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in files.items():
        save_file({k: state[k] for k in part}, os.path.join(folder, name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in files.items() for k in part}}
    json.dump(index, open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    json.dump(qwen1_config_json(hf_model.config.vocab_size), open(os.path.join(folder, "config.json"), "w"))
    with open(os.path.join(folder, "qwen.tiktoken"), "w") as f:
        for b in range(256):
            f.write(f"{base64.b64encode(bytes([b])).decode()} {b}\n")


@pytest.fixture(scope="module")
def qwen1(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    root = str(tmp_path_factory.mktemp("qwen1"))
    cfg = Qwen2Config(vocab_size=480, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=64,
                      rope_theta=10000.0, tie_word_embeddings=False, attention_dropout=0.0)
    model = build_hf_model(os.path.join(root, "qwen2_hf"), cfg, Qwen2ForCausalLM, seed=21)
    folder = os.path.join(root, "qwen1")
    write_qwen1_checkpoint(folder, model)
    ids, labels, positions = batch(cfg.vocab_size, seed=21, position_offset=40)
    write_reference(model, ids, labels, positions, os.path.join(folder, "reference.pt"))
    return {"name": "qwen1", "folder": folder, "model_type": "qwen", "ref": os.path.join(folder, "reference.pt"),
            "hf": os.path.join(root, "qwen2_hf")}


def check_qwen1(case):
    check_parity(case, LAYOUTS)


def test_qwen1_matches_the_qwen2_reference(qwen1):
    assert_check(run_checks(2, [check_qwen1], qwen1), "check_qwen1")
    diffs = read_diffs(qwen1)
    assert set(diffs) == {f"mp{mp}_sp{sp}" for mp, sp in LAYOUTS}
    print("qwen1: " + ", ".join(f"{k} logits {v['logits']:.1e} grad {v['grad']:.1e}" for k, v in diffs.items()))


def test_qwen1_config_tokenizer_and_detection(qwen1):
    cfg = get_family("qwen").read_config(qwen1["folder"])
    assert (cfg.intermediate_size, cfg.head_dim, cfg.num_kv_heads, cfg.max_position_embeddings) == (128, 16, 4, 64)
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.tie_word_embeddings) == (True, False, False, False)
    model_type, why = detect(qwen1["folder"])
    assert model_type == "qwen" and "'qwen'" in why and "QWenLMHeadModel" in why
    tok = load_tokenizer(qwen1["folder"], model_type="qwen")
    assert tok.kind == "qwen_tiktoken" and tok.vocab_size == 256 + 208 <= cfg.vocab_size
    assert tok.encode("hi") == [ord("h"), ord("i")] and tok.end_ids >= {256, 258}  # <|endoftext|>, <|im_end|>


def test_qwen1_source_slices_equal_the_qwen2_tensors(qwen1):
    from safetensors.torch import load_file
    hf = load_file(os.path.join(qwen1["hf"], "model.safetensors"))
    cfg = get_family("qwen").read_config(qwen1["folder"])
    source = open_qwen_checkpoint(qwen1["folder"], cfg)
    assert source.keys() == set(hf)
    for key, full in hf.items():
        assert source.shape(key) == tuple(full.shape) and torch.equal(source.read(key), full), key
        for dim in range(full.dim()):
            size = full.shape[dim]
            for start, stop in ((0, size // 2), (size // 2, size), (3, size - 5)):
                assert torch.equal(source.read(key, dim, start, stop), full.narrow(dim, start, stop - start)), key


def test_qwen1_bad_config(tmp_path):
    base = qwen1_config_json(480)
    for change, message in (({"intermediate_size": 255}, "twice the MLP width, so it must be even"),
                            ({"rotary_pct": 0.5}, "rotary_pct 0.5 is not supported"),
                            ({"kv_channels": 32}, "kv_channels 32 x num_attention_heads 4 must equal hidden_size 64"),
                            ({"layer_norm_epsilon": None}, "required field 'layer_norm_epsilon' is missing")):
        (tmp_path / "config.json").write_text(json.dumps(base | change))
        with pytest.raises(ConfigError, match=message):
            get_family("qwen").read_config(str(tmp_path))
