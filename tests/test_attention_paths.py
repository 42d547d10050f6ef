"""The CUDA dispatch of models/attention.py, checked on the CPU with flash-attn stand-ins (exact SDPA
references): the sliding window reaches flash-attn when it is the only mask, packed documents take the varlen
kernel with the right cu_seqlens, and a masked SDPA on CUDA repeats KV heads; every path equals the CPU one."""
import torch
import torch.nn.functional as F

from llama_rlhf.models import attention as A

B, S, HQ, HKV, D, WINDOW = 2, 12, 4, 2, 8, 5
SCALE = D ** -0.5


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, HQ, D, generator=g, dtype=torch.float64),
            torch.randn(B, S, HKV, D, generator=g, dtype=torch.float64),
            torch.randn(B, S, HKV, D, generator=g, dtype=torch.float64))


def fake_flash(q, k, v, softmax_scale, causal, window_size, softcap):
    """flash_attn_func's contract on [B, S, H, D]: causal, keys at most window_size[0] back."""
    assert causal and softcap == 0.0
    window = window_size[0] + 1 if window_size[0] >= 0 else None
    mask = A.build_mask(q.shape[1], k.shape[1], 0, q.device, window=window)
    n_rep = q.shape[2] // k.shape[2]  # the explicit kernel: no dispatch back into the code under test
    return A.softcapped_attention(q, A.repeat_kv(k, n_rep), A.repeat_kv(v, n_rep), mask, softmax_scale, None)


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size, softcap):
    """flash_attn_varlen_func's contract on [T, H, D] with cumulative document offsets."""
    assert torch.equal(cu_q, cu_k) and max_q == max_k and causal and cu_q.dtype == torch.int32
    out = torch.empty_like(q)
    for lo, hi in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        assert hi - lo <= max_q
        out[lo:hi] = fake_flash(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], softmax_scale, causal,
                                window_size, softcap)[0]
    return out


def as_if_on_gpu(monkeypatch, record):
    monkeypatch.setattr(A, "on_cuda", lambda q: True)
    monkeypatch.setattr(A, "flash_ok", lambda q: True)

    def flash(*args, **kwargs):
        record.append("flash")
        return fake_flash(*args, **kwargs)

    def varlen(*args, **kwargs):
        record.append(("varlen", args[3].tolist(), args[5]))
        return fake_varlen(*args, **kwargs)

    monkeypatch.setattr(A, "flash_attn_func", flash)
    monkeypatch.setattr(A, "flash_attn_varlen_func", varlen)


def test_window_only_mask_goes_to_flash_with_the_window(monkeypatch):
    q, k, v = qkv()
    mask = A.build_mask(S, S, 0, q.device, window=WINDOW)
    want = A.attention(q, k, v, SCALE, mask, window=WINDOW)  # CPU: SDPA with the dense mask
    record = []
    as_if_on_gpu(monkeypatch, record)
    got = A.attention(q, k, v, SCALE, mask, window=WINDOW, window_only=True)
    assert record == ["flash"] and torch.allclose(got, want, atol=1e-5)  # the stand-in computes in fp32
    record.clear()
    segments = torch.tensor([[0] * 6 + [1] * 6, [0] * 12])
    packed = A.build_mask(S, S, 0, q.device, segment_ids=segments, window=WINDOW)
    A.attention(q, k, v, SCALE, packed, window=WINDOW, window_only=False)  # packing: not the window-only case
    assert record == []


def test_packed_documents_take_varlen_flash(monkeypatch):
    q, k, v = qkv(1)
    segments = torch.tensor([[0] * 4 + [1] * 5 + [-1] * 3, [0] * 7 + [1] * 5])
    plan = A.varlen_plan(segments)
    assert plan[0].tolist() == [0, 4, 9, 12, 19, 24] and plan[1] == 7
    for window in (None, WINDOW):
        want = A.attention(q, k, v, SCALE, A.build_mask(S, S, 0, q.device, segment_ids=segments, window=window),
                           window=window)
        record = []
        with monkeypatch.context() as m:
            as_if_on_gpu(m, record)
            got = A.attention(q, k, v, SCALE, None, window=window, varlen=plan)
        assert record == [("varlen", [0, 4, 9, 12, 19, 24], 7)]
        assert torch.allclose(got, want, atol=1e-5), window


def test_masked_sdpa_on_cuda_repeats_kv_heads(monkeypatch):
    q, k, v = qkv(2)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    mask = A.build_mask(S, S, 0, q.device, key_valid=valid)
    want = A.attention(q, k, v, SCALE, mask)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((k.shape[1], kwargs.get("enable_gqa")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(A, "on_cuda", lambda q: True)
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", recording)
    got = A.attention(q, k, v, SCALE, mask)
    assert seen == [(HQ, False)] and torch.allclose(got, want, atol=1e-12)


def test_decode_step_equals_the_explicit_kernel_on_one_and_two_threads():
    """One query per row over a padded cache: grouped queries (one thread) and SDPA's GQA (more threads) both give
    the explicit kernel's output."""
    q, k, v = qkv(3)
    q = q[:, -1:]  # [B, 1, HQ, D] over all S keys
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :4] = False  # row 0 left-padded
    mask = A.build_mask(1, S, S - 1, q.device, key_valid=valid)
    want = A.softcapped_attention(q, A.repeat_kv(k, HQ // HKV), A.repeat_kv(v, HQ // HKV), mask, SCALE, None)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = A.attention(q, k, v, SCALE, mask)
            assert got.shape == (B, 1, HQ, D) and (got - want).abs().max() < 1e-12, threads
    finally:
        torch.set_num_threads(saved)
