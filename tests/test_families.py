"""Every HF family against transformers: tiny random models saved by transformers, loaded by us at MP 1 and 2.

Logits (1e-4), loss and every parameter gradient must equal transformers' own forward/backward. Each case
is built so its quirk matters (an ablated transformers model must give different logits): Qwen2 biases,
tied embeddings and a sliding window on the upper layer; Qwen3 per-head q/k norms and an explicit head_dim;
Gemma 2 soft-caps that saturate, a window shorter than the sequence on alternating layers, (1+w) norms,
sandwich norms and query_pre_attn_scalar; Mistral's window; Llama 3.1 RoPE scaling at positions where it
changes the angles; InternLM3 from a hand-written config.json (its original field names) against the
equivalent Llama. Half the configs are rewritten in transformers-4 form (rope_theta/rope_scaling).
Config-level checks (detection, bad input, sequence limits) run in the pytest process.
"""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from llama_rlhf.models.config import ConfigError
from llama_rlhf.models.families import FAMILIES, detect, detect_model_type, get_family, read_hf_rope
from llama_rlhf.models.pretrained import load_pretrained
from llama_rlhf.models.rope import PositionError
from llama_rlhf.checkpoint.hf import CheckpointError
from llama_rlhf.parallel.state import single_process_state
from tests.distributed import assert_check, run_checks
from tests.family_reference import (assert_changes, batch, build_hf_model, check_parity, hf_logits, load_hf,
                                    read_diffs, write_reference)

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, attention_dropout=0.0)


def to_transformers4(folder: str) -> None:
    """Rewrite a saved config.json in the transformers-4 form: rope_theta + rope_scaling, no rope_parameters."""
    path = os.path.join(folder, "config.json")
    d = json.load(open(path))
    params = d.pop("rope_parameters")
    d["rope_theta"] = params.pop("rope_theta")
    d["rope_scaling"] = None if params.get("rope_type", "default") == "default" else params
    json.dump(d, open(path, "w"), indent=1)


def case(root, name, model_type, config, model_cls, seed, position_offset=0, transformers4=False):
    """Save a tiny transformers model and its reference; returns (case dict, transformers model, batch)."""
    folder = os.path.join(root, name)
    model = build_hf_model(folder, config, model_cls, seed)
    if transformers4:
        to_transformers4(folder)
        model = load_hf(folder)
    ids, labels, positions = batch(config.vocab_size, seed=seed, position_offset=position_offset)
    ref_file = os.path.join(folder, "reference.pt")
    write_reference(model, ids, labels, positions, ref_file)
    return {"name": name, "folder": folder, "model_type": model_type, "ref": ref_file}, model, (ids, positions)


def build_cases(root: str) -> dict:
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    cases = {}

    cfg = Qwen2Config(**COMMON, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=1e6,
                      use_sliding_window=True, sliding_window=4, max_window_layers=1)
    cases["qwen2"], model, (ids, pos) = case(root, "qwen2", "qwen", cfg, Qwen2ForCausalLM, 1, transformers4=True)
    ref = hf_logits(model, ids, pos)
    assert_changes(ref, hf_logits(load_hf(cases["qwen2"]["folder"], sliding_window=1000), ids, pos),
                   "Qwen2's sliding window")
    assert_changes(ref, hf_logits(load_hf(cases["qwen2"]["folder"], rope_parameters={
        "rope_type": "default", "rope_theta": 1e4}), ids, pos), "Qwen2's rope_theta")

    cfg = Qwen3Config(**COMMON, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False,
                      rope_theta=1e6)
    cases["qwen3"], _, _ = case(root, "qwen3", "qwen3", cfg, Qwen3ForCausalLM, 2)

    cfg = Gemma2Config(**COMMON, head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=64,
                       sliding_window=4, attn_logit_softcapping=3.0, final_logit_softcapping=2.0, rope_theta=1e4,
                       hidden_activation="gelu_pytorch_tanh")
    cases["gemma2"], model, (ids, pos) = case(root, "gemma2", "gemma2", cfg, Gemma2ForCausalLM, 3)
    ref = hf_logits(model, ids, pos)
    folder = cases["gemma2"]["folder"]
    assert ref.abs().max() > 0.9 * 2.0, "final soft-cap not reached: logits never approach the cap"
    assert_changes(ref, hf_logits(load_hf(folder, final_logit_softcapping=None), ids, pos), "the final soft-cap")
    assert_changes(ref, hf_logits(load_hf(folder, attn_logit_softcapping=None), ids, pos), "the attention soft-cap")
    assert_changes(ref, hf_logits(load_hf(folder, sliding_window=1000), ids, pos), "Gemma 2's sliding window")

    cfg = MistralConfig(**COMMON, max_position_embeddings=64, sliding_window=4, rope_theta=1e4)
    cases["mistral"], model, (ids, pos) = case(root, "mistral", "mistral", cfg, MistralForCausalLM, 4,
                                               transformers4=True)
    assert_changes(hf_logits(model, ids, pos),
                   hf_logits(load_hf(cases["mistral"]["folder"], sliding_window=1000), ids, pos),
                   "Mistral's sliding window")

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(**COMMON, max_position_embeddings=131072, tie_word_embeddings=True,
                      rope_parameters={"rope_theta": 500000.0, **scaling})
    cases["llama3"], model, (ids, pos) = case(root, "llama3", "llama3-hf", cfg, LlamaForCausalLM, 5,
                                              position_offset=20000, transformers4=True)
    assert_changes(hf_logits(model, ids, pos), hf_logits(load_hf(cases["llama3"]["folder"], rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0}), ids, pos), "Llama 3.1 RoPE scaling")

    cases.update(internlm3_cases(root))
    return cases


