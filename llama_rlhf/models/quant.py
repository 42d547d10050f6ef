"""Frozen weight-only quantized base linears for QLoRA: NF4 (blockwise absmax) and int8 (per-row absmax).

Each rank quantizes its own slice of W after loading it and dequantizes it per matmul (no fused kernel: plain torch
runs on CPU and CUDA alike). Storage per base parameter:
- nf4: 4-bit codes of the QLoRA NormalFloat table, two per byte, with one fp32 absmax per block of 64 values:
  0.5 + 4/64 = 0.5625 bytes (QLoRA's double quantization of the absmax is not done here).
- int8: one signed byte per value, one fp32 absmax per row of this rank's slice: 1 + 4/in_local bytes.
Round-trip error bounds: nf4 |w - q(w)| <= absmax_block * NF4_MAX_HALF_GAP; int8 <= absmax_row / 254.

The same int8 form (per-output-channel scales) serves GRPO's int8 rollout copy (inference/rollout_model.py):
``QuantizedWeight.linear`` is its weight-only matmul without autograd (a fused int8 kernel for 16-bit inputs
where torch has one, else the dequantized weight), and ``requantize_`` rewrites the codes in place after an update.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .lora import adaptable_layers, make_adaptable

QUANT_KINDS = ("nf4", "int8")
NF4_BLOCK = 64
# the NormalFloat-4 table of the QLoRA paper (quantiles of N(0, 1), normalised to [-1, 1], exact zero)
NF4_CODE = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
NF4_MAX_HALF_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2)


class QuantizedWeight(nn.Module):
    """A frozen [out, in] weight slice held as codes + absmax; ``dequantize(dtype)`` gives it back dense."""

    def __init__(self, kind: str, shape: tuple, codes: torch.Tensor, absmax: torch.Tensor, shard):
        super().__init__()
        self.kind, self.shape, self.shard = kind, tuple(shape), shard
        self.register_buffer("codes", codes)  # nf4: uint8 [ceil(n / 64) * 32]; int8: int8 [out, in]
        self.register_buffer("absmax", absmax)  # fp32: nf4 [ceil(n / 64)]; int8 [out]

    @classmethod
    @torch.no_grad()
    def quantize(cls, w: torch.Tensor, kind: str, shard) -> "QuantizedWeight":
        w = w.detach().float()
        if kind == "int8":
            absmax = w.abs().amax(dim=1).clamp_min(1e-12)  # [out]
            codes = torch.round(w / (absmax / 127).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
            return cls(kind, w.shape, codes, absmax, shard)
        if kind != "nf4":
            raise ValueError(f"unknown quantization {kind!r}; choose from {', '.join(QUANT_KINDS)}")
        flat = w.reshape(-1)
        pad = -flat.numel() % NF4_BLOCK
        blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, NF4_BLOCK)  # [n_blocks, 64]
        absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
        code = NF4_CODE.to(w.device)
        idx = torch.bucketize(blocks / absmax.unsqueeze(1), (code[1:] + code[:-1]) / 2).to(torch.uint8)
        idx = idx.view(-1, 2)
        return cls(kind, w.shape, (idx[:, 0] << 4) | idx[:, 1], absmax, shard)

    @torch.no_grad()
    def requantize_(self, w: torch.Tensor) -> None:
        """int8: overwrite codes and scales in place with those of ``w`` (same shape; no new storage kept)."""
        if self.kind != "int8" or tuple(w.shape) != self.shape:
            raise ValueError(f"requantize_ needs an int8 weight of shape {self.shape}, got {self.kind} {tuple(w.shape)}")
        w = w.detach().float()
        torch.amax(w.abs(), dim=1, out=self.absmax)
        self.absmax.clamp_(min=1e-12)
        self.codes.copy_(torch.round(w / (self.absmax / 127).unsqueeze(1)).clamp_(-127, 127))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias) without autograd: [..., in] -> [..., out]. int8 with a 16-bit x uses torch's fused
        weight-only kernel (``_weight_int8pack_mm``: int8 codes x per-row scales, accumulation in fp32); any
        other case multiplies by the dequantized weight in x's dtype."""
        if self.kind == "int8" and x.dtype in (torch.bfloat16, torch.float16) and _fused_int8(x.device.type):
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.codes, self.scales(x.dtype))
            y = y.view(*x.shape[:-1], self.shape[0])
        else:
            y = torch.nn.functional.linear(x, self.dequantize(x.dtype))
        return y if bias is None else y + bias

    def scales(self, dtype: torch.dtype) -> torch.Tensor:
        """int8: the per-row scale absmax / 127 in ``dtype`` (kept once per dtype until the next requantize_)."""
        key = (dtype, self.absmax._version)
        if getattr(self, "_scales_key", None) != key:
            self._scales, self._scales_key = (self.absmax / 127).to(dtype), key
        return self._scales

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.kind == "int8":
            return (self.codes.float() * (self.absmax / 127).unsqueeze(1)).to(dtype)
        idx = torch.stack([self.codes >> 4, self.codes & 15], dim=1).view(-1, NF4_BLOCK).long()
        values = NF4_CODE.to(self.codes.device)[idx] * self.absmax.unsqueeze(1)  # [n_blocks, 64]
        n = self.shape[0] * self.shape[1]
        return values.view(-1)[:n].view(self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()


def _fused_int8(device_type: str) -> bool:
    return device_type in ("cpu", "cuda") and hasattr(torch, "_weight_int8pack_mm")


def quantize_base(model: nn.Module, kind: str) -> dict:
    """Replace every decoder linear's weight by its quantized form (in place, on this rank's slice).

    Returns {"params": quantized parameters, "bytes": their storage, "bytes_per_param": the ratio}."""
    make_adaptable(model)
    params, nbytes = 0, 0
    for _, layer in adaptable_layers(model):
        weight = layer.weight
        layer.quant = QuantizedWeight.quantize(weight, kind, weight.shard)
        del layer._parameters["weight"]
        layer.weight = None  # the dense weight is gone; base_weight() dequantizes
        params += weight.numel()
        nbytes += layer.quant.nbytes
        del weight
    return {"params": params, "bytes": nbytes, "bytes_per_param": nbytes / max(params, 1)}
