"""LoRA on the parallel layers against the single process and against PEFT, PEFT folders both ways, merged export,
adapters off, frozen base, all-reduce count, QLoRA formats. One gloo group of 4 ranks runs every check.

References: PEFT (``get_peft_model`` on transformers' model, adapters randomised, saved by PEFT) for a tiny Llama
(GQA split at MP 2 and 4) and a tiny Qwen2 (attention biases, KV heads replicated at MP 4, rsLoRA, three targets);
our own single-process model in fp64 for MP 2 / 4 and SP 2.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from llama_rlhf.checkpoint.export import export_hf
from llama_rlhf.checkpoint.hf import CheckpointError
from llama_rlhf.checkpoint.peft import load_adapter, save_adapter
from llama_rlhf.models.config import ModelConfig
from llama_rlhf.models.init import init_weights
from llama_rlhf.models.lora import (AdaptersOff, LoRASpec, adapters_disabled, apply_lora, freeze_base,
                                    lora_parameters, merged_tensors)
from llama_rlhf.models.pretrained import build_model, load_pretrained
from llama_rlhf.models.quant import NF4_MAX_HALF_GAP, QuantizedWeight, quantize_base
from llama_rlhf.parallel.comm import all_reduce, gather_from_group
from llama_rlhf.parallel.cross_entropy import mean_over_tokens, vocab_parallel_cross_entropy
from llama_rlhf.parallel.layers import take_shard
from llama_rlhf.parallel.state import single_process_state
from llama_rlhf.training.distributed_optimizer import DistributedAdamW
from llama_rlhf.training.grad_sync import GradientSync
from tests.distributed import assert_check, grid, run_checks
from tests.hf_reference import sample_batch, save_tiny_model
from tests.test_model_parity import count_mp_all_reduces

PEFT_TOL = 1e-5  # fp32, ours vs PEFT
FP64_TOL = 1e-10  # fp64, sharded vs single process


def full_logits(local, model):
    return gather_from_group(local, model.ps.mp_group)[..., :model.cfg.vocab_size]


def next_token_loss(model, ids, labels):
    logits = model(ids)
    lab = labels[:, 1:]
    return logits, mean_over_tokens(vocab_parallel_cross_entropy(logits[:, :-1], lab, model.ps.mp_group), lab, None)


# ------------------------------------------------------------------ ours vs PEFT (fp32), PEFT folders both ways
def check_peft_parity(cases, out_root):
    worst = {}
    for name, case in cases.items():
        ref = torch.load(case["reference"], weights_only=True)
        for mp in (1, 2, 4):
            ps = grid(mp, 1)
            model = load_pretrained(case["base"], case["model_type"], ps)
            load_adapter(model, case["adapter"])
            logits, loss = next_token_loss(model, ref["ids"], ref["labels"])
            d = (full_logits(logits.detach(), model) - ref["logits"]).abs().max().item()
            assert d <= PEFT_TOL, f"{name} MP={mp}: logits differ from PEFT's by {d:.2e}"
            loss.backward()
            GradientSync(model, ps).reduce_model_parallel()  # DP replicas computed the same batch: MP sums only
            grads = lora_parameters(model)
            assert len(grads) == len(ref["grads"]), (len(grads), len(ref["grads"]))
            dg = max((p.grad - take_shard(ref["grads"][n], p.shard)).abs().max().item() for n, p in grads.items())
            assert dg <= PEFT_TOL, f"{name} MP={mp}: adapter gradients differ from PEFT's by {dg:.2e}"
            worst[f"{name} MP={mp}"] = (d, dg)
            with torch.no_grad(), adapters_disabled(model):  # adapters off == PEFT's disable_adapter()
                off = full_logits(model(ref["ids"]), model)
            d_off = (off - ref["base_logits"]).abs().max().item()
            assert d_off <= PEFT_TOL, f"{name} MP={mp}: adapters-off logits differ from the base by {d_off:.2e}"
            if mp == 4:  # save at MP=4 (gathered whole): exactly the tensors PEFT saved
                out = os.path.join(out_root, f"ours_{name}")
                if ps.rank == 0:
                    os.makedirs(out, exist_ok=True)
                save_adapter(model, ps, out, case["base"])
                torch.distributed.barrier()
                ours, peft_saved = load_file(os.path.join(out, "adapter_model.safetensors")), \
                    load_file(os.path.join(case["adapter"], "adapter_model.safetensors"))
                assert ours.keys() == peft_saved.keys(), sorted(set(ours) ^ set(peft_saved))[:4]
                for key in ours:
                    assert torch.equal(ours[key], peft_saved[key]), f"{key} changed in the MP=4 load/save round trip"
            if mp == 2:  # merged export (written at MP=2) loaded at MP=1 equals the adapted forward
                merged = os.path.join(out_root, f"merged_{name}")
                if ps.rank == 0:
                    os.makedirs(merged, exist_ok=True)
                export_hf(model, ps, merged, os.path.join(case["base"], "config.json"), None,
                          tensors=merged_tensors(model, torch.float32))
                torch.distributed.barrier()
                plain = load_pretrained(merged, case["model_type"], grid(1, 1))
                with torch.no_grad():
                    dm = (plain(ref["ids"])[..., :model.cfg.vocab_size] - full_logits(model(ref["ids"]), model))
                assert dm.abs().max().item() <= PEFT_TOL, f"{name}: merged export differs by {dm.abs().max():.2e}"
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out_root, "parity.txt"), "w") as f:
            for k, (d, dg) in worst.items():
                f.write(f"{k}: max |logit diff| vs PEFT {d:.2e}, max |A/B grad diff| {dg:.2e}\n")


def check_adapter_for_another_base_fails(cases, _):
    model = load_pretrained(cases["qwen2"]["base"], "qwen", grid(1, 1))
    with pytest.raises(CheckpointError, match=r"lora_A.weight has shape \[4, 64\] but this model needs \[4, 32\]"):
        load_adapter(model, cases["llama"]["adapter"])


# ------------------------------------------------------------------ sharded vs single process (fp64)
def tiny_config(layers=2):
    return ModelConfig("llama-hf", vocab_size=70, hidden_size=32, intermediate_size=64, num_layers=layers,
                       num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=64)  # KV heads split at MP 2, replicated at MP 4


def adapted(ps, dtype=torch.float64, layers=2, spec=LoRASpec(4, 8.0)):
    """Our tiny model with the same (layout-independent) base and non-zero adapters on every layout."""
    model = build_model(tiny_config(layers), ps, dtype)
    init_weights(model, seed=0)
    apply_lora(model, spec, seed=3, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(lora_parameters(model).items()):
            full = torch.randn(p.shard.full_shape, generator=g, dtype=torch.float64) * 0.3
            if ".lora_B." in name:
                p.copy_(take_shard(full, p.shard))
    return model


def check_sharded_equals_single_process(*_):
    ids, labels = sample_batch(70, batch=2, seq=12, seed=1)
    single = adapted(single_process_state())
    ref_logits, ref_loss = next_token_loss(single, ids, labels)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in lora_parameters(single).items()}
    for mp, sp in ((2, 1), (4, 1), (2, 2), (1, 2)):
        ps = grid(mp, sp)
        model = adapted(ps)
        if sp == 1:
            logits, loss = next_token_loss(model, ids, labels)
            d = (full_logits(logits.detach(), model) - ref_logits).abs().max().item()
            assert d <= FP64_TOL, f"MP={mp}: logits differ by {d:.2e}"
        else:  # the SFT loss on zigzag chunks: token sums over SP equal the whole sequence's
            from llama_rlhf.training.sft import forward_loss_sum
            shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
            batch = {"input_ids": ids, "labels": shifted, "position_ids": torch.arange(12).expand(2, 12),
                     "segment_ids": torch.zeros_like(ids)}
            loss = forward_loss_sum(model, batch, ps, torch.float64, packing=False) / (shifted != -100).sum()
            total = all_reduce(loss.detach(), ps.sp_group)
            assert abs(total.item() - ref_loss.item()) <= FP64_TOL, (mp, sp, total.item(), ref_loss.item())
        loss.backward()
        sync = GradientSync(model, ps)
        sync.reduce_model_parallel()
        for n, p in lora_parameters(model).items():
            grad = all_reduce(p.grad, ps.sp_group) if sp > 1 else p.grad
            d = (grad - take_shard(ref_grads[n], p.shard)).abs().max().item()
            assert d <= FP64_TOL, f"MP={mp} SP={sp}: grad of {n} differs by {d:.2e}"


def check_all_reduces_per_layer_unchanged(*_):
    for mp in (2, 4):
        ps = grid(mp, 1)
        counts = {layers: count_mp_all_reduces(adapted(ps, torch.float32, layers), ps, torch.randint(0, 70, (2, 8)))
                  for layers in (1, 3)}
        (f1, b1), (f3, b3) = counts[1], counts[3]
        assert (f3 - f1, b3 - b1) == (4, 4), f"MP={mp} with LoRA: per layer fwd {(f3 - f1) / 2}, bwd {(b3 - b1) / 2}"
        # the frozen embedding needs no gradient: the first attention input's backward all-reduce is skipped
        assert (f1, b1) == (3, 1), f"MP={mp} with LoRA: one-layer totals fwd {f1}, bwd {b1}"


def check_training_moves_adapters_only(_, out_root):
    """Two AdamW steps at MP=2 x DP=2 (zero stage 1): the base stays bit-identical, adapters move, the optimizer
    holds adapter state only; adapters-off log-probs equal the untouched base model's exactly."""
    ps = grid(2, 1)
    model = adapted(ps, torch.float32)
    freeze_base(model, torch.float32)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    opt = DistributedAdamW(model, ps, stage=1, lr=1e-2, param_dtype=torch.float32)
    ids, labels = sample_batch(70, batch=2, seq=12, seed=ps.dp_rank)
    for _ in range(2):
        _, loss = next_token_loss(model, ids, labels)
        opt.start_micro_batch(last=True)
        (loss / ps.dp_size).backward()
        opt.step(1.0)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"frozen {n} changed"
        else:
            assert not torch.equal(p, lora[n]), f"adapter {n} did not move"
    held = opt.memory_breakdown(model)
    n_lora = sum(p.numel() for p in lora_parameters(model).values())
    assert held["trainable_parameters"] == n_lora, (held, n_lora)
    owned = sum(pc.hi - pc.lo for pc in opt.pieces)
    assert held["moments"] == 8 * owned and held["masters"] == 0, (held, owned)
    assert {pc.name for pc in opt.pieces} <= set(lora), "a frozen parameter reached the optimizer"
    plain = build_model(tiny_config(), ps, torch.float32)
    init_weights(plain, seed=0)
    with torch.no_grad():
        ref = plain(ids)
        off = AdaptersOff(model)(ids)
    assert torch.equal(off, ref), f"adapters-off logits differ from the base by {(off - ref).abs().max():.2e}"
    from llama_rlhf.training.logprobs import token_logprobs  # the GRPO reference's log-probs: the base's, exactly
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(12).expand(2, 12)}
    with torch.no_grad():
        lp_off, _ = token_logprobs(AdaptersOff(model), batch, ps, 0.7, torch.float32)
        lp_base, _ = token_logprobs(plain, batch, ps, 0.7, torch.float32)
        lp_on, _ = token_logprobs(model, batch, ps, 0.7, torch.float32)
    assert torch.equal(lp_off, lp_base) and not torch.equal(lp_on, lp_base)
    if ps.rank == 0:
        with open(os.path.join(out_root, "memory.txt"), "w") as f:
            f.write(f"MP=2 DP=2 stage 1 LoRA r=4: {json.dumps(held)}\n")


