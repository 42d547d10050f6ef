"""Registry: --model_type -> how to read its config, open its checkpoint, and which tokenizer it uses.

Families are configuration of the one decoder (models/transformer.py), not copies of it. Each reader below
turns a checkpoint's own config file into a ModelConfig, following the reference implementation's reading of
that file field by field (transformers' config classes for HF checkpoints, Meta's ModelArgs for originals):
a field absent from the file takes the reference class's default, an explicit null means "off".
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

from ..checkpoint.qwen1 import is_qwen1_config, qwen1_config
from .config import ConfigError, ModelConfig, read_json, require

# Reading an HF config.json needs no torch (the memory planner reads configs in about a second): the checkpoint
# readers, and the Meta config reader that lives beside them, are imported when first used.


def open_hf_checkpoint(ckpt_dir: str):
    from ..checkpoint.hf import open_hf_checkpoint as open_hf
    return open_hf(ckpt_dir)


def open_meta_checkpoint(ckpt_dir: str, cfg: ModelConfig):
    from ..checkpoint.meta import open_meta_checkpoint as open_meta
    return open_meta(ckpt_dir, cfg)


def open_qwen_checkpoint(ckpt_dir: str, cfg: ModelConfig):
    from ..checkpoint.qwen1 import open_qwen_checkpoint as open_qwen
    return open_qwen(ckpt_dir, cfg)


def meta_config(d: dict, source: str, model_type: str, ckpt_dir: str = "") -> ModelConfig:
    from ..checkpoint.meta import meta_config as read_meta
    return read_meta(d, source, model_type, ckpt_dir)


def is_tiktoken_file(path: str) -> bool:
    from ..checkpoint.meta import is_tiktoken_file as is_tiktoken
    return is_tiktoken(path)


def read_hf_rope(d: dict, source: str, default_theta: float | None) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from a transformers-4 (rope_theta/rope_scaling) or -5 (rope_parameters) config.

    A missing theta warns and takes ``default_theta`` (the reference class default); None makes it an error.
    """
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
    partial = scaling.pop("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor {partial} is not supported (RoPE over the whole head)")
    if theta is None:
        if default_theta is None:
            raise ConfigError(f"{source}: required field 'rope_theta' is missing (in rope_parameters or at the top "
                              f"level); this family's RoPE base must be stated, not guessed")
        warnings.warn(f"{source}: no rope_theta; using {default_theta:g}, the reference default for this family")
        theta = default_theta
    if rope_type in ("llama3", "yarn", "longrope"):  # the pretraining length, as transformers fills it in
        original = d.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings"))
        scaling["original_max_position_embeddings"] = original or d.get("max_position_embeddings")
    return float(theta), (None if rope_type == "default" else {"rope_type": rope_type, **scaling})


def eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def opt(d: dict, key: str, default):
    """d[key] if the file has the key (an explicit null stays None), else the reference class default."""
    return d[key] if key in d else default


HIDDEN_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_tanh": "gelu_tanh"}


def hidden_act(name: str, source: str) -> str:
    if name not in HIDDEN_ACTS:
        raise ConfigError(f"{source}: unsupported hidden activation {name!r} (supported: {', '.join(HIDDEN_ACTS)})")
    return HIDDEN_ACTS[name]


def llama_hf_config(d: dict, source: str, model_type: str, default_theta: float | None = 10000.0) -> ModelConfig:
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
        hidden_act=hidden_act(d.get("hidden_act", "silu"), source),
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_list(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )


def llama3_hf_config(d: dict, source: str, model_type: str) -> ModelConfig:
    """HF Llama 3/3.1/3.2: Llama layout; rope_theta (500000) and any llama3 rope scaling must be in the file."""
    return llama_hf_config(d, source, model_type, default_theta=None)


def qwen_sliding_layers(d: dict, num_layers: int, default_window) -> tuple[int | None, list | None]:
    """(window, per-layer flags) as Qwen2/Qwen3Config derive them: use_sliding_window gates everything, and the
    layers from max_window_layers on slide (or config.json's explicit layer_types, as transformers 5 saves it)."""
    if not opt(d, "use_sliding_window", False):
        return None, None
    window = opt(d, "sliding_window", default_window)
    if window is None:
        return None, None
    types = d.get("layer_types")
    if types:
        flags = [t == "sliding_attention" for t in types]
    else:
        first = int(opt(d, "max_window_layers", 28))
        flags = [i >= first for i in range(num_layers)]
    return (int(window), flags) if any(flags) else (None, None)


