"""Sequence parallelism: zigzag ring attention with an exact, hand-written backward.

The sequence is cut into 2·SP chunks of length C; SP rank r holds chunks r and 2·SP−1−r (see
``sequence_split.py``). Forward: the local K/V (un-repeated GQA heads, one buffer) travel once around the SP
ring, each hop a ``batch_isend_irecv`` to the next rank and from the previous one, posted before the current
block is computed so communication overlaps compute. Partial outputs merge by log-sum-exp in fp32 (fp64 for
fp64 inputs). Backward: K/V travel around again; a dK/dV accumulator travels with them, each rank adds its
contribution, and after SP hops every accumulator is back with the rank that owns those keys.

Which part of a K/V block from rank s my queries (rank r) see, by causality:
  s == r  the local 2C x 2C causal square (local order is global order);
  s <  r  all my 2C queries see s's first chunk (C keys) fully; its second chunk is in their future;
  s >  r  only my second chunk (C queries) sees both of s's chunks (2C keys) fully.
Every off-diagonal block is 2C·C score pairs, so every rank does the same work. Sliding windows and packed
documents (segment ids) refine a block with a mask built from true global slots; a block they empty is skipped.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .sequence_split import zigzag_slots

try:  # optional: the CUDA kernel; its private forward/backward (flash-attn >= 2.7) return and take the lse
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward  # type: ignore
    _params = inspect.signature(getattr(_flash_attn_forward, "_init_fn", _flash_attn_forward)).parameters
    if not {"window_size_left", "softcap"} <= set(_params):
        raise ImportError("flash-attn older than 2.7: its private API differs; the math kernel is used instead")
except Exception:  # noqa: BLE001 - any import failure just means "not available"
    _flash_attn_forward = _flash_attn_backward = None

TAG_KV, TAG_DKV = 17, 18  # distinct P2P tags for the K/V and dK/dV streams (gloo matches by tag)


# ----------------------------------------------------------------------------------------------------------
# Block kernels: q [B, H, Sq, D], k/v [B, Hkv, Sk, D] (GQA: query head h uses KV head h // (H / Hkv)).
# forward -> (out [B, H, Sq, D] in q's dtype or wider, lse [B, H, Sq] in the accumulation dtype; a row with no
#            allowed key gets lse -inf and output 0)
# backward(dout, q, k, v, out, lse) with the FINAL merged out and lse -> (dq, dk, dv) for this block.
# mask: None (every pair, or the causal square when causal=True) or bool [B|1, 1, Sq, Sk], True = may attend.
# ----------------------------------------------------------------------------------------------------------

def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class MathKernel:
    """Explicit scores in fp32 (fp64 for fp64 inputs); any mask; tanh soft-capping of the scores (Gemma 2)."""

    name, masks, softcap = "math", True, True

    @staticmethod
    def _scores(q, k, mask, causal, scale, softcap):
        """-> scores [B, Hkv, G, Sq, Sk] (masked: -inf), tanh(raw / cap) or None, q grouped [B, Hkv, G, Sq, D]."""
        acc = accumulation_dtype(q.dtype)
        b, h, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        qg = q.to(acc).reshape(b, hkv, h // hkv, sq, d)
        scores = qg @ k.to(acc).unsqueeze(2).transpose(-1, -2) * scale  # [B, Hkv, G, Sq, Sk]
        capped = None
        if softcap is not None:
            capped = torch.tanh(scores / softcap)
            scores = capped * softcap
        if causal:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(2) if mask.dim() == 4 else ~mask, float("-inf"))
        return scores, capped, qg

    @classmethod
    def forward(cls, q, k, v, mask, causal, scale, softcap):
        b, h, sq, d = q.shape
        scores, _, _ = cls._scores(q, k, mask, causal, scale, softcap)
        lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, Sq]
        probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
        out = probs @ v.to(scores.dtype).unsqueeze(2)  # [B, Hkv, G, Sq, D]
        return out.reshape(b, h, sq, d), lse.reshape(b, h, sq)

    @classmethod
    def backward(cls, dout, q, k, v, out, lse, mask, causal, scale, softcap):
        b, h, sq, d = q.shape
        hkv = k.shape[1]
        scores, capped, qg = cls._scores(q, k, mask, causal, scale, softcap)
        acc = scores.dtype
        probs = torch.exp(scores - lse.to(acc).reshape(b, hkv, h // hkv, sq, 1))  # final lse: finite rows
        do = dout.to(acc).reshape(b, hkv, h // hkv, sq, d)
        delta = (do * out.to(acc).reshape(b, hkv, h // hkv, sq, d)).sum(-1, keepdim=True)  # rowsum(dO * O)
        dv = (probs.transpose(-1, -2) @ do).sum(2)  # [B, Hkv, Sk, D]
        dscores = probs * (do @ v.to(acc).unsqueeze(2).transpose(-1, -2) - delta)
        if capped is not None:
            dscores = dscores * (1 - capped * capped)
        dscores = dscores * scale
        dq = (dscores @ k.to(acc).unsqueeze(2)).reshape(b, h, sq, d)
        dk = (dscores.transpose(-1, -2) @ qg).sum(2)
        return dq, dk, dv


class CpuFlashKernel:
    """PyTorch's fused CPU flash attention (``_scaled_dot_product_flash_attention_for_cpu`` and its backward)."""

    name, masks, softcap = "cpu_flash", True, False

    @staticmethod
    def _additive(mask, dtype):
        return None if mask is None else torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, float("-inf"))

    @classmethod
    def forward(cls, q, k, v, mask, causal, scale, softcap):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=cls._additive(mask, q.dtype), scale=scale)
        lse = lse.to(accumulation_dtype(q.dtype))
        if mask is not None:  # the kernel reports lse 0 for a row with no allowed key; it must weigh nothing
            lse = lse.masked_fill(~mask.any(-1), float("-inf"))
        return out, lse

    @classmethod
    def backward(cls, dout, q, k, v, out, lse, mask, causal, scale, softcap):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(  # strided inputs are fine
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=cls._additive(mask, q.dtype), scale=scale)