def internlm3_config_json(qkv_bias: bool, bias: bool) -> dict:
    """config.json as InternLM3 ships it: original field names (qkv_bias, bias), transformers-4 rope form."""
    return {"architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3",
            "auto_map": {"AutoConfig": "configuration_internlm3.InternLM3Config",
                         "AutoModelForCausalLM": "modeling_internlm3.InternLM3ForCausalLM"},
            "vocab_size": 101, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu",
            "qkv_bias": qkv_bias, "bias": bias, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
            "rope_theta": 50000000, "rope_scaling": {"factor": 6.0, "rope_type": "dynamic"},
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def internlm3_cases(root: str) -> dict:
    """InternLM3 checkpoints whose weights come from the equivalent LlamaForCausalLM (its reference).

    qkv_bias = bias = True: transformers' own InternLM3 mapping also loads it (and must agree with Llama).
    qkv_bias only: the original modeling code (o_proj and MLP follow `bias`), which transformers' mapping
    cannot express; the Llama reference has a zero o_proj bias that the InternLM3 checkpoint does not store.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    cases = {}
    for name, qkv_bias, bias, seed in (("internlm3", True, True, 6), ("internlm3_qkv_bias", True, False, 7)):
        llama_cfg = LlamaConfig(**COMMON, head_dim=32, max_position_embeddings=64, attention_bias=qkv_bias,
                                mlp_bias=bias, rope_theta=50000000.0, tie_word_embeddings=False)
        llama_dir, folder = os.path.join(root, name + "_llama"), os.path.join(root, name)
        model = build_hf_model(llama_dir, llama_cfg, LlamaForCausalLM, seed)
        drop = set()
        if not bias:
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.o_proj.bias.zero_()
            drop = {k for k in dict(model.named_parameters()) if k.endswith("o_proj.bias")}
        os.makedirs(folder)
        weights = {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
        save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        json.dump(internlm3_config_json(qkv_bias, bias), open(os.path.join(folder, "config.json"), "w"))
        ids, labels, positions = batch(101, seed=seed)
        ref_file = os.path.join(folder, "reference.pt")
        ref = write_reference(model, ids, labels, positions, ref_file)
        if bias:  # transformers' InternLM3 (its Llama mapping of qkv_bias/bias) computes the same
            d = (hf_logits(load_hf(folder), ids, positions) - ref["logits"]).abs().max().item()
            assert d < 1e-5, f"transformers' InternLM3 differs from the Llama reference by {d:.2e}"
        cases[name] = {"name": name, "folder": folder, "model_type": "internlm3", "ref": ref_file}
    return cases


def check_qwen2(cases):
    check_parity(cases["qwen2"], LAYOUTS)


def check_qwen3(cases):
    check_parity(cases["qwen3"], LAYOUTS)


def check_gemma2(cases):
    check_parity(cases["gemma2"], LAYOUTS)


def check_mistral(cases):
    check_parity(cases["mistral"], LAYOUTS)


def check_llama3(cases):
    check_parity(cases["llama3"], LAYOUTS)


def check_internlm3(cases):
    check_parity(cases["internlm3"], LAYOUTS)


def check_internlm3_qkv_bias(cases):
    check_parity(cases["internlm3_qkv_bias"], LAYOUTS)


CHECKS = [check_qwen2, check_qwen3, check_gemma2, check_mistral, check_llama3, check_internlm3,
          check_internlm3_qkv_bias]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return build_cases(str(tmp_path_factory.mktemp("families")))


@pytest.fixture(scope="module")
def report(cases):
    return run_checks(2, CHECKS, cases)


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_family_matches_transformers(report, cases, name):
    assert_check(report, name)
    diffs = read_diffs(cases[name[len("check_"):]])
    assert set(diffs) == {f"mp{mp}_sp{sp}" for mp, sp in LAYOUTS}
    print(f"{name[6:]}: " + ", ".join(f"{k} logits {v['logits']:.1e} grad {v['grad']:.1e}" for k, v in diffs.items()))


# ------------------------------------------------------------------------------------ config level


def test_configs_read_as_transformers_does(cases):
    """Fields that are easy to get wrong, read from the saved configs (both transformers-4 and -5 forms)."""
    cfg = {name: get_family(c["model_type"]).read_config(c["folder"]) for name, c in cases.items()}
    q2 = cfg["qwen2"]
    assert (q2.qkv_bias, q2.o_bias, q2.mlp_bias, q2.tie_word_embeddings, q2.rope_theta) == (True, False, False,
                                                                                            True, 1e6)
    assert q2.sliding_window == 4 and q2.sliding_window_layers == [False, True]
    q3 = cfg["qwen3"]
    assert (q3.qk_norm, q3.head_dim, q3.qkv_bias, q3.sliding_window) == (True, 32, False, None)
    g = cfg["gemma2"]
    assert (g.norm_weight_offset, g.embed_scale, g.sandwich_norm, g.hidden_act) == (1.0, 8.0, True, "gelu_tanh")
    assert (g.attn_scale, g.attn_logit_softcap, g.final_logit_softcap) == (24 ** -0.5, 3.0, 2.0)
    assert g.sliding_window == 4 and g.sliding_window_layers == [True, False] and g.tie_word_embeddings
    assert cfg["mistral"].sliding_window == 4 and cfg["mistral"].sliding_window_layers is None
    l3 = cfg["llama3"]
    assert l3.rope_theta == 500000.0 and l3.rope_scaling["rope_type"] == "llama3" and l3.rope_scaling["factor"] == 8
    i3, i3q = cfg["internlm3"], cfg["internlm3_qkv_bias"]
    assert (i3.qkv_bias, i3.o_bias, i3.mlp_bias, i3.head_dim) == (True, True, True, 32)
    assert (i3q.qkv_bias, i3q.o_bias, i3q.mlp_bias) == (True, False, False)
    assert i3.rope_theta == 5e7 and i3.rope_scaling == {"rope_type": "dynamic", "factor": 6.0}


def test_rope_forms_agree():
    """transformers-4 (rope_theta/rope_scaling/type) and -5 (rope_parameters) configs read the same."""
    v4 = {"rope_theta": 500000.0, "max_position_embeddings": 131072,
          "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    v5 = {"max_position_embeddings": 131072,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 131072}}
    assert read_hf_rope(v4, "v4", 1e4) == read_hf_rope(v5, "v5", 1e4)
    assert read_hf_rope({"rope_theta": 1e6, "rope_scaling": None}, "x", 1e4) == (1e6, None)
    with pytest.warns(UserWarning, match="no rope_theta; using 10000"):
        assert read_hf_rope({}, "x", 1e4) == (1e4, None)
    with pytest.raises(ConfigError, match="rope_theta"):
        read_hf_rope({}, "x", None)
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.5 is not supported"):
        read_hf_rope({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "x", 1e4)


def test_detection_names_the_family(cases, tmp_path):
    expected = {"qwen2": "qwen", "qwen3": "qwen3", "gemma2": "gemma2", "mistral": "mistral", "llama3": "llama3-hf",
                "internlm3": "internlm3", "internlm3_qkv_bias": "internlm3"}
    for name, c in cases.items():
        model_type, why = detect(c["folder"])
        assert model_type == expected[name], (name, model_type, why)
        assert "config.json" in why
    llama2 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(llama2))
    assert detect_model_type(str(tmp_path)) == "llama-hf"
    (tmp_path / "config.json").write_text(json.dumps({**llama2, "rope_theta": 500000.0, "vocab_size": 128256}))
    assert detect_model_type(str(tmp_path)) == "llama3-hf"


def test_every_advertised_type_is_registered():
    assert list(FAMILIES) == ["llama", "llama-hf", "llama3", "llama3-hf", "qwen", "qwen3", "gemma2", "internlm3",
                              "mistral"]


def test_bad_input_errors(cases, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown --model_type 'qwen2'; valid types: llama, llama-hf, llama3"):
        get_family("qwen2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json or params.json"):
        detect(str(tmp_path / "empty"))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"model_type 'gpt2'.*valid: llama, llama-hf"):
        detect(str(odd))
    # a config without a required field: the error names the field and the file
    broken = tmp_path / "broken"
    broken.mkdir()
    d = json.load(open(os.path.join(cases["qwen3"]["folder"], "config.json")))
    del d["hidden_size"]
    (broken / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"broken/config.json: required field 'hidden_size' is missing"):
        get_family("qwen3").read_config(str(broken))
    # Llama 3 in HF form must state its RoPE base
    d = json.load(open(os.path.join(cases["llama3"]["folder"], "config.json")))
    del d["rope_theta"]
    (broken / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="rope_theta"):
        get_family("llama3-hf").read_config(str(broken))


def test_checkpoint_of_another_family_is_refused(cases, tmp_path):
    ps = single_process_state()
    with pytest.raises(ConfigError, match=r"'qwen3' checkpoint \(Qwen3ForCausalLM\), not llama-hf.*--model_type qwen3"):
        load_pretrained(cases["qwen3"]["folder"], "llama-hf", ps)
    with pytest.raises(ConfigError, match=r"'gemma2' checkpoint.*not mistral.*--model_type gemma2"):
        load_pretrained(cases["gemma2"]["folder"], "mistral", ps)
    with pytest.raises(ConfigError, match=r"reads params.json.*looks like --model_type qwen3"):
        load_pretrained(cases["qwen3"]["folder"], "llama", ps)
    # without model_type in config.json the weights themselves give it away
    folder = tmp_path / "anonymous_qwen3"
    folder.mkdir()
    d = json.load(open(os.path.join(cases["qwen3"]["folder"], "config.json")))
    del d["model_type"]
    (folder / "config.json").write_text(json.dumps(d))
    os.symlink(os.path.join(cases["qwen3"]["folder"], "model.safetensors"), folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*q_norm.weight.*is --model_type right"):
        load_pretrained(str(folder), "llama-hf", ps)


def test_sequence_longer_than_the_model_allows_is_an_error(cases):
    ps = single_process_state()
    model = load_pretrained(cases["qwen2"]["folder"], "qwen", ps)  # max_position_embeddings 64
    with torch.no_grad():
        model(torch.zeros(1, 64, dtype=torch.long))  # exactly the limit is fine
        with pytest.raises(PositionError, match=r"position 64 is beyond this model's max_position_embeddings \(64\)"):
            model(torch.zeros(1, 65, dtype=torch.long))
        with pytest.raises(PositionError, match="max_position_embeddings"):
            model(torch.zeros(1, 4, dtype=torch.long), position_ids=torch.tensor([[60, 61, 62, 70]]))


def test_gemma2_defaults_follow_gemma2config(tmp_path):
    """Fields absent from a Gemma 2 config.json take Gemma2Config's defaults; explicit nulls switch them off."""
    d = {"model_type": "gemma2", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
         "max_position_embeddings": 64, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = get_family("gemma2").read_config(str(tmp_path))
    assert (cfg.head_dim, cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.sliding_window) == (256, 50.0, 30.0,
                                                                                                   4096)
    assert cfg.attn_scale == 256 ** -0.5 and cfg.tie_word_embeddings and cfg.hidden_act == "gelu_tanh"
    d.update(attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=None)
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = get_family("gemma2").read_config(str(tmp_path))
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.sliding_window) == (None, None, None)