def qwen2_config(d: dict, source: str, model_type: str) -> ModelConfig:
    """HF Qwen2/2.5: q/k/v always biased, o_proj and MLP never (whatever attention_bias says); optional
    sliding window on the upper layers."""
    cfg = llama_hf_config(d, source, model_type)
    cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = True, False, False
    cfg.sliding_window, cfg.sliding_window_layers = qwen_sliding_layers(d, cfg.num_layers, 4096)
    return cfg


def qwen_config(d: dict, source: str, model_type: str) -> ModelConfig:
    """--model_type qwen: Qwen2/2.5 config.json, or Qwen1's (model_type "qwen", fused c_attn layout)."""
    if is_qwen1_config(d):
        return qwen1_config(d, source, model_type)
    return qwen2_config(d, source, model_type)


def qwen3_config(d: dict, source: str, model_type: str) -> ModelConfig:
    """HF Qwen3: per-head RMSNorm on q and k before RoPE; head_dim explicit (Qwen3Config default 128);
    attention_bias on q/k/v/o."""
    cfg = llama_hf_config(d, source, model_type)
    cfg.head_dim = int(opt(d, "head_dim", 128) or 128)
    cfg.qk_norm = True
    cfg.mlp_bias = False
    cfg.sliding_window, cfg.sliding_window_layers = qwen_sliding_layers(d, cfg.num_layers, 4096)
    return cfg


def gemma2_config(d: dict, source: str, model_type: str) -> ModelConfig:
    """HF Gemma 2 (Gemma2Config defaults where a field is absent)."""
    d = dict(d)
    d["hidden_act"] = d.get("hidden_activation") or "gelu_pytorch_tanh"  # Gemma2MLP reads hidden_activation
    d.setdefault("head_dim", 256)
    d.setdefault("tie_word_embeddings", True)
    cfg = llama_hf_config(d, source, model_type)
    cfg.mlp_bias = False
    cfg.norm_weight_offset = 1.0
    cfg.embed_scale = math.sqrt(cfg.hidden_size)
    cfg.sandwich_norm = True
    cfg.attn_scale = float(opt(d, "query_pre_attn_scalar", 256)) ** -0.5
    cfg.attn_logit_softcap = _float_or_none(opt(d, "attn_logit_softcapping", 50.0))
    cfg.final_logit_softcap = _float_or_none(opt(d, "final_logit_softcapping", 30.0))
    window = opt(d, "sliding_window", 4096)
    if window is not None:
        types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                         for i in range(cfg.num_layers)]  # even layers slide
        cfg.sliding_window, cfg.sliding_window_layers = int(window), [t == "sliding_attention" for t in types]
    return cfg


def internlm3_config(d: dict, source: str, model_type: str) -> ModelConfig:
    """HF InternLM3: Llama layout; qkv_bias -> q/k/v biases, bias -> o_proj and MLP biases (the original
    modeling_internlm3.py; transformers maps them to attention_bias/mlp_bias and requires them equal)."""
    d = dict(d)
    d.setdefault("head_dim", 128)
    cfg = llama_hf_config(d, source, model_type)
    qkv_bias = bool(d.get("qkv_bias", d.get("attention_bias", False)))
    bias = bool(d.get("bias", d.get("mlp_bias", False)))
    cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = qkv_bias, bias, bias
    return cfg


def mistral_config(d: dict, source: str, model_type: str) -> ModelConfig:
    """HF Mistral: sliding window on every layer (MistralConfig default 4096; null = full attention)."""
    cfg = llama_hf_config(d, source, model_type)
    cfg.qkv_bias = cfg.o_bias = cfg.mlp_bias = False
    window = opt(d, "sliding_window", 4096)
    cfg.sliding_window = None if window is None else int(window)
    return cfg


def _float_or_none(value):
    return None if value is None else float(value)