# ------------------------------------------------------------------ QLoRA formats
def check_quantized_formats(_, out_root):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=g) * 0.05
    nf4 = QuantizedWeight.quantize(w, "nf4", None)
    err = (nf4.dequantize() - w).abs().view(-1, 64)
    bound = w.view(-1, 64).abs().amax(1, keepdim=True) * NF4_MAX_HALF_GAP * (1 + 1e-6)
    assert bool((err <= bound).all()), f"nf4 error {err.max():.3e} beyond its bound"
    assert nf4.nbytes / w.numel() == 0.5625, nf4.nbytes / w.numel()
    q8 = QuantizedWeight.quantize(w, "int8", None)
    err8 = (q8.dequantize() - w).abs()
    assert bool((err8 <= w.abs().amax(1, keepdim=True) / 254 * (1 + 1e-6)).all()), f"int8 error {err8.max():.3e}"
    assert abs(q8.nbytes / w.numel() - (1 + 4 / 160)) < 1e-12
    figures = {}
    for kind in ("nf4", "int8"):
        ps = grid(2, 1)
        model = adapted(ps, torch.float32)
        dense = {n: p.detach().clone() for n, p in model.named_parameters()}
        rows = sum(p.shape[0] for n, p in dense.items() if n.endswith("proj.weight"))
        stats = quantize_base(model, kind)
        expected = 0.5625 if kind == "nf4" else 1 + 4 * rows / stats["params"]  # tiny rows: int8's absmax shows
        assert abs(stats["bytes_per_param"] - expected) < 1e-12, (kind, stats, expected)
        figures[kind] = stats["bytes_per_param"]
        # the quantized model computes exactly what a dense model holding the dequantized weights computes
        twin = adapted(ps, torch.float32)
        with torch.no_grad():
            for name, layer in twin.named_modules():
                if hasattr(layer, "lora_A") and getattr(layer, "lora_A", None) is not None:
                    quant = model.get_submodule(name).quant
                    layer.weight.copy_(quant.dequantize())
                    assert (quant.dequantize() - dense[name + ".weight"]).abs().max() > 0
            ids = torch.randint(0, 70, (2, 9))
            d = (model(ids) - twin(ids)).abs().max().item()
        assert d <= 1e-5, f"{kind}: quantized forward differs from its dequantized twin by {d:.2e}"
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out_root, "quant.txt"), "w") as f:
            f.write(f"bytes per base parameter (tiny, MP=2): {figures}\n")


