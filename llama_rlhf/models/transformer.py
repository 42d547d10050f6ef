"""The one decoder. Every family (Llama, Qwen, Gemma 2, Mistral, InternLM 3) is a ModelConfig of it.

Module and parameter names mirror Hugging Face keys (``model.layers.N.self_attn.q_proj.weight``), so
loading and exporting HF checkpoints is a matter of slicing, not renaming.

Per layer, model parallelism costs exactly two all-reduces forward (after o_proj and down_proj) and two
backward (at the attention and MLP inputs, via ``copy_to_group``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..parallel.comm import copy_to_group
from ..parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, padded_vocab_size,
                               replicated)
from ..parallel.state import ParallelState
from . import attention as attention_module
from .attention import additive_mask, attention, build_mask, shared_prefix_mask, varlen_plan
from .config import ModelConfig
from .rope import RotaryEmbedding, apply_rotary


@dataclass
class ForwardContext:
    """What every layer needs besides the hidden states: RoPE tables, mask inputs, cache, SP ring."""

    cos: torch.Tensor
    sin: torch.Tensor
    segment_ids: torch.Tensor | None = None  # [B, S] packed documents
    key_valid: torch.Tensor | None = None  # [B, Sk] False on padding keys
    kv_cache: object | None = None  # generation: .update(layer, k, v) -> (k_all, v_all), .start
    sp_group: object = None  # sequence-parallel ring (None: whole sequences on this rank)
    masks: dict | None = None  # built once per forward, keyed by window
    window_only: bool = False  # the masks are causal + sliding window alone (flash-attn takes the window)
    varlen: tuple | None = None  # packed documents for flash-attn's varlen kernel (attention.varlen_plan)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + w), computed in fp32 (offset 1 for Gemma's zero-centred weights)."""

    def __init__(self, dim: int, eps: float, offset: float, copies: int):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = replicated((dim,), copies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.element_size() < 4 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = self.weight.to(xf.dtype)
        return (xf * (scale + self.offset if self.offset else scale)).to(x.dtype)


class Attention(nn.Module):
    """Query heads split across MP; KV heads split (n_kv % MP == 0) or replicated (MP % n_kv == 0)."""

    packed_qkv = None  # set only inside inference.packed.packed_weights: x -> (q, k, v) from one packed GEMM

    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer: int):
        super().__init__()
        mp = ps.mp_size
        cfg.check_model_parallel(mp)
        self.layer, self.group = layer, ps.mp_group
        self.head_dim, self.n_heads = cfg.head_dim, cfg.num_heads // mp
        kv_parts, kv_part = cfg.kv_layout(mp, ps.mp_rank)
        self.n_kv_heads = cfg.num_kv_heads // kv_parts
        self.scale, self.softcap, self.window = cfg.softmax_scale, cfg.attn_logit_softcap, cfg.layer_window(layer)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = ColumnParallelLinear(h, cfg.num_heads * d, self.group, bias=cfg.qkv_bias)
        self.k_proj = ColumnParallelLinear(h, cfg.num_kv_heads * d, self.group, cfg.qkv_bias, kv_parts, kv_part)
        self.v_proj = ColumnParallelLinear(h, cfg.num_kv_heads * d, self.group, cfg.qkv_bias, kv_parts, kv_part)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, h, self.group, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_weight_offset, mp)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_weight_offset, mp)
            for norm in (self.q_norm, self.k_norm):  # shared by all heads; each rank sees only its heads
                norm.weight.mp_partial_grad = True
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, s, _ = x.shape
        x = copy_to_group(x, self.group)  # fwd: identity, bwd: all-reduce over MP
        if self.packed_qkv is not None:  # CPU generation: one GEMM on packed q|k|v weights (inference/packed.py)
            q, k, v = self.packed_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, s, self.n_heads, self.head_dim)  # [B, S, H/mp, D]
        k = k.view(b, s, self.n_kv_heads, self.head_dim)  # [B, S, Hkv_local, D]
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.sp_group is not None:
            from ..parallel.ring_attention import ring_attention
            out = ring_attention(q, k, v, ctx.sp_group, scale=self.scale, softcap=self.softcap, window=self.window,
                                 segment_ids=ctx.segment_ids, plans=ctx.masks)  # this rank's zigzag chunks
        else:
            if ctx.kv_cache is not None:
                k, v = ctx.kv_cache.update(self.layer, k, v)  # [B, Sk, Hkv_local, D]
            out = attention(q, k, v, self.scale, ctx.masks.get(self.window), self.softcap, self.window,
                            ctx.window_only, ctx.varlen)
        return self.o_proj(out.reshape(b, s, self.n_heads * self.head_dim))  # [B, S, H/mp*D] -> [B, S, hidden]


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate/up column-parallel and down row-parallel."""

    packed_gate_up = None  # set only inside inference.packed.packed_weights: x -> (gate, up) from one packed GEMM

    def __init__(self, cfg: ModelConfig, ps: ParallelState):
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.group = ps.mp_group
        self.gate_proj = ColumnParallelLinear(h, f, self.group, bias=cfg.mlp_bias)
        self.up_proj = ColumnParallelLinear(h, f, self.group, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(f, h, self.group, bias=cfg.mlp_bias)
        self.act = F.silu if cfg.hidden_act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_group(x, self.group)  # fwd: identity, bwd: all-reduce over MP
        if self.packed_gate_up is not None:  # CPU generation: one GEMM on packed gate|up weights
            gate, up = self.packed_gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)  # [B,S,h] -> [B,S,f/mp] -> [B,S,h]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset, ps.mp_size)  # noqa: E731
        self.self_attn = Attention(cfg, ps, layer)
        self.mlp = MLP(cfg, ps)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:  # Gemma 2: post_attention_layernorm normalises the attention output
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """HF's ``model.*``: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ps.mp_group)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ps, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset, ps.mp_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)


