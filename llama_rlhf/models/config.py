"""ModelConfig: one dataclass for every family; families differ only in these fields."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields


class ConfigError(ValueError):
    """A config that is missing a field, contradicts itself, or cannot be laid out on the requested ranks."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "yarn", ...}; None: plain RoPE
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # "silu" | "gelu_tanh"
    norm_weight_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w)
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden_size)
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head
    sandwich_norm: bool = False  # Gemma 2: norms before and after attention and MLP
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None  # keys further than this many positions back are masked
    sliding_window_layers: list | None = None  # per-layer flags; None with sliding_window set: every layer
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_kv_heads}")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r} (supported: silu, gelu_tanh)")

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is None or self.sliding_window_layers[layer]:
            return self.sliding_window
        return None

    def check_model_parallel(self, mp: int) -> None:
        """Raise a ConfigError naming the numbers if this model cannot be split over ``mp`` ranks."""
        if self.num_heads % mp:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not divisible by "
                              f"--model_parallel_size {mp}")
        if self.num_kv_heads % mp and mp % self.num_kv_heads:
            raise ConfigError(f"num_key_value_heads {self.num_kv_heads} and --model_parallel_size {mp}: "
                              f"KV heads must split evenly (n_kv % MP == 0) or replicate evenly (MP % n_kv == 0)")
        if self.intermediate_size % mp:
            raise ConfigError(f"intermediate_size {self.intermediate_size} is not divisible by "
                              f"--model_parallel_size {mp}")

    def kv_layout(self, mp: int, mp_rank: int) -> tuple[int, int]:
        """(parts, part): KV heads are cut into ``parts`` slices and this rank holds slice ``part``."""
        if self.num_kv_heads % mp == 0:
            return mp, mp_rank
        replicas = mp // self.num_kv_heads
        return self.num_kv_heads, mp_rank // replicas

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_json(path: str) -> dict:
    """Read a JSON file; a missing or malformed file is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc


def require(d: dict, key: str, source: str):
    """d[key], or a ConfigError naming the key and the file."""
    if key not in d or d[key] is None:
        raise ConfigError(f"{source}: required field {key!r} is missing")
    return d[key]