class FlashAttnKernel:
    """flash-attn 2 on CUDA (fp16/bf16): its forward returns the log-sum-exp, its backward takes it.

    flash-attn works in [B, S, H, D]; the views below transpose without copying. No masks (blocks with a
    window or packed documents fall back to the math kernel).
    """

    name, masks, softcap = "flash_attn", False, True

    @staticmethod
    def available(q) -> bool:
        return (_flash_attn_forward is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                and q.shape[-1] % 8 == 0)

    @staticmethod
    def forward(q, k, v, mask, causal, scale, softcap):
        out, lse, _, _ = _flash_attn_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, scale,
                                             causal, -1, -1, softcap or 0.0, None, False)
        return out.transpose(1, 2), lse  # [B, Sq, H, D] -> [B, H, Sq, D]; lse [B, H, Sq] fp32

    @staticmethod
    def backward(dout, q, k, v, out, lse, mask, causal, scale, softcap):
        qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (qs, ks, vs))
        _flash_attn_backward(dout.transpose(1, 2), qs, ks, vs, out.transpose(1, 2), lse.contiguous(), dq, dk, dv,
                             0.0, scale, causal, -1, -1, softcap or 0.0, None, False, None)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


KERNELS = {k.name: k for k in (MathKernel, CpuFlashKernel, FlashAttnKernel)}
_forced_kernel: str | None = None


@contextlib.contextmanager
def use_kernel(name: str | None):
    """Force the block kernel ('math', 'cpu_flash', 'flash_attn') inside the block; None: automatic."""
    global _forced_kernel
    if name is not None and name not in KERNELS:
        raise ValueError(f"unknown ring-attention kernel {name!r} (known: {', '.join(KERNELS)})")
    previous, _forced_kernel = _forced_kernel, name
    try:
        yield
    finally:
        _forced_kernel = previous


