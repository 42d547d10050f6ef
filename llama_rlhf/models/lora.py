"""LoRA adapters on the tensor-parallel linears, with no communication of their own.

y = x W^T + scaling * B(A(dropout(x))), scaling = alpha / r (rsLoRA: alpha / sqrt(r)), as PEFT computes it.
- ColumnParallelLinear (W split along its output rows): A [r, in] whole on every MP rank, B [out/parts, r] split
  like W's rows (replicated KV heads: like their W). The gradient of A is partial over MP (each rank back-propagates
  only its output slice): it is marked ``mp_partial_grad`` and summed over MP with the other partial gradients.
- RowParallelLinear (W split along its input columns): A [r, in/MP] split like W's columns, B [out, r] whole; the
  low-rank partial product B(A_l x_l) is added to x_l W_l^T before the layer's own all-reduce, which sums both
  (sum_l B A_l x_l = B A x). B's gradient is partial over MP (marked); A's is complete.
Parameters are named like PEFT's saved keys: ``model.layers.0.self_attn.q_proj.lora_A.weight``; the base weight keeps
its name. The base is frozen; ``adapters_disabled(model)`` switches the adapters off (the GRPO/DPO reference is the
same model, no second copy) and ``merge_lora`` folds them into the base weights.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.comm import copy_to_group, reduce_from_group
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, ShardInfo, attach_shard, take_shard
from ..runtime import UsageError

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how (the fields of PEFT's LoraConfig that change the numbers)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = TARGET_MODULES
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def parse_targets(text) -> tuple:
    """``all-linear`` or a comma list of TARGET_MODULES -> tuple in TARGET_MODULES order (UsageError otherwise)."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if names in (["all-linear"], []):
        return TARGET_MODULES
    unknown = [n for n in names if n not in TARGET_MODULES]
    if unknown:
        raise UsageError(f"--lora_target_modules: unknown module {unknown[0]!r}; choose from "
                         f"{','.join(TARGET_MODULES)} or all-linear")
    return tuple(n for n in TARGET_MODULES if n in names)


def base_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's base weight as a dense tensor (dequantized when the base is quantized, see models/quant.py)."""
    quant = getattr(layer, "quant", None)
    if quant is not None:
        return quant.dequantize(dtype or torch.float32)
    return layer.weight


class DequantLinear(torch.autograd.Function):
    """fwd: x W^T with W dequantized from ``quant``; bwd: dx = dy W with W dequantized again (only the quantized
    weight is kept for backward, never the dense one; the base takes no gradient)."""

    @staticmethod
    def forward(ctx, x, quant):
        ctx.quant = quant
        return F.linear(x, quant.dequantize(x.dtype))  # [..., in] -> [..., out]

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.quant.dequantize(grad.dtype), None  # [..., out] @ [out, in] -> [..., in]


def base_linear(layer: nn.Module, x: torch.Tensor, bias=None) -> torch.Tensor:
    """x W^T (+ bias) with the layer's base weight, dense or quantized."""
    quant = getattr(layer, "quant", None)
    if quant is None:
        return F.linear(x, layer.weight, bias)
    if not torch.is_grad_enabled():  # sampling, reference log-probs: no autograd graph to keep small
        return quant.linear(x, bias)
    y = DequantLinear.apply(x, quant)
    return y if bias is None else y + bias


class LoRAFactor(nn.Module):
    """One factor (``lora_A`` or ``lora_B``): a bare weight, so its name ends ``.lora_A.weight`` as in PEFT."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) if x.dtype != self.weight.dtype else self.weight)


class LoRAMixin:
    """The adapter path shared by both parallel linears (``lora_A``/``lora_B`` submodules set by ``apply_lora``)."""

    lora_scaling: float = 1.0
    lora_dropout: float = 0.0
    lora_enabled: bool = True

    def has_lora(self) -> bool:
        return getattr(self, "lora_A", None) is not None and self.lora_enabled

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B(A(dropout(x))): [..., in_local] -> [..., out_local]."""
        if self.lora_dropout and self.training:
            x = F.dropout(x, self.lora_dropout)
        return self.lora_B(self.lora_A(x)) * self.lora_scaling


