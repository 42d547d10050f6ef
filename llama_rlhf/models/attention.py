"""Attention kernels on one rank: masks (causal, packing, padding, sliding window), SDPA, soft-capping.

Sequence parallelism (ring attention across ranks) lives in ``parallel/ring_attention.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: only used on CUDA when installed
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure just means "not available"
    flash_attn_func = flash_attn_varlen_func = None


def on_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda


def flash_ok(q: torch.Tensor) -> bool:
    """flash-attn can take q: installed, on CUDA, 16-bit."""
    return flash_attn_func is not None and on_cuda(q) and q.dtype in (torch.float16, torch.bfloat16)


def varlen_plan(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Packed rows [B, S] -> (cu_seqlens int32 [docs + 1] over the B*S flattened tokens, longest document).
    A document starts at every row start and wherever the segment id changes (padding, id -1, is one more).
    Made once per forward (one host sync for the longest), shared by every layer."""
    b, s = segment_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = starts.flatten().nonzero().squeeze(-1)
    cu = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def build_mask(q_len: int, k_len: int, q_start: int, device, segment_ids=None, key_valid=None,
               window: int | None = None) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, Sq, Sk] (True = may attend), or None when plain causal attention suffices.

    Queries sit at key slots q_start .. q_start + q_len - 1. Each query always sees itself, so padding rows
    never turn into all-masked rows (their outputs are unused but stay finite).
    """
    if segment_ids is None and key_valid is None and window is None and q_start == 0 and q_len == k_len:
        return None
    q_idx = torch.arange(q_start, q_start + q_len, device=device).view(-1, 1)
    k_idx = torch.arange(k_len, device=device).view(1, -1)
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed.view(1, 1, q_len, k_len)
    if segment_ids is not None:  # packed documents: [B, S], same ids attend to each other
        q_seg = segment_ids[:, q_start:q_start + q_len] if segment_ids.shape[1] == k_len else segment_ids
        allowed = allowed & (q_seg.unsqueeze(-1) == segment_ids[:, :k_len].unsqueeze(1)).unsqueeze(1)
    if key_valid is not None:  # [B, Sk], False on padding keys
        allowed = allowed & key_valid[:, :k_len].view(key_valid.shape[0], 1, 1, k_len)
    return allowed | (k_idx == q_idx).view(1, 1, q_len, k_len)


def shared_prefix_mask(branches: torch.Tensor, positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, S, S] (True = may attend) for rows holding one prefix followed by several continuations of
    it, one after another: ``branches`` [B, S] is 0 on the prefix, k >= 1 on continuation k, -1 on padding. A token
    sees the earlier tokens of the prefix and of its own continuation, and itself; ``window`` limits the distance in
    ``positions`` [B, S] (each continuation's positions carry on from the prefix's, so they are the true distances)."""
    s = branches.shape[1]
    slot = torch.arange(s, device=branches.device)
    q_branch, k_branch = branches.unsqueeze(-1), branches.unsqueeze(1)  # [B, S, 1], [B, 1, S]
    allowed = (slot.view(-1, 1) >= slot.view(1, -1)) & ((k_branch == 0) | (k_branch == q_branch)) & (k_branch >= 0)
    if window is not None:
        allowed = allowed & (positions.unsqueeze(-1) - positions.unsqueeze(1) < window)
    return (allowed | (slot.view(-1, 1) == slot.view(1, -1))).unsqueeze(1)  # [B, S, S] -> [B, 1, S, S]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> 0 where allowed, -inf elsewhere, in ``dtype``: built once per forward and shared by every
    layer (SDPA converts a boolean mask per call, and each layer's autograd would keep its own converted copy)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, S, Hkv * n_rep, D], each KV head repeated for its group of query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)


def softcapped_attention(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """Explicit attention with tanh soft-capping of the scores (Gemma 2); softmax in at least fp32.

    q [B, Sq, H, D], k/v [B, Sk, H, D], mask [B|1, 1, Sq, Sk] (boolean or additive) or None (causal) -> [B, Sq, H, D].
    """
    up = (lambda t: t.float()) if q.element_size() < 4 else (lambda t: t)  # at least fp32 (fp64 stays fp64)
    scores = torch.einsum("bqhd,bkhd->bhqk", up(q), up(k)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril(k.shape[1] - q.shape[1])
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask  # additive
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def decode_attention(q, k, v, scale: float, mask) -> torch.Tensor:
    """One new token per row over a KV cache without copying KV heads: q [B, 1, Hq, D], k/v [B, Sk, Hkv, D],
    mask [B|1, 1, 1, Sk] -> [B, 1, Hq, D]. The query heads sharing a KV head become that head's query rows."""
    b, _, hq, d = q.shape
    grouped = q.reshape(b, k.shape[2], hq // k.shape[2], d)  # [B, Hkv, n_rep, D]
    out = F.scaled_dot_product_attention(grouped, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(b, 1, hq, d)


def attention(q, k, v, scale: float, mask=None, softcap: float | None = None,
              window: int | None = None, window_only: bool = False, varlen=None) -> torch.Tensor:
    """Attention of q [B, Sq, Hq, D] over k/v [B, Sk, Hkv, D] (GQA) -> [B, Sq, Hq, D].

    ``mask`` comes from ``build_mask`` (None: causal); ``window_only``: the mask is causal + ``window`` and nothing
    else (no packing, padding or cache), which flash-attn takes as its window argument instead. flash-attn on
    CUDA when installed and the mask allows, otherwise PyTorch SDPA; the explicit kernel only when scores must be
    soft-capped. ``varlen`` (``varlen_plan`` of packed segments, no cache or padding mask): flash-attn's varlen
    kernel over the documents instead of a dense mask. On CUDA a masked SDPA gets repeated KV heads: SDPA's GQA
    with a mask falls back to the math kernel (fp32 [B, H, S, S] scores), the repeat keeps the efficient one.
    A one-token decode step groups each KV head's queries (``decode_attention``) on CUDA and on one CPU thread; on
    more CPU threads SDPA's own GQA over every query head is faster (batch-16 SmolLM2 decode, two threads, three
    in-process runs: 11.0-12.1 against 13.2-15.0 ms of attention per step; on one thread 16.9-17.0 grouped against
    17.8-18.4).
    """
    n_rep = q.shape[2] // k.shape[2]
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:  # additive masks match q
        mask = mask.to(q.dtype)
    if varlen is not None and flash_attn_varlen_func is not None and flash_ok(q) and q.shape[1] == k.shape[1]:
        (b, s, h, d), (cu, longest) = q.shape, varlen
        out = flash_attn_varlen_func(q.reshape(b * s, h, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d),
                                     cu, cu, longest, longest, softmax_scale=scale, causal=True,
                                     window_size=(window - 1, 0) if window else (-1, -1), softcap=softcap or 0.0)
        return out.view(b, s, h, d)
    if flash_ok(q) and (mask is None or (window_only and window)) and q.shape[1] == k.shape[1]:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True,
                               window_size=(window - 1, 0) if window else (-1, -1), softcap=softcap or 0.0)
    if q.shape[1] == 1 and mask is not None and softcap is None and n_rep > 1 and (
            on_cuda(q) or torch.get_num_threads() == 1):  # CPU threads share SDPA's GQA blocks better (below)
        return decode_attention(q, k, v, scale, mask)
    if softcap is not None:
        return softcapped_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, scale, softcap)
    if on_cuda(q) and mask is not None and n_rep > 1:
        k, v, n_rep = repeat_kv(k, n_rep), repeat_kv(v, n_rep), 1
    # KV heads are shared by their query group inside SDPA (no repeated copy of K and V)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=n_rep > 1)
    return out.transpose(1, 2)  # [B, H, Sq, D] -> [B, Sq, H, D]