# ------------------------------------------------------------------ the parent: transformers + PEFT references
def build_cases(root):
    """Tiny bases saved by transformers, PEFT adapters (randomised, saved by PEFT), PEFT's outputs and grads."""
    import peft
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    specs = {
        "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                                 max_position_embeddings=64, tie_word_embeddings=False),
                  "llama-hf", dict(r=4, lora_alpha=8, target_modules="all-linear")),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=64, tie_word_embeddings=False),
                  "qwen", dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    }
    cases = {}
    for i, (name, (cls, config, model_type, lora)) in enumerate(specs.items()):
        base = save_tiny_model(os.path.join(root, name), config, cls, seed=i, std=0.1)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
        pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        adapter = os.path.join(root, f"{name}_adapter")
        pm.save_pretrained(adapter)
        ids, labels = sample_batch(config.vocab_size, batch=2, seq=12, seed=i)
        out = pm(input_ids=ids, labels=labels)
        out.loss.backward()
        grads = {n.replace("base_model.model.", "", 1).replace(".default.", "."): p.grad.detach().clone()
                 for n, p in pm.named_parameters() if "lora_" in n}
        with torch.no_grad(), pm.disable_adapter():
            base_logits = pm(input_ids=ids).logits
        reference = os.path.join(root, f"{name}_reference.pt")
        torch.save({"ids": ids, "labels": labels, "logits": out.logits.detach(), "grads": grads,
                    "base_logits": base_logits}, reference)
        cases[name] = {"base": base, "adapter": adapter, "reference": reference, "model_type": model_type}
    return cases


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lora"))
    cases = build_cases(root)
    checks = [check_peft_parity, check_adapter_for_another_base_fails, check_sharded_equals_single_process,
              check_all_reduces_per_layer_unchanged, check_training_moves_adapters_only, check_quantized_formats]
    result = run_checks(4, checks, cases, root)
    for name in ("parity.txt", "memory.txt", "quant.txt"):
        if os.path.isfile(os.path.join(root, name)):
            print(open(os.path.join(root, name)).read())
    return result, cases, root