class LoRAColumnParallelLinear(LoRAMixin, ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_group(x, self.group)
        y = base_linear(self, x, self.bias)  # [..., in] -> [..., out / parts]
        return y + self.lora_delta(x) if self.has_lora() else y


class LoRARowParallelLinear(LoRAMixin, RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = base_linear(self, x)  # [..., in / mp] -> [..., out], partial over MP
        if self.has_lora():
            partial = partial + self.lora_delta(x)  # summed by the same all-reduce
        y = reduce_from_group(partial, self.group)
        return y if self.bias is None else y + self.bias


def adaptable_layers(model: nn.Module):
    """(name, layer) of every decoder linear (``model.layers.N.{self_attn,mlp}.X_proj``), in model order."""
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and name.rsplit(".", 1)[-1] in TARGET_MODULES:
            yield name, module


def make_adaptable(model: nn.Module) -> None:
    """Give every decoder linear the LoRA-capable forward (in place; parameters and their names unchanged)."""
    for _, layer in adaptable_layers(model):
        if not isinstance(layer, LoRAMixin):
            layer.__class__ = LoRARowParallelLinear if isinstance(layer, RowParallelLinear) else LoRAColumnParallelLinear


def factor_shards(layer: nn.Module, rank: int, mp: int) -> tuple[ShardInfo, ShardInfo, str]:
    """ShardInfo of A and B for ``layer``, and which of them has gradients partial over MP ("A" or "B")."""
    info = layer.weight.shard if getattr(layer, "quant", None) is None else layer.quant.shard
    out_f, in_f = info.full_shape
    if isinstance(layer, RowParallelLinear):  # A split like W's columns, B whole
        return (ShardInfo((rank, in_f), 1, info.start, info.stop, 1), ShardInfo((out_f, rank), copies=mp), "B")
    return (ShardInfo((rank, in_f), copies=mp), ShardInfo((out_f, rank), 0, info.start, info.stop, info.copies), "A")


def peft_init(full_shape: tuple, name: str, seed: int) -> torch.Tensor:
    """PEFT's A init (kaiming-uniform, a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))) of the whole tensor, from a
    generator keyed by (seed, name), so every layout starts from the same adapter."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(full_shape[1])
    return (torch.rand(full_shape, generator=g, dtype=torch.float64) * 2 - 1) * bound


def apply_lora(model: nn.Module, spec: LoRASpec, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[str]:
    """Add adapters to the targeted linears (A as PEFT initialises it, B zero); returns the adapted layer names.

    Every other parameter is frozen. Call after the base weights are loaded (and quantized)."""
    if spec.rank < 1:
        raise UsageError(f"--lora_rank must be >= 1 to add adapters, got {spec.rank}")
    make_adaptable(model)
    for p in model.parameters():
        p.requires_grad_(False)
    mp = model.ps.mp_size
    adapted = []
    for name, layer in adaptable_layers(model):
        if name.rsplit(".", 1)[-1] not in spec.targets:
            continue
        a_info, b_info, partial = factor_shards(layer, spec.rank, mp)
        device = layer.weight.device if getattr(layer, "quant", None) is None else layer.quant.codes.device
        a_full = peft_init(a_info.full_shape, name + ".lora_A.weight", seed)
        a = attach_shard(nn.Parameter(take_shard(a_full, a_info).to(device, dtype).contiguous()), a_info)
        b = attach_shard(nn.Parameter(torch.zeros(b_info.local_shape(), device=device, dtype=dtype)), b_info)
        (a if partial == "A" else b).mp_partial_grad = True  # summed over MP (see training/grad_sync.py)
        layer.lora_A, layer.lora_B = LoRAFactor(a), LoRAFactor(b)
        layer.lora_scaling, layer.lora_dropout, layer.lora_enabled = spec.scaling, spec.dropout, True
        adapted.append(name)
    model.lora_spec = spec
    return adapted


def lora_layers(model: nn.Module):
    """(name, layer) of the layers that carry an adapter."""
    return [(n, m) for n, m in adaptable_layers(model) if getattr(m, "lora_A", None) is not None]


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters by name (``...q_proj.lora_A.weight``)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def freeze_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Base parameters: no gradients, held in ``dtype`` (adapters keep theirs)."""
    adapters = set(lora_parameters(model).values())
    with torch.no_grad():
        for p in model.parameters():
            if p not in adapters:
                p.requires_grad_(False)
                if p.dtype != dtype and p.is_floating_point():
                    p.data = p.data.to(dtype)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes with its base weights only (the GRPO/DPO reference)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.lora_enabled for m in layers]
    for m in layers:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m.lora_enabled = state


class AdaptersOff:
    """The model seen with its adapters off: callable like the model (forward and ``logits``); any other attribute
    is the model's own."""

    def __init__(self, model: nn.Module):
        self._adapted = model

    def __getattr__(self, name):
        return getattr(self._adapted, name)

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self._adapted):
            return self._adapted(*args, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with adapters_disabled(self._adapted):
            return self._adapted.logits(hidden)


@torch.no_grad()
def merged_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This rank's slice of W + scaling * B A (computed in fp32 or wider; no communication)."""
    wide = torch.float64 if base_weight(layer).dtype == torch.float64 else torch.float32
    w = base_weight(layer, wide).to(wide)
    if getattr(layer, "lora_A", None) is not None:
        w = w + (layer.lora_B.weight.to(wide) @ layer.lora_A.weight.to(wide)) * layer.lora_scaling
    return w.to(dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and remove it (for fast sampling); the base must not be quantized."""
    for name, layer in lora_layers(model):
        if getattr(layer, "quant", None) is not None:
            raise ValueError(f"{name}: cannot merge into a quantized base weight in place")
        layer.weight.data = merged_weight(layer, layer.weight.dtype)
        del layer.lora_A, layer.lora_B
        layer.lora_A = layer.lora_B = None


def merged_tensors(model: nn.Module, dtype: torch.dtype):
    """(HF name, tensor with ``.shard``) of the merged model, one at a time: base weights with adapters folded in
    (dequantized when quantized), adapters left out. For ``export_hf(..., tensors=...)``."""
    lora = {id(p) for p in lora_parameters(model).values()}
    for mname, module in model.named_modules():
        prefix = mname + "." if mname else ""
        adaptable = isinstance(module, LoRAMixin)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in lora:
                continue
            if adaptable and pname == "weight":
                yield prefix + pname, attach_shard(merged_weight(module, dtype), p.shard)
            else:
                yield prefix + pname, p
        if adaptable and getattr(module, "quant", None) is not None:
            yield prefix + "weight", attach_shard(merged_weight(module, dtype), module.quant.shard)
