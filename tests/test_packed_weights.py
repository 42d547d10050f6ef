"""oneDNN-prepacked weights for CPU generation (inference/packed.py) against plain F.linear.

- Inside ``packed_weights`` every linear (column, row, LoRA-adapted with non-zero adapters, untied and tied LM
  heads) computes what it computes outside, to fp32 rounding (bf16: to bf16 rounding); the parameters are not
  touched and every layer is restored afterwards, also when the block raises.
- q/k/v and gate/up fused into one packed GEMM each equal the separate packed GEMMs (biases, LoRA deltas).
- Greedy generation of a LoRA-adapted model gives the same tokens and log-probs with and without packing.
"""
import pytest
import torch

from llama_rlhf.inference.engine import generate
from llama_rlhf.inference.packed import packable, packed_weights, packing_available
from llama_rlhf.inference.sampling import SamplingParams
from llama_rlhf.models.config import ModelConfig
from llama_rlhf.models.init import init_weights
from llama_rlhf.models.lora import LoRASpec, apply_lora, lora_parameters
from llama_rlhf.models.pretrained import build_model
from llama_rlhf.parallel.state import single_process_state


def tiny(tied: bool, lora: bool, dtype=torch.float32, bias: bool = False):
    cfg = ModelConfig("llama-hf", vocab_size=70, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64,
                      tie_word_embeddings=tied, qkv_bias=bias, o_bias=bias)
    model = build_model(cfg, single_process_state(), dtype)
    init_weights(model, seed=0)
    if lora:
        apply_lora(model, LoRASpec(4, 8.0), seed=3, dtype=dtype)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, p in sorted(lora_parameters(model).items()):  # B is zero after init: make the adapters count
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    if bias:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("tied,lora,bias", [(False, False, True), (True, False, False), (False, True, False),
                                            (True, True, True)])
def test_packed_forward_equals_plain(tied, lora, bias):
    torch.manual_seed(0)
    model = tiny(tied, lora, bias=bias)
    ids = torch.randint(0, 70, (3, 9))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with torch.inference_mode():
        want = model(ids)
        with packed_weights(model, torch.float32, rows=3) as on:
            assert on
            swapped = [m for m in model.modules() if "forward" in m.__dict__]
            assert len(swapped) == 2 * 2 + (0 if tied else 1), "o, down and the untied head run on their own"
            assert all(packable(m) for m in swapped)
            layers = model.model.layers
            assert all(a.self_attn.packed_qkv is not None and a.mlp.packed_gate_up is not None for a in layers)
            assert (model.packed_head is not None) == tied
            got = model(ids)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert not any("forward" in m.__dict__ for m in model.modules()) and model.packed_head is None
    assert not any({"packed_qkv", "packed_gate_up"} & m.__dict__.keys() for m in model.modules())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items()), "parameters changed"


@pytest.mark.parametrize("lora,bias", [(False, True), (True, False)])
def test_fused_projections_equal_separate_ones(lora, bias):
    """q|k|v and gate|up as one packed GEMM each give what seven separate packed GEMMs give (same dot products:
    fp32 rounding at most), biases and LoRA deltas landing in their own slices."""
    model = tiny(tied=False, lora=lora, bias=bias)
    ids = torch.randint(0, 70, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        with packed_weights(model, torch.float32, rows=2, fuse=False):
            assert model.model.layers[0].self_attn.packed_qkv is None
            separate = model(ids)
        with packed_weights(model, torch.float32, rows=2):
            fused = model(ids)
    assert torch.allclose(fused, separate, rtol=1e-6, atol=1e-6), (fused - separate).abs().max()


def test_packing_is_available_on_this_cpu():
    assert packing_available(torch.device("cpu"), torch.float32), "torch was built without oneDNN"
    assert not packing_available(torch.device("cpu"), torch.float16)


def test_bf16_packed_forward_equals_plain_bf16():
    """bf16 weights (needs oneDNN's bf16 kernels: AVX512-BF16/AMX; elsewhere packing must switch itself off)."""
    model = tiny(tied=True, lora=False, dtype=torch.bfloat16)
    ids = torch.randint(0, 70, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids).float()
        with packed_weights(model, torch.bfloat16, rows=2) as on:
            got = model(ids).float()
    assert on == packing_available(torch.device("cpu"), torch.bfloat16)
    assert got.dtype == want.dtype and torch.allclose(got, want, rtol=2e-2, atol=2e-2), (got - want).abs().max()


def test_layers_are_restored_when_the_block_raises():
    model = tiny(tied=True, lora=True)
    with pytest.raises(RuntimeError, match="boom"):
        with packed_weights(model, torch.float32, rows=1):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules()) and model.packed_head is None
    assert all(m.self_attn.packed_qkv is None and m.mlp.packed_gate_up is None for m in model.model.layers)