def choose_kernel(q: torch.Tensor, softcap: float | None, name: str | None = None):
    """The block kernel: ``name`` (or the forced one) if given, else flash-attn on CUDA when installed,
    the CPU flash kernel on the CPU, and the math kernel otherwise or when scores are soft-capped."""
    name = name or _forced_kernel
    if name is not None:
        kernel = KERNELS[name]
        if softcap is not None and not kernel.softcap:
            raise ValueError(f"ring-attention kernel {name!r} cannot soft-cap attention scores; use 'math'")
        if kernel is FlashAttnKernel and not FlashAttnKernel.available(q):
            raise ValueError("ring-attention kernel 'flash_attn' needs flash-attn installed, CUDA, fp16/bf16 "
                             "and a head size that is a multiple of 8")
        return kernel
    if FlashAttnKernel.available(q):
        return FlashAttnKernel
    if q.device.type == "cpu" and softcap is None:
        return CpuFlashKernel
    return MathKernel


# ----------------------------------------------------------------------------------------------------------
# Work accounting (for the balance test and benchmarks): observers get (phase, q_len, k_len, score pairs).
# ----------------------------------------------------------------------------------------------------------
_observers: list = []


@contextlib.contextmanager
def observe_blocks(callback):
    """Call ``callback(phase, block)`` for every block kernel call ("forward" / "backward") inside the block."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


# ----------------------------------------------------------------------------------------------------------
# The ring
# ----------------------------------------------------------------------------------------------------------

class _Transfer:
    """A posted send-to-next / receive-from-previous pair; ``wait()`` returns the received tensor."""

    def __init__(self, sent, received, requests):
        self.sent, self.received, self.requests = sent, received, requests

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        self.sent = None
        return self.received


class Ring:
    """This rank's place in its SP ring: group rank, size, and the GLOBAL ranks of its neighbours (P2P needs them)."""

    def __init__(self, group):
        self.group = group
        if group is None or dist.get_world_size(group) == 1:
            self.rank, self.size, self.next_rank, self.prev_rank = 0, 1, None, None
            return
        ranks = dist.get_process_group_ranks(group)
        self.rank, self.size = dist.get_rank(group), len(ranks)
        self.next_rank, self.prev_rank = ranks[(self.rank + 1) % self.size], ranks[(self.rank - 1) % self.size]

    def pass_on(self, tensor: torch.Tensor, tag: int) -> _Transfer:
        """Start sending ``tensor`` to the next rank and receiving the previous rank's into a new buffer."""
        if self.size == 1:
            return _Transfer(None, tensor, [])
        sent = tensor.contiguous()
        received = torch.empty_like(sent)
        requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, sent, self.next_rank, self.group, tag),
                                           dist.P2POp(dist.irecv, received, self.prev_rank, self.group, tag)])
        return _Transfer(sent, received, requests)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.size == 1:
            return [tensor]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        return parts


@dataclass
class Block:
    """The part of one (my queries, rank ``source``'s keys) pair that is attended."""

    source: int
    q_rows: slice
    k_rows: slice
    causal: bool  # the plain causal square (only on the diagonal, without a mask)
    mask: torch.Tensor | None  # bool [B|1, 1, Sq, Sk]

    @property
    def pairs(self) -> int:
        """Score pairs computed per (batch row, head); a causal square counts its lower triangle."""
        sq, sk = self.q_rows.stop - self.q_rows.start, self.k_rows.stop - self.k_rows.start
        if self.mask is not None:
            return int(self.mask.sum()) // self.mask.shape[0]
        return sq * (sq + 1) // 2 if self.causal else sq * sk


