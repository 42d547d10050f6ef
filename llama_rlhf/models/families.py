"""Registry: --model_type -> how to read its config, open its checkpoint, and which tokenizer it uses."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

from ..checkpoint.hf import open_hf_checkpoint
from .config import ConfigError, ModelConfig, read_json, require


def read_hf_rope(d: dict, source: str, default_theta: float) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from a transformers-4 (rope_theta/rope_scaling) or -5 (rope_parameters) config."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", d.get("rope_theta"))
        scaling = dict(params)
    else:
        theta = d.get("rope_theta")
        scaling = dict(d.get("rope_scaling") or {})
    scaling.pop("rope_theta", None)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if theta is None:
        warnings.warn(f"{source}: no rope_theta; using {default_theta:g}, the reference default for this family")
        theta = default_theta
    return float(theta), (None if rope_type == "default" else {"rope_type": rope_type, **scaling})


def eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def llama_hf_config(d: dict, source: str, model_type: str, default_theta: float = 10000.0) -> ModelConfig:
    """ModelConfig from an HF Llama-layout config.json (Llama 2/3, SmolLM, and the base of other families)."""
    hidden = int(require(d, "hidden_size", source))
    heads = int(require(d, "num_attention_heads", source))
    theta, scaling = read_hf_rope(d, source, default_theta)
    attention_bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(require(d, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(require(d, "intermediate_size", source)),
        num_layers=int(require(d, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(require(d, "rms_norm_eps", source)),
        max_position_embeddings=int(require(d, "max_position_embeddings", source)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        hidden_act={"silu": "silu", "swish": "silu"}.get(d.get("hidden_act", "silu"), d.get("hidden_act")),
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_list(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )


def hf_config_path(ckpt_dir: str, config_file: str | None) -> str:
    return config_file or os.path.join(ckpt_dir, "config.json")


@dataclass(frozen=True)
class Family:
    """How one --model_type is read: config, weights (as HF-named slices), tokenizer."""

    name: str
    description: str
    config_from_dict: Callable[[dict, str, str], ModelConfig]
    open_checkpoint: Callable = None  # (ckpt_dir, cfg) -> tensor source with HF key names
    config_file_name: str = "config.json"
    tokenizer_kind: str | None = None  # None: detect from the files

    def read_config(self, ckpt_dir: str, config_file: str | None = None) -> ModelConfig:
        path = config_file or os.path.join(ckpt_dir, self.config_file_name)
        return self.config_from_dict(read_json(path), path, self.name)


def _hf_source(ckpt_dir: str, cfg: ModelConfig):
    return open_hf_checkpoint(ckpt_dir)


FAMILIES: dict[str, Family] = {
    "llama-hf": Family("llama-hf", "Llama 2 (and Llama-architecture models such as SmolLM2) in HF format",
                       llama_hf_config, _hf_source),
}


def get_family(model_type: str) -> Family:
    """The registry entry for ``model_type``, or an error listing the valid ones."""
    if model_type not in FAMILIES:
        raise ConfigError(f"unknown --model_type {model_type!r}; valid types: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def detect_model_type(ckpt_dir: str) -> str:
    """Guess --model_type from the checkpoint's config.json (HF) or params.json (Meta original)."""
    hf_config = os.path.join(ckpt_dir, "config.json")
    if os.path.isfile(hf_config):
        hf_type = read_json(hf_config).get("model_type")
        if hf_type == "llama":
            return "llama-hf"
        raise ConfigError(f"{hf_config}: cannot tell the family of model_type {hf_type!r}; pass --model_type "
                          f"(valid: {', '.join(sorted(FAMILIES))})")
    raise ConfigError(f"cannot detect the model family in {ckpt_dir} (no config.json or params.json); "
                      f"pass --model_type (valid: {', '.join(sorted(FAMILIES))})")