def test_disabled_or_gpu_dtype_is_a_no_op():
    model = tiny(tied=False, lora=False)
    for kwargs in ({"enabled": False}, {"dtype": torch.float16}):
        with packed_weights(model, **{"dtype": torch.float32, "rows": 1, **kwargs}) as on:
            assert not on and not any("forward" in m.__dict__ for m in model.modules())


def test_lora_generation_same_tokens_packed_or_not():
    model = tiny(tied=False, lora=True)
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4, 6], [11]]
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    ps = single_process_state()
    packed = generate(model, prompts, params, (), ps, max_batch_size=2)
    plain = generate(model, prompts, params, (), ps, max_batch_size=2, pack_weights=False)
    for a, b in zip(packed, plain):
        assert a[0].token_ids == b[0].token_ids
        assert max(abs(x - y) for x, y in zip(a[0].logprobs, b[0].logprobs)) < 1e-5


def test_fewer_rows_than_the_fast_kernel_are_padded_and_equal_plain():
    """1-3 rows run padded to MIN_GEMM_ROWS inside packed_linear; the real rows' outputs equal F.linear's."""
    from llama_rlhf.inference.packed import MIN_GEMM_ROWS, pack, packed_linear
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    packed = pack(weight, torch.float32, rows=1)
    for shape in [(1, 24), (2, 1, 24), (3, 24), (MIN_GEMM_ROWS, 24), (2, 5, 24)]:
        x = torch.randn(*shape, generator=g)
        got = packed_linear(x, packed, bias)
        assert got.shape == (*shape[:-1], 40)
        assert torch.allclose(got, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5), shape


def test_frozen_weights_keep_their_packed_copy_until_they_change():
    """requires_grad=False weights are packed once and reused across calls; an in-place update or a reassignment
    repacks them; trainable weights are packed anew on every call and keep nothing between calls."""
    model = tiny(tied=True, lora=False)
    ids = torch.randint(0, 70, (1, 4), generator=torch.Generator().manual_seed(3))
    mlp = model.model.layers[0].mlp
    layer = mlp.up_proj  # packed with gate_proj as one copy, kept on the MLP

    def packed_copy():
        with torch.inference_mode(), packed_weights(model, torch.float32, rows=1):
            out = model(ids)
        return mlp.__dict__.get("_packed_cache", (None, None))[1], out

    assert packed_copy()[0] is None, "a trainable weight must not keep a packed copy"
    model.requires_grad_(False)
    first, _ = packed_copy()
    assert first is not None and packed_copy()[0] is first, "a frozen, unchanged weight is packed once"
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: the version counter moves
    second, out = packed_copy()
    assert second is not first
    with torch.inference_mode():
        assert torch.allclose(out, model(ids), rtol=1e-5, atol=1e-5), "the update must reach the packed copy"
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 0.5, requires_grad=False)  # a new tensor
    third, out = packed_copy()
    assert third is not second
    with torch.inference_mode():
        assert torch.allclose(out, model(ids), rtol=1e-5, atol=1e-5)
    assert model.model.embed_tokens.__dict__.get("_packed_cache") is not None, "the tied head is cached too"
    assert mlp.down_proj.__dict__.get("_packed_cache") is not None, "and every unfused linear"