class BlockPlan:
    """For every source rank of the ring: which rows and keys my queries attend, and with which mask.

    Built once per forward (shared by the layers with the same window, and by backward): positional masks are made
    on the host, and the empty/full tests of all blocks cost one device-to-host copy (none without segments)."""

    def __init__(self, ring: Ring, local_len: int, device, window: int | None, segments: list | None):
        self.ring, self.window, self.segments = ring, window, segments
        self.chunk = local_len // 2
        total = local_len * ring.size
        self.slots = [zigzag_slots(total, ring.size, r) for r in range(ring.size)]  # host
        self.blocks = self._build(device)

    def _rows(self, source: int) -> tuple[slice, slice, bool]:
        me, c = self.ring.rank, self.chunk
        if source == me:
            return slice(0, 2 * c), slice(0, 2 * c), True
        if source < me:
            return slice(0, 2 * c), slice(0, c), False
        return slice(c, 2 * c), slice(0, 2 * c), False

    def _build(self, device) -> dict[int, Block | None]:
        me, sources = self.ring.rank, range(self.ring.size)
        if self.window is None and self.segments is None:
            return {s: Block(s, *self._rows(s), None) for s in sources}
        masks = {}
        for source in sources:
            q_rows, k_rows, _ = self._rows(source)
            q_slot = self.slots[me][q_rows].view(-1, 1)
            k_slot = self.slots[source][k_rows].view(1, -1)
            allowed = k_slot <= q_slot
            if self.window is not None:
                allowed = allowed & (q_slot - k_slot < self.window)
            allowed = allowed.view(1, 1, *allowed.shape)
            if self.segments is not None:
                q_seg, k_seg = self.segments[me][:, q_rows], self.segments[source][:, k_rows]
                allowed = allowed.to(device) & (q_seg.unsqueeze(-1) == k_seg.unsqueeze(1)).unsqueeze(1)
            masks[source] = allowed
        flags = torch.stack([torch.stack([m.any(), m.all()]) for m in masks.values()]).tolist()  # one sync
        blocks = {}
        for (source, mask), (some, every) in zip(masks.items(), flags):
            q_rows, k_rows, _ = self._rows(source)
            blocks[source] = (None if not some else Block(source, q_rows, k_rows, False, None) if every
                              else Block(source, q_rows, k_rows, False, mask.to(device)))
        return blocks

    def block(self, source: int) -> Block | None:
        return self.blocks[source]


def _kernel_for(kernel, block: Block):
    return kernel if block.mask is None or kernel.masks else MathKernel