@pytest.mark.parametrize("check", ["check_peft_parity", "check_adapter_for_another_base_fails",
                                   "check_sharded_equals_single_process", "check_all_reduces_per_layer_unchanged",
                                   "check_training_moves_adapters_only", "check_quantized_formats"])
def test_lora_checks(report, check):
    assert_check(report[0], check)


def test_quantized_smollm2_bytes_per_parameter(smollm2_dir):
    """The issue's bounds on a real model: nf4 <= 0.6 and int8 <= 1.1 bytes per base linear parameter."""
    for kind, limit in (("nf4", 0.6), ("int8", 1.1)):
        model = load_pretrained(smollm2_dir, "llama-hf", single_process_state())
        stats = quantize_base(model, kind)
        print(f"SmolLM2-135M {kind}: {stats['params'] / 1e6:.1f}M linear parameters in {stats['bytes'] / 2**20:.1f} "
              f"MiB = {stats['bytes_per_param']:.4f} bytes/parameter")
        assert stats["bytes_per_param"] <= limit, (kind, stats)
        del model


def test_peft_loads_our_adapter_and_transformers_our_merged_model(report):
    """PeftModel.from_pretrained on our MP=4 save, and transformers on our MP=2 merged export: PEFT's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    assert_check(report[0], "check_peft_parity")
    _, cases, root = report
    for name, case in cases.items():
        ref = torch.load(case["reference"], weights_only=True)
        base = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            logits = PeftModel.from_pretrained(base, os.path.join(root, f"ours_{name}"))(input_ids=ref["ids"]).logits
            assert (logits - ref["logits"]).abs().max().item() <= 1e-6, name
            merged = AutoModelForCausalLM.from_pretrained(os.path.join(root, f"merged_{name}"), dtype=torch.float32,
                                                          attn_implementation="eager")
            d = (merged(input_ids=ref["ids"]).logits - ref["logits"]).abs().max().item()
        assert d <= PEFT_TOL, f"{name}: transformers on our merged export differs from PEFT by {d:.2e}"
