"""Export a sharded model as an ordinary HF folder (config.json, *.safetensors, tokenizer files).

Each parameter is gathered over the MP group that holds global rank 0 (one parameter at a time, so the
writer never holds more than one shard file of tensors), padding rows are cut, and rank 0 writes.
The folder loads in transformers and, at any MP/SP, in this framework.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..parallel.comm import group_size
from ..parallel.layers import ShardInfo
from .writes import WriteError, writing

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "qwen.tiktoken", "generation_config.json", "added_tokens.json",
                   "vocab.json", "merges.txt")

# --model_type -> (HF model_type, architecture) for configs written from scratch.
HF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"), "llama-hf": ("llama", "LlamaForCausalLM"),
    "llama3": ("llama", "LlamaForCausalLM"), "llama3-hf": ("llama", "LlamaForCausalLM"),
    "qwen": ("qwen2", "Qwen2ForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"), "mistral": ("mistral", "MistralForCausalLM"),
}

# HF config model_types whose checkpoints use our (HF) parameter names; other sources get a config written anew.
HF_NATIVE_TYPES = ("llama", "qwen2", "qwen3", "gemma2", "mistral", "internlm3")

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def assemble(pieces: list[torch.Tensor], info: ShardInfo) -> torch.Tensor:
    """The full tensor from every MP rank's slice (replicas skipped, padding cut)."""
    if info.dim is None:
        return pieces[0]
    unique = pieces[::info.copies]  # ranks r*copies .. hold slice r
    return torch.cat(unique, dim=info.dim).narrow(info.dim, 0, info.full_shape[info.dim])


def gather_full(param: torch.Tensor, ps) -> torch.Tensor | None:
    """On global rank 0: the full tensor of a sharded parameter, on the host (each gathered piece leaves the GPU at
    once, so a save never holds a shard's worth of weights there); on the other members of its MP group: None."""
    info = param.shard
    local = param.detach().contiguous()
    if info.dim is None or group_size(ps.mp_group) == 1:
        return assemble([local.cpu()] * max(1, ps.mp_size), info) if ps.rank == 0 else None
    pieces = [torch.empty_like(local) for _ in range(ps.mp_size)] if ps.rank == 0 else None
    dist.gather(local, pieces, dst=ps.mp_ranks[0], group=ps.mp_group)
    return assemble([p.cpu() for p in pieces], info) if ps.rank == 0 else None


def hf_config_dict(cfg, source_config: str | None, dtype: torch.dtype) -> dict:
    """config.json for the export: the source checkpoint's own (dtype updated), or one written from cfg."""
    d = None
    if source_config and os.path.isfile(source_config):
        with open(source_config, encoding="utf-8") as f:
            d = json.load(f)
        d.pop("quantization_config", None)
        if d.get("model_type") not in HF_NATIVE_TYPES:  # e.g. Qwen1: its weights are exported in Qwen2 layout
            d = None
    if d is None:
        if cfg.model_type not in HF_ARCHITECTURES:
            raise ValueError(f"cannot write an HF config for model_type {cfg.model_type!r}")
        hf_type, arch = HF_ARCHITECTURES[cfg.model_type]
        d = {"architectures": [arch], "model_type": hf_type, "vocab_size": cfg.vocab_size,
             "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
             "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
             "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": cfg.hidden_act,
             "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
             "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
             "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.qkv_bias,
             "mlp_bias": cfg.mlp_bias, "initializer_range": cfg.initializer_range,
             "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
             "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else (cfg.eos_token_ids or None)}
    d["torch_dtype"] = DTYPE_NAMES[dtype]
    d.pop("dtype", None)
    return d


def export_hf(model, ps, out_dir: str, source_config: str | None, tokenizer_dir: str | None,
              dtype: torch.dtype = torch.float32, max_shard_bytes: int = 2 * 2**30, tensors=None) -> None:
    """Write ``model`` as an HF folder into ``out_dir`` (an existing directory). Call on every rank.

    ``tensors``: (name, tensor with ``.shard``) pairs to write instead of the model's parameters (a merged LoRA
    model: ``models.lora.merged_tensors``). A failed write (a WriteError on rank 0) is raised after the last
    collective, so the other ranks are not left waiting in a gather."""
    shards, current, size, failed = [], {}, 0, []

    def flush():
        nonlocal current, size
        if current and not failed:
            name = f"model-{len(shards) + 1:05d}.safetensors.part"
            try:
                with writing(os.path.join(out_dir, name), size):
                    save_file(current, os.path.join(out_dir, name), metadata={"format": "pt"})
            except WriteError as exc:
                failed.append(exc)
            shards.append((name, list(current)))
        current, size = {}, 0

    writes = ps.dp_rank == 0 and ps.sp_rank == 0  # the MP group holding global rank 0
    for name, param in (model.named_parameters() if tensors is None else tensors):
        if not writes:
            continue
        full = gather_full(param, ps)
        if ps.rank == 0:
            current[name] = full.to(dtype).contiguous()
            size += current[name].numel() * current[name].element_size()
            if size >= max_shard_bytes:
                flush()
    if ps.rank == 0:
        flush()
        if failed:
            raise failed[0]
        weight_map = {}
        for i, (part_name, keys) in enumerate(shards):
            final = "model.safetensors" if len(shards) == 1 else \
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(os.path.join(out_dir, part_name), os.path.join(out_dir, final))
            weight_map.update({k: final for k in keys})
        if len(shards) > 1:
            total = sum(p.numel() * p.element_size() for p in model.parameters())
            with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with writing(os.path.join(out_dir, "config.json"), 0):
            with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
                json.dump(hf_config_dict(model.cfg, source_config, dtype), f, indent=2)
        with writing(f"the tokenizer files in {out_dir}", tokenizer_bytes(tokenizer_dir)):
            copy_tokenizer_files(tokenizer_dir, out_dir)


def export_bytes(model, dtype: torch.dtype, tokenizer_dir: str | None) -> int:
    """About what export_hf writes: every full parameter in ``dtype``, and the tokenizer files."""
    numel = 0
    for p in model.parameters():
        n = 1
        for s in p.shard.full_shape:
            n *= int(s)
        numel += n
    return numel * dtype.itemsize + tokenizer_bytes(tokenizer_dir) + 2**16


def tokenizer_bytes(tokenizer_dir: str | None) -> int:
    if not tokenizer_dir:
        return 0
    if os.path.isfile(tokenizer_dir):
        return os.path.getsize(tokenizer_dir)
    return sum(os.path.getsize(os.path.join(tokenizer_dir, n)) for n in TOKENIZER_FILES
               if os.path.isfile(os.path.join(tokenizer_dir, n)))


def copy_tokenizer_files(tokenizer_dir: str | None, out_dir: str) -> None:
    """Copy the tokenizer (and chat template, generation config) next to the weights."""
    if not tokenizer_dir:
        return
    if os.path.isfile(tokenizer_dir):
        shutil.copy2(tokenizer_dir, out_dir)
        return
    for name in TOKENIZER_FILES:
        path = os.path.join(tokenizer_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, out_dir)