def _notify(phase: str, block: Block) -> None:
    for callback in _observers:
        callback(phase, block)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[..., S, H, D] -> [..., H, S, D] as a view: block kernels see [B, H, S, D] over [B, S, H, D] memory."""
    return x.transpose(-3, -2)


class _RingAttention(torch.autograd.Function):
    """fwd: K/V once around the SP ring (P2P next/previous), partial outputs merged by log-sum-exp;
    bwd: K/V around again, dK/dV accumulators travelling with them arrive at their owners after SP hops."""

    @staticmethod
    def forward(ctx, q, k, v, group, scale, softcap, window, segment_ids, kernel_name, plans):
        with _no_autocast(q.device):
            ring = Ring(group)
            kernel = choose_kernel(q, softcap, kernel_name)
            plan = plans.get(("ring", window)) if plans is not None else None
            if plan is None:  # once per forward: the segment ids are gathered and the masks made here only
                segments = ring.all_gather(segment_ids) if segment_ids is not None else None
                plan = BlockPlan(ring, q.shape[1], q.device, window, segments)
                if plans is not None:
                    plans[("ring", window)] = plan
            acc = accumulation_dtype(q.dtype)
            kv = torch.stack([k, v])  # the travelling buffer [2, B, S, Hkv, D], q's dtype on every rank
            out = _heads_first(torch.empty(q.shape, dtype=acc, device=q.device))  # [B, H, S, D] view
            lse = None  # [B, H, S]
            for step in range(ring.size):
                source = (ring.rank - step) % ring.size
                incoming = ring.pass_on(kv, TAG_KV) if step + 1 < ring.size else None  # overlaps the compute
                block = plan.block(source)
                if block is not None:
                    _notify("forward", block)
                    rows, keys = block.q_rows, block.k_rows
                    o, l = _kernel_for(kernel, block).forward(
                        _heads_first(q[:, rows]), _heads_first(kv[0, :, keys]), _heads_first(kv[1, :, keys]),
                        block.mask, block.causal, scale, softcap)
                    if lse is None:  # the diagonal block comes first and gives every row a finite lse
                        out.copy_(o)
                        lse = l.to(acc)
                    else:
                        merged = torch.logaddexp(lse[:, :, rows], l)
                        out[:, :, rows] = (out[:, :, rows] * torch.exp(lse[:, :, rows] - merged).unsqueeze(-1)
                                           + o * torch.exp(l - merged).unsqueeze(-1))
                        lse[:, :, rows] = merged
                if incoming is not None:
                    kv = incoming.wait()
            out = out.transpose(1, 2).to(q.dtype)  # [B, S, H, D], contiguous
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.softcap, ctx.kernel = group, scale, softcap, kernel
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, softcap, kernel = ctx.scale, ctx.softcap, ctx.kernel
        with _no_autocast(q.device):
            ring, plan = Ring(ctx.group), ctx.plan
            acc = accumulation_dtype(q.dtype)
            dout = dout.to(q.dtype)
            kv = torch.stack([k, v])  # [2, B, S, Hkv, D]
            dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # [B, S, H, D]
            travelling = None  # the dK/dV accumulator arriving from the previous rank
            for step in range(ring.size):
                source = (ring.rank - step) % ring.size
                incoming = ring.pass_on(kv, TAG_KV) if step + 1 < ring.size else None
                dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # my part of source's dK/dV [2, B, S, Hkv, D]
                block = plan.block(source)
                if block is not None:
                    _notify("backward", block)
                    rows, keys = block.q_rows, block.k_rows
                    gq, gk, gv = _kernel_for(kernel, block).backward(
                        *(_heads_first(t[:, rows]) for t in (dout, q)), _heads_first(kv[0, :, keys]),
                        _heads_first(kv[1, :, keys]), _heads_first(out[:, rows]), lse[:, :, rows], block.mask,
                        block.causal, scale, softcap)
                    dq[:, rows] += gq.transpose(1, 2)
                    dkv[0, :, keys] += gk.transpose(1, 2)
                    dkv[1, :, keys] += gv.transpose(1, 2)
                if travelling is not None:
                    dkv += travelling.wait()
                travelling = ring.pass_on(dkv, TAG_DKV)  # on to the next rank, which holds source's K/V next
                if incoming is not None:
                    kv = incoming.wait()
            dkv = travelling.wait()  # after SP hops: the gradient of my own K/V
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp_group, scale: float,
                   softcap: float | None = None, window: int | None = None,
                   segment_ids: torch.Tensor | None = None, kernel: str | None = None,
                   plans: dict | None = None) -> torch.Tensor:
    """Exact causal attention of this rank's zigzag chunks over the whole sequence held by the SP ring.

    q [B, S_local, Hq, D], k/v [B, S_local, Hkv, D] (GQA, un-repeated) -> [B, S_local, Hq, D].
    ``window``: keys more than window − 1 slots back are masked (Mistral, Gemma 2); ``softcap``: scores
    soft-capped by tanh (Gemma 2); ``segment_ids`` [B, S_local]: packed documents attend only within
    themselves. ``kernel`` forces a block kernel ('math', 'cpu_flash', 'flash_attn'); None chooses. ``plans``: a
    dict living for one model forward (the layers share its block plans; the same segment ids in every layer).
    """
    b, s, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != s or k.shape[3] != d or hq % k.shape[2]:
        raise ValueError(f"ring_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} must be "
                         f"[B, S_local, H, D] with the same B, S_local, D and Hq a multiple of Hkv")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"ring_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if s % 2:
        raise ValueError(f"ring_attention: the local sequence length {s} must be even (two zigzag chunks); pad the "
                         f"batch to a multiple of 2 x --sequence_parallel_size")
    if segment_ids is not None and tuple(segment_ids.shape) != (b, s):
        raise ValueError(f"ring_attention: segment_ids {tuple(segment_ids.shape)} must be [B, S_local] = {(b, s)}")
    return _RingAttention.apply(q, k, v, sp_group, float(scale), softcap, window, segment_ids, kernel, plans)
