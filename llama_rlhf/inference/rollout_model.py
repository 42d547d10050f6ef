"""The GRPO rollout copy of the policy: the same sharded model in a sampling precision, kept in step with the
trainer's weights (``--rollout_dtype`` / ``--rollout_quantization int8`` of solver_grpo.py).

- ``dtype`` (float32, bfloat16, float16): every floating tensor of the copy is held and computed in it (no
  autocast); e.g. bf16 rollouts from fp32 masters.
- ``quantization="int8"``: every decoder linear's weight is int8 with one scale per output channel of this rank's
  slice (models/quant.py; weight-only: activations stay in ``dtype``). Embedding, norms and the LM head stay in
  ``dtype``.

A tensor whose sampling form is the policy's own (same dtype, not quantized: an fp32 embedding of an fp32 int8
copy, the rotary tables, LoRA adapters) is the policy's tensor, shared: it adds no memory and always tracks. The
rest are converted copies. ``refresh()`` (call it after optimizer steps, before sampling) rewrites only those whose
source is trainable, in place; a frozen LoRA base is converted once. With LoRA the copy runs the policy's own
adapter factors on top of its converted base, so an update reaches the sampler without any copy.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.lora import adaptable_layers, make_adaptable
from ..models.quant import QuantizedWeight
from ..models.transformer import CausalLM
from ..parallel.layers import attach_shard

ROLLOUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROLLOUT_QUANTIZATIONS = ("none", "int8")
LORA_ATTRS = ("lora_A", "lora_B", "lora_scaling", "lora_dropout", "lora_enabled")


def _storage_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class RolloutModel:
    """A sampling copy of ``policy`` (a CausalLM, possibly with LoRA adapters): ``.model`` is what ``generate``
    runs, ``.dtype`` its compute dtype, ``.nbytes`` what the copy adds on this rank."""

    def __init__(self, policy: CausalLM, dtype: torch.dtype = torch.float32, quantization: str | None = None):
        if quantization not in (None, "none", "int8"):
            raise ValueError(f"unknown rollout quantization {quantization!r}; choose from int8")
        self.policy, self.dtype = policy, dtype
        self.quantization = None if quantization in (None, "none") else quantization
        self.stale = False
        with torch.device("meta"):  # structure only; every tensor is set below from the policy's
            model = CausalLM(policy.cfg, policy.ps)
        make_adaptable(model)  # base_linear: dense or int8 weights, adapters on top when the policy has them
        self.model = model.eval()
        self._refresh: list[tuple[nn.Parameter, object]] = []  # (trainable policy tensor, its converted copy)
        self.nbytes = 0
        converted: dict[int, object] = {}  # id(policy tensor) -> its sampling form (tied weights stay tied)
        mine = dict(model.named_modules())
        adaptable = {name for name, _ in adaptable_layers(policy)}
        for name, module in policy.named_modules():
            if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "quant"):
                continue
            target = mine[name]
            if name in adaptable:
                self._adopt_linear(module, target, converted)
            for pname, p in module.named_parameters(recurse=False):
                if pname == "weight" and name in adaptable:
                    continue
                target._parameters[pname] = self._convert(p, converted)
            for bname, b in module.named_buffers(recurse=False):
                target._buffers[bname] = b  # fp32 rotary tables: the policy's own
        for p in self.model.parameters():
            if p.is_meta:
                raise RuntimeError("rollout copy: a parameter was left unset (unknown module layout)")

    def _convert(self, p: nn.Parameter, converted: dict) -> nn.Parameter:
        if id(p) in converted:
            return converted[id(p)]
        if p.dtype == self.dtype or not p.is_floating_point():
            out = p  # shared: nothing to hold, nothing to refresh
        else:
            out = attach_shard(nn.Parameter(p.detach().to(self.dtype), requires_grad=False), p.shard)
            self.nbytes += _storage_bytes(out)
            if p.requires_grad:
                self._refresh.append((p, out))
        converted[id(p)] = out
        return out

    def _adopt_linear(self, layer: nn.Module, target: nn.Module, converted: dict) -> None:
        """A decoder linear: int8 (or the dtype's copy) of its base weight, and the policy's adapters on top."""
        quant = getattr(layer, "quant", None)
        if quant is not None:  # a quantized LoRA base (--quantize_base): sample from it as it is
            del target._parameters["weight"]
            target.quant, target.weight = quant, None
        elif self.quantization == "int8":
            w = layer.weight
            target.quant = QuantizedWeight.quantize(w, "int8", w.shard)
            del target._parameters["weight"]
            target.weight = None
            self.nbytes += target.quant.nbytes
            if w.requires_grad:
                self._refresh.append((w, target.quant))
        else:
            target._parameters["weight"] = self._convert(layer.weight, converted)
        for attr in LORA_ATTRS:  # the very same factor modules: an update of the policy is one of the copy
            if attr in layer.__dict__ or attr in layer._modules:
                setattr(target, attr, getattr(layer, attr))

    def mark_stale(self) -> None:
        """The policy took an optimizer step: the next ``refresh`` copies its trainable weights again."""
        self.stale = True

    @torch.no_grad()
    def refresh(self, force: bool = False) -> int:
        """Copy (and requantize) the policy's trainable weights into the copy when stale; returns the tensors
        rewritten (0 when nothing changed or everything that changes is shared)."""
        if not (self.stale or force):
            return 0
        for source, target in self._refresh:
            if isinstance(target, QuantizedWeight):
                target.requantize_(source)
            else:
                target.copy_(source)
        self.stale = False
        return len(self._refresh)

    @property
    def refreshed_tensors(self) -> int:
        return len(self._refresh)
