"""oneDNN-prepacked weights for generation on CPU: every linear layer's weight (and the LM head) reordered once per
``generate`` call into oneDNN's blocked layout, so each decode step's small-batch GEMMs run 2-3x faster than
``F.linear`` (MKL's sgemm on a plain row-major weight). The trained parameters are untouched: the packed copies
live only inside the ``packed_weights`` block (they cost one more copy of the weights in memory while it runs)
and are rebuilt on the next call, so GRPO rollouts always see the latest update. Frozen weights
(``requires_grad=False``: a LoRA base, a rollout copy, a model loaded only to sample) keep their packed copy on
the layer between calls and are repacked only when the weight's storage or version counter changes (an in-place
update, ``.data =`` reassignment); that copy then stays in memory after the call too.

A GEMM of fewer than ``MIN_GEMM_ROWS`` rows is padded to that many: oneDNN's AVX2 kernels on the CPUs measured
here run 1 or 2 rows 25-35% slower than 4 (SmolLM2's decode GEMMs, one thread: 37 / 44 / 29 ms for 1 / 2 / 4
rows), so batch-1 and batch-2 decoding get the 4-row kernel for free (the extra rows are zeros, discarded).

Projections of the same input are fused: each attention layer's q, k and v (and each MLP's gate and up) run as
one GEMM on one packed copy of their local shards stacked along the output dim (biases stacked too, LoRA deltas
added to their slices), so a decode step makes 3 GEMM calls per layer instead of 7. The parameters keep their HF
layout (checkpoints and export are untouched); the fused copy exists only as the packed weight. Fused and separate
GEMMs compute the same dot products (tests/test_packed_weights.py holds them to 1e-6); one thread, per layer,
q|k|v takes 91 instead of 164 us at 1 row, and a batch-1 generate call 45.6 instead of 48.6 ms per token (README,
Performance).

Only CPU float32/bfloat16 weights are packed; quantized LoRA bases keep their own path, and the LoRA adapters
(small) stay ``F.linear``. MP layers keep their all-reduce: only the local GEMM changes.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn as nn

from ..models.lora import LoRAColumnParallelLinear, LoRAMixin, LoRARowParallelLinear
from ..parallel.comm import copy_to_group, reduce_from_group
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN linear with prepacked weights exists for this device and compute dtype."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


MIN_GEMM_ROWS = 4  # see the module docstring: fewer rows are padded to this many


def pack(weight: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """weight [out, in] -> an opaque oneDNN tensor for ``packed_linear``, tuned for ``rows`` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), max(rows, MIN_GEMM_ROWS))


def packed_for(owner: nn.Module, weight: torch.Tensor | list[torch.Tensor], dtype: torch.dtype,
               rows: int) -> torch.Tensor:
    """``pack(weight)`` (a list: the weights stacked along dim 0, [sum out, in]), reused from ``owner`` when every
    weight is frozen and unchanged since it was packed."""
    weights = weight if isinstance(weight, list) else [weight]
    stacked = lambda: weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights])  # noqa: E731
    if any(w.requires_grad for w in weights):
        owner.__dict__.pop("_packed_cache", None)
        return pack(stacked(), dtype, rows)
    key = (tuple((w.data_ptr(), w._version) for w in weights), dtype, max(rows, MIN_GEMM_ROWS))
    cached = owner.__dict__.get("_packed_cache")
    if cached is None or cached[0] != key:
        owner.__dict__.pop("_packed_cache", None)  # the old copy goes before the new one is made
        cached = owner.__dict__["_packed_cache"] = (key, pack(stacked(), dtype, rows))
    return cached[1]


_ZERO_ROWS: dict = {}  # (rows, width, dtype, device) -> zeros: made once, not on every decode step


