"""Frozen weight-only quantized base linears for QLoRA: NF4 (blockwise absmax) and int8 (per-row absmax).

Each rank quantizes its own slice of W after loading it and dequantizes it per matmul (no fused kernel: plain torch
runs on CPU and CUDA alike). Storage per base parameter:
- nf4: 4-bit codes of the QLoRA NormalFloat table, two per byte, with one fp32 absmax per block of 64 values:
  0.5 + 4/64 = 0.5625 bytes (QLoRA's double quantization of the absmax is not done here).
- int8: one signed byte per value, one fp32 absmax per row of this rank's slice: 1 + 4/in_local bytes.
Round-trip error bounds: nf4 |w - q(w)| <= absmax_block * NF4_MAX_HALF_GAP; int8 <= absmax_row / 254.
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
