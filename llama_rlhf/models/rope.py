"""Rotary position embeddings (rotate-half layout), with the scaling variants read from the config."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class PositionError(ValueError):
    """A position id beyond what the model was built for (max_position_embeddings)."""


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """1 / theta^(2i/dim) for i < dim/2, in fp32 (as the reference implementations compute it)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short kept, a smooth blend in between."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def yarn_inv_freq(theta: float, dim: int, s: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between; returns (inv_freq, cos/sin scale)."""
    factor = float(s["factor"])
    original = int(s.get("original_max_position_embeddings") or max_positions)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for explicit position ids, computed in fp32.

    ``inv_freq`` stays fp32 whatever dtype the model is cast to (``model.to(torch.bfloat16)`` moves it, never
    rounds it): bf16 frequencies put angle errors of a radian or more on positions in the thousands.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_positions: int):
        super().__init__()
        rope_type = (scaling or {}).get("rope_type", "default")
        self.scale, self.max_positions = 1.0, int(max_positions)
        # "dynamic" (NTK, InternLM3) changes the base only beyond max_position_embeddings, which is refused below,
        # so within the limit it is plain RoPE (as transformers computes it for seq_len <= max_position_embeddings)
        if rope_type in ("default", "dynamic"):
            inv_freq = base_inv_freq(theta, head_dim)
        elif rope_type == "linear":
            inv_freq = base_inv_freq(theta, head_dim) / float(scaling["factor"])
        elif rope_type == "llama3":
            inv_freq = llama3_inv_freq(base_inv_freq(theta, head_dim), scaling)
        elif rope_type == "yarn":
            inv_freq, self.scale = yarn_inv_freq(theta, head_dim, scaling, max_positions)
        else:
            raise ConfigError(f"rope scaling type {rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        """Module-wide casts (``.to(dtype)``, ``.half()``) move the fp32 tables to the new device only."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, S, 1, head_dim] (fp32, broadcast over heads).

        A position at or beyond max_position_embeddings is an error (the model was not built for it).
        """
        if position_ids.numel() and position_ids.device.type != "cpu":  # no host sync per forward on a GPU
            torch._assert_async(position_ids.max() < self.max_positions,
                                f"a position id is beyond max_position_embeddings ({self.max_positions})")
        elif position_ids.numel() and int(position_ids.max()) >= self.max_positions:
            raise PositionError(f"position {int(position_ids.max())} is beyond this model's max_position_embeddings "
                                f"({self.max_positions}): sequences may be at most {self.max_positions} tokens long; "
                                f"shorten them (e.g. --max_seq_len {self.max_positions})")
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(position_ids.device)  # [B, S, D/2]
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)  # [B, S, 1, D]
        return emb.cos() * self.scale, emb.sin() * self.scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, S, H, D], computed in at least fp32 and returned in x's dtype."""
    xf = x.float() if x.element_size() < 4 else x
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