def _zero_rows(rows: int, like: torch.Tensor) -> torch.Tensor:
    key = (rows, like.shape[-1], like.dtype, like.device)
    if key not in _ZERO_ROWS:
        _ZERO_ROWS[key] = torch.zeros(rows, like.shape[-1], dtype=like.dtype, device=like.device)
    return _ZERO_ROWS[key]


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ packed weight^T (+ bias) -> [..., out], in the packed weight's dtype."""
    if bias is not None:
        bias = bias.to(weight.dtype)
    x = x.to(weight.dtype)
    rows = x.numel() // x.shape[-1]
    if 0 < rows < MIN_GEMM_ROWS:  # [..., in] -> [MIN_GEMM_ROWS, in] (zero rows appended) -> back to [..., out]
        flat = x.reshape(rows, x.shape[-1])
        padded = torch.cat([flat, _zero_rows(MIN_GEMM_ROWS - rows, flat)])
        out = torch.ops.mkldnn._linear_pointwise(padded, weight, bias, "none", [], "")
        return out[:rows].reshape(*x.shape[:-1], out.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _column_forward(layer, weight):
    def forward(self, x):
        if self.copy_input:
            x = copy_to_group(x, self.group)
        y = packed_linear(x, weight, self.bias)
        return y + self.lora_delta(x.to(y.dtype)) if _adapted(self) else y
    return types.MethodType(forward, layer)


def _row_forward(layer, weight):
    def forward(self, x):
        partial = packed_linear(x, weight)
        if _adapted(self):
            partial = partial + self.lora_delta(x.to(partial.dtype))  # summed by the same all-reduce
        y = reduce_from_group(partial, self.group)
        return y if self.bias is None else y + self.bias
    return types.MethodType(forward, layer)


def _fused_forward(layers, weight):
    """x [..., in] -> one output per layer ([..., out_i], views of one GEMM's [..., sum out_i]), each with its
    layer's bias and LoRA delta."""
    sizes = [layer.weight.shape[0] for layer in layers]
    bias = None if layers[0].bias is None else torch.cat([layer.bias.detach() for layer in layers])
    adapted = [_adapted(layer) for layer in layers]

    def forward(x):
        parts = packed_linear(x, weight, bias).split(sizes, dim=-1)
        if not any(adapted):
            return parts
        return tuple(y + layer.lora_delta(x.to(y.dtype)) if on else y for y, layer, on in zip(parts, layers, adapted))
    return forward


FUSED_PROJECTIONS = (("packed_qkv", ("q_proj", "k_proj", "v_proj")), ("packed_gate_up", ("gate_proj", "up_proj")))


def fusable_groups(model: nn.Module) -> list[tuple[nn.Module, str, list[nn.Module]]]:
    """(owner, attribute, layers): each attention's q/k/v and each MLP's gate/up, where all are packable column
    layers reading the same input that either all have a bias or none has."""
    groups = []
    for module in model.modules():
        for attr, names in FUSED_PROJECTIONS:
            layers = [getattr(module, name, None) for name in names]
            if (hasattr(type(module), attr) and all(layer is not None and packable(layer) for layer in layers)
                    and len({layer.bias is None for layer in layers}) == 1):
                groups.append((module, attr, layers))
    return groups


def _adapted(layer) -> bool:
    return isinstance(layer, LoRAMixin) and layer.has_lora()


def packable(layer: nn.Module) -> bool:
    """A plain (or LoRA-adapted, dense-base) column/row-parallel linear."""
    kinds = (ColumnParallelLinear, RowParallelLinear, LoRAColumnParallelLinear, LoRARowParallelLinear)
    return type(layer) in kinds and getattr(layer, "quant", None) is None


@contextlib.contextmanager
def packed_weights(model: nn.Module, dtype: torch.dtype, rows: int, enabled: bool = True, fuse: bool = True):
    """Inside the block, every packable linear of ``model`` and its LM head run on oneDNN-packed copies of their
    weights in ``dtype`` (the compute dtype), q/k/v and gate/up fused unless ``fuse`` is off; a no-op when disabled
    or unavailable."""
    device = next(model.parameters()).device
    if not enabled or not packing_available(device, dtype):
        yield False
        return
    groups = fusable_groups(model) if fuse else []
    fused = {id(layer) for _, _, group in groups for layer in group}
    layers = [m for m in model.modules() if packable(m) and id(m) not in fused]
    try:
        for owner, attr, group in groups:
            setattr(owner, attr, _fused_forward(group, packed_for(owner, [layer.weight for layer in group], dtype,
                                                                  rows)))
        for layer in layers:
            weight = packed_for(layer, layer.weight, dtype, rows)
            is_row = isinstance(layer, RowParallelLinear)
            layer.forward = (_row_forward if is_row else _column_forward)(layer, weight)
        if model.cfg.tie_word_embeddings:
            head = packed_for(model.model.embed_tokens, model.model.embed_tokens.weight, dtype, rows)
            model.packed_head = lambda h: packed_linear(copy_to_group(h, model.ps.mp_group), head)
        yield True
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        for owner, attr, _ in groups:
            owner.__dict__.pop(attr, None)
        model.__dict__.pop("packed_head", None)