class CausalLM(nn.Module):
    """Decoder + LM head. forward returns this rank's vocab slice of the logits: [B, S, V_padded / MP]."""

    packed_head = None  # set only inside inference.packed.packed_weights: hidden -> logits on packed weights

    def __init__(self, cfg: ModelConfig, ps: ParallelState):
        super().__init__()
        self.cfg, self.ps = cfg, ps
        self.model = DecoderStack(cfg, ps)
        if not cfg.tie_word_embeddings:
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, padded_vocab_size(cfg.vocab_size, ps.mp_size),
                                                ps.mp_group, copy_input=True, true_out_features=cfg.vocab_size)
        self.activation_checkpointing = False

    def _vocab_range(self) -> tuple[int, int]:
        emb = self.model.embed_tokens
        return emb.vocab_start, emb.vocab_stop

    @property
    def vocab_start(self) -> int:
        return self.model.embed_tokens.vocab_start

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                kv_cache=None, hidden_only: bool = False, branches: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] (this rank's tokens) -> logits [B, S, V_padded / MP] (or hidden states [B, S, h]).

        position_ids default to 0..S-1 (or continue a KV cache). With sequence parallelism the caller passes
        the zigzag chunk's tokens and true positions. ``branches`` [B, S]: each row is one prompt (0) followed by
        several completions of it (1, 2, ...; -1 padding) that attend to the prompt and to themselves only
        (``attention.shared_prefix_mask``); whole rows on every rank, with the completions' true position_ids.
        """
        b, s = input_ids.shape
        if branches is not None and (position_ids is None or segment_ids is not None or key_valid is not None
                                     or kv_cache is not None):
            raise ValueError("branches need explicit position_ids and no segment_ids, key_valid or kv_cache")
        # generation (a KV cache) runs whole sequences on every rank; SP peers hold the same weights
        sp_group = self.ps.sp_group if self.ps.sp_size > 1 and kv_cache is None and branches is None else None
        if sp_group is not None:
            if key_valid is not None:
                raise ValueError("--sequence_parallel_size > 1 is for training on right-padded batches: key "
                                 "padding masks (key_valid) need whole sequences")
            if position_ids is None:  # the zigzag chunks' true positions
                from ..parallel.sequence_split import zigzag_slots
                position_ids = zigzag_slots(s * self.ps.sp_size, self.ps.sp_size, self.ps.sp_rank,
                                            input_ids.device).expand(b, s)
        q_start = kv_cache.start if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(q_start, q_start + s, device=input_ids.device).expand(b, s)
        cos, sin = self.model.rotary(position_ids)
        ctx = ForwardContext(cos, sin, segment_ids, key_valid, kv_cache, sp_group, masks={},
                             window_only=segment_ids is None and key_valid is None and kv_cache is None
                             and branches is None)
        if (sp_group is None and segment_ids is not None and key_valid is None and kv_cache is None
                and attention_module.flash_attn_varlen_func is not None and attention_module.on_cuda(input_ids)):
            ctx.varlen = varlen_plan(segment_ids)  # once per forward, for every layer
        windows = {self.cfg.layer_window(i) for i in range(self.cfg.num_layers)}
        if branches is not None:  # one prompt and its completions per row (training/update_batch.py)
            device_type = input_ids.device.type
            dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else self.model.embed_tokens.weight.dtype)  # what q has in attention
            ctx.masks = {window: additive_mask(shared_prefix_mask(branches, position_ids, window), dtype)
                         for window in windows}
        elif getattr(kv_cache, "static", False):  # fixed-shape decode (inference/static_step.py): masks from tensors
            ctx.masks = kv_cache.masks(windows)
        elif sp_group is None:
            k_len = q_start + s
            for window in windows:
                ctx.masks[window] = build_mask(s, k_len, q_start, input_ids.device, segment_ids, key_valid, window)
        x = self.model.embed_tokens(input_ids)  # [B, S] -> [B, S, h]
        if self.cfg.embed_scale != 1.0:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        x = self.model.norm(x)
        if hidden_only:
            return x
        return self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, h] -> vocab-parallel logits [B, S, V_padded / MP]; padded vocab entries are -inf."""
        if self.packed_head is not None:  # generation on CPU: a prepacked copy of the tied head (inference/packed.py)
            logits = self.packed_head(hidden)
        elif self.cfg.tie_word_embeddings:
            logits = F.linear(copy_to_group(hidden, self.ps.mp_group), self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        cap = self.cfg.final_logit_softcap
        if cap is not None:
            logits = torch.tanh((logits.float() if logits.element_size() < 4 else logits) / cap) * cap
        start, stop = self._vocab_range()
        if stop > self.cfg.vocab_size:  # this rank holds padding rows: mask them out of every softmax
            logits = logits.masked_fill(torch.arange(start, stop, device=logits.device) >= self.cfg.vocab_size,
                                        float("-inf"))
        return logits