@dataclass(frozen=True)
class Family:
    """How one --model_type is read: config, weights (as HF-named slices), tokenizer."""

    name: str
    description: str
    config_from_dict: Callable  # (dict, source, model_type) -> ModelConfig; Meta: (..., ckpt_dir) too
    open_checkpoint: Callable = None  # (ckpt_dir, cfg) -> tensor source with HF key names
    config_file_name: str = "config.json"
    tokenizer_kind: str | None = None  # None: detect from the files
    hf_model_types: tuple = ()  # config.json model_type values this family reads (empty: no config.json)

    @property
    def is_meta(self) -> bool:
        return self.config_file_name == "params.json"

    def read_config(self, ckpt_dir: str, config_file: str | None = None) -> ModelConfig:
        path = self.config_path(ckpt_dir, config_file)
        d = read_json(path)
        if self.is_meta:
            return self.config_from_dict(d, path, self.name, ckpt_dir)
        self._check_model_type(d, path)
        return self.config_from_dict(d, path, self.name)

    def config_path(self, ckpt_dir: str | None, config_file: str | None = None) -> str:
        """The config file this family reads (see locate_config); a bad path is one line saying what is wrong:
        the path does not exist, or it is a folder without the family's config file."""
        path = locate_config(self.config_file_name, ckpt_dir, config_file)
        if os.path.isfile(path):
            return path
        flag, given = ("--config_file", config_file) if config_file else ("--ckpt_dir", ckpt_dir)
        if not os.path.exists(given):
            raise ConfigError(f"{flag} {given} does not exist")
        if not os.path.isdir(given):
            raise ConfigError(f"{flag} {given} is neither a file nor a folder")
        raise ConfigError(self._missing_config_message(flag, given))

    def _missing_config_message(self, flag: str, folder: str) -> str:
        name = self.config_file_name
        msg = f"--model_type {self.name} reads {name}, but {flag} {folder} is a folder without {name}"
        other = "config.json" if self.is_meta else "params.json"
        if os.path.isfile(os.path.join(folder, other)):
            kind = "an HF checkpoint (config.json)" if self.is_meta else "a Meta original checkpoint (params.json)"
            msg += f"; it holds {kind}: {describe_detection(folder)}"
        return msg

    def _check_model_type(self, d: dict, path: str) -> None:
        """A config.json of another family is an error naming both (a file without model_type is trusted)."""
        hf_type = d.get("model_type")
        if hf_type is None or hf_type in self.hf_model_types:
            return
        owner = [f.name for f in FAMILIES.values() if hf_type in f.hf_model_types]
        hint = f"that is --model_type {owner[0]}" if owner else f"no --model_type reads it (valid: {valid_types()})"
        raise ConfigError(f"{path} is a {hf_type!r} checkpoint ({', '.join(d.get('architectures') or [])}), "
                          f"not {self.name} ({'/'.join(self.hf_model_types)}): {hint}")


def locate_config(file_name: str, ckpt_dir: str | None, config_file: str | None) -> str:
    """Where a run's model config is, the one rule every solver uses: ``--config_file`` itself when it is a file,
    FILE_NAME (config.json, or params.json for Meta originals) inside it when it is a folder (trailing slash or
    not), else FILE_NAME inside ``--ckpt_dir``. The path may not exist (Family.config_path says why)."""
    if config_file:
        return os.path.join(config_file, file_name) if os.path.isdir(config_file) else config_file
    return os.path.join(ckpt_dir or "", file_name)


def config_folder(ckpt_dir: str | None, config_file: str | None) -> str:
    """The folder whose config.json / params.json tells the family when --model_type is omitted."""
    if ckpt_dir:
        return ckpt_dir
    if not config_file:
        raise ConfigError("pass --ckpt_dir (or --from_scratch with --config_file): there is no model to read")
    if not os.path.exists(config_file):
        raise ConfigError(f"--config_file {config_file} does not exist")
    return config_file if os.path.isdir(config_file) else os.path.dirname(os.path.abspath(config_file))


def _hf_source(ckpt_dir: str, cfg: ModelConfig):
    return open_hf_checkpoint(ckpt_dir)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "Meta original Llama 2 (consolidated.NN.pth + params.json + sentencepiece tokenizer.model)",
           meta_config, open_meta_checkpoint, "params.json", "sentencepiece"),
    Family("llama-hf", "Llama 2 (and Llama-architecture models such as SmolLM2) in HF format",
           llama_hf_config, _hf_source, hf_model_types=("llama",)),
    Family("llama3", "Meta original Llama 3/3.1/3.2 (consolidated.NN.pth + params.json + tiktoken tokenizer.model)",
           meta_config, open_meta_checkpoint, "params.json", "tiktoken"),
    Family("llama3-hf", "Llama 3/3.1/3.2 in HF format (rope_theta 500000, llama3 rope scaling)",
           llama3_hf_config, _hf_source, hf_model_types=("llama",)),
    Family("qwen", "Qwen2/2.5 in HF format, and Qwen1 (fused c_attn layout, qwen.tiktoken)",
           qwen_config, open_qwen_checkpoint, hf_model_types=("qwen2", "qwen")),
    Family("qwen3", "Qwen3 (dense) in HF format", qwen3_config, _hf_source, hf_model_types=("qwen3",)),
    Family("gemma2", "Gemma 2 in HF format", gemma2_config, _hf_source, hf_model_types=("gemma2",)),
    Family("internlm3", "InternLM3 in HF format", internlm3_config, _hf_source, hf_model_types=("internlm3",)),
    Family("mistral", "Mistral in HF format", mistral_config, _hf_source, hf_model_types=("mistral",)),
]}


