"""Qwen1 (Qwen-7B/14B/72B) checkpoints: the first-generation layout, presented under HF Qwen2 names.

Qwen1's QWenLMHeadModel is the Qwen2 architecture under other names: ``transformer.wte`` (embedding),
``transformer.h.N.ln_1``/``ln_2`` (RMSNorms), one fused ``attn.c_attn`` (rows: all query heads, then keys, then
values; with bias), ``attn.c_proj`` (output projection), and an MLP computing ``c_proj(w1(x) * silu(w2(x)))``,
so ``w2`` is the gate and ``w1`` the up projection. Its config.json states ``intermediate_size`` as twice the
width of w1/w2. ``Qwen1Source`` slices c_attn on the fly, so a rank still reads only its own rows.
"""
from __future__ import annotations

import re
import warnings

from ..models.config import ConfigError, ModelConfig, require

_RENAMES = [
    (r"transformer\.wte\.weight", "model.embed_tokens.weight"),
    (r"transformer\.ln_f\.weight", "model.norm.weight"),
    (r"transformer\.h\.(\d+)\.ln_1\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"transformer\.h\.(\d+)\.ln_2\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"transformer\.h\.(\d+)\.mlp\.w2\.(weight|bias)", r"model.layers.\1.mlp.gate_proj.\2"),
    (r"transformer\.h\.(\d+)\.mlp\.w1\.(weight|bias)", r"model.layers.\1.mlp.up_proj.\2"),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"model.layers.\1.mlp.down_proj.\2"),
]
_RENAMES = [(re.compile(p + "$"), hf) for p, hf in _RENAMES]
_C_ATTN = re.compile(r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def is_qwen1_config(d: dict) -> bool:
    """A Qwen1 config.json (model_type "qwen", QWenLMHeadModel), as opposed to Qwen2's."""
    return d.get("model_type") == "qwen" or "QWenLMHeadModel" in (d.get("architectures") or [])


def qwen1_config(d: dict, source: str, model_type: str) -> ModelConfig:
    """ModelConfig from Qwen1's config.json (QWenConfig's fields)."""
    hidden = int(require(d, "hidden_size", source))
    heads = int(require(d, "num_attention_heads", source))
    head_dim = int(d.get("kv_channels") or hidden // heads)
    if head_dim * heads != hidden:
        raise ConfigError(f"{source}: kv_channels {head_dim} x num_attention_heads {heads} must equal hidden_size "
                          f"{hidden} (Qwen1's attention output projection assumes it)")
    if float(d.get("rotary_pct", 1.0)) != 1.0:
        raise ConfigError(f"{source}: rotary_pct {d['rotary_pct']} is not supported (only full-width RoPE, 1.0)")
    intermediate = int(require(d, "intermediate_size", source))
    if intermediate % 2:
        raise ConfigError(f"{source}: Qwen1's intermediate_size ({intermediate}) is twice the MLP width, so it "
                          f"must be even")
    theta = d.get("rotary_emb_base")
    if theta is None:
        theta = 10000.0
        warnings.warn(f"{source}: no rotary_emb_base; using 10000, QWenConfig's default")
    # Beyond seq_length Qwen1 switches on dynamic NTK and log-n attention scaling; we stop at seq_length.
    max_positions = d.get("seq_length") or require(d, "max_position_embeddings", source)
    biased = not bool(d.get("no_bias", True))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(require(d, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=intermediate // 2,
        num_layers=int(require(d, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        rope_theta=float(theta),
        rms_norm_eps=float(require(d, "layer_norm_epsilon", source)),
        max_position_embeddings=int(max_positions),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=True,
        o_bias=biased,
        mlp_bias=biased,
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=[int(d["eos_token_id"])] if d.get("eos_token_id") is not None else [],
    )


class Qwen1Source:
    """A Qwen1-named tensor source seen under HF Qwen2 names; q/k/v are row ranges of the fused c_attn."""

    def __init__(self, source, cfg: ModelConfig):
        self._source = source
        self._width = cfg.num_heads * cfg.head_dim  # rows of each of q, k, v inside c_attn
        self._entries: dict[str, tuple] = {}  # HF key -> (Qwen1 key, row offset into c_attn or None)
        for key in source.keys():
            m = _C_ATTN.match(key)
            if m:
                for part, name in enumerate(_QKV):
                    self._entries[f"model.layers.{m.group(1)}.self_attn.{name}.{m.group(2)}"] = (key, part)
                continue
            hf_key = key
            for pattern, hf_name in _RENAMES:
                if pattern.match(key):
                    hf_key = pattern.sub(hf_name, key)
                    break
            self._entries[hf_key] = (key, None)

    def keys(self) -> set[str]:
        return set(self._entries)

    def shape(self, key: str) -> tuple:
        qwen_key, part = self._entries[key]
        shape = tuple(self._source.shape(qwen_key))
        if part is None:
            return shape
        if shape[0] != 3 * self._width:
            from .hf import CheckpointError
            raise CheckpointError(f"{qwen_key} has {shape[0]} rows; the config gives 3 x {self._width} (q, k, v)")
        return (self._width,) + shape[1:]

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None):
        qwen_key, part = self._entries[key]
        if part is None:
            return self._source.read(qwen_key, dim, start, stop)
        offset = part * self._width
        if dim == 0:
            stop = self._width if stop is None else stop
            return self._source.read(qwen_key, 0, offset + start, offset + stop)
        rows = self._source.read(qwen_key, 0, offset, offset + self._width)
        if dim is None:
            return rows
        stop = rows.shape[dim] if stop is None else stop
        return rows.narrow(dim, start, stop - start).clone()

    def close(self):
        self._source.close()


def open_qwen_checkpoint(ckpt_dir: str, cfg: ModelConfig):
    """--model_type qwen weights: an HF Qwen2 checkpoint as is, or a Qwen1 one (transformer.h.* keys) renamed."""
    from .hf import open_hf_checkpoint  # torch: only when weights are read (configs are read without it)
    source = open_hf_checkpoint(ckpt_dir)
    if any(k.startswith("transformer.h.") or k == "transformer.wte.weight" for k in source.keys()):
        return Qwen1Source(source, cfg)
    return source