def valid_types() -> str:
    return ", ".join(FAMILIES)


def get_family(model_type: str) -> Family:
    """The registry entry for ``model_type``, or an error listing the valid ones."""
    if model_type not in FAMILIES:
        raise ConfigError(f"unknown --model_type {model_type!r}; valid types: {valid_types()}")
    return FAMILIES[model_type]


_HF_TYPES = {"qwen2": "qwen", "qwen": "qwen", "qwen3": "qwen3", "gemma2": "gemma2", "internlm3": "internlm3",
             "mistral": "mistral"}
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "QWenLMHeadModel": "qwen",
                  "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "InternLM3ForCausalLM": "internlm3",
                  "MistralForCausalLM": "mistral"}


def _is_llama3_hf(d: dict) -> bool:
    """Llama 3 in HF form: RoPE base >= 500000, llama3 RoPE scaling, or the 128k vocabulary."""
    params, scaling = d.get("rope_parameters") or {}, d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta") or d.get("rope_theta") or 0)
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return theta >= 500000 or rope_type == "llama3" or int(d.get("vocab_size") or 0) >= 128000


def detect(ckpt_dir: str) -> tuple[str, str]:
    """(model_type, why) from the checkpoint's config.json (HF) or params.json (Meta original)."""
    hf_config, params = os.path.join(ckpt_dir, "config.json"), os.path.join(ckpt_dir, "params.json")
    if os.path.isfile(hf_config):
        d = read_json(hf_config)
        hf_type = d.get("model_type")
        arch = next((a for a in d.get("architectures") or [] if a in _ARCHITECTURES), None)
        key = hf_type if hf_type in _HF_TYPES or hf_type == "llama" else _ARCHITECTURES.get(arch)
        if key == "llama":
            if _is_llama3_hf(d):
                return "llama3-hf", f"{hf_config}: model_type llama with Llama 3 RoPE (rope_theta >= 500000, " \
                                    f"llama3 scaling or a 128k vocabulary)"
            return "llama-hf", f"{hf_config}: model_type llama"
        if key in _HF_TYPES:
            return _HF_TYPES[key], f"{hf_config}: model_type {hf_type!r} ({', '.join(d.get('architectures') or [])})"
        raise ConfigError(f"{hf_config}: cannot tell the family of model_type {hf_type!r} "
                          f"(architectures {d.get('architectures')}); pass --model_type (valid: {valid_types()})")
    if os.path.isfile(params):
        d = read_json(params)
        tokenizer = os.path.join(ckpt_dir, "tokenizer.model")
        if is_tiktoken_file(tokenizer):
            return "llama3", f"{params} (Meta original) with a tiktoken tokenizer.model"
        if d.get("use_scaled_rope") or float(d.get("rope_theta") or 0) >= 500000:
            return "llama3", f"{params} (Meta original) with Llama 3 RoPE (rope_theta >= 500000 or use_scaled_rope)"
        return "llama", f"{params} (Meta original) with Llama 2 RoPE and tokenizer"
    raise ConfigError(f"cannot detect the model family in {ckpt_dir} (no config.json or params.json); "
                      f"pass --model_type (valid: {valid_types()})")


def detect_model_type(ckpt_dir: str) -> str:
    """Guess --model_type from the checkpoint's config.json (HF) or params.json (Meta original)."""
    return detect(ckpt_dir)[0]


def describe_detection(ckpt_dir: str) -> str:
    """'looks like --model_type X (why)', or why the family cannot be told."""
    try:
        model_type, why = detect(ckpt_dir)
    except ConfigError as exc:
        return str(exc)
    return f"it looks like --model_type {model_type} ({why})"
