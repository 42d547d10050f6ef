"""LoRA adapters in PEFT's folder format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's saved names, ``base_model.model.`` + our parameter name (``...q_proj.lora_A.weight``), whole
tensors. Saving gathers each factor over MP (the MP group of global rank 0 writes); loading reads only this rank's
slice of each factor (positioned reads), so a PEFT adapter loads at any MP and ours loads in
``peft.PeftModel.from_pretrained``.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..models.lora import TARGET_MODULES, LoRASpec, apply_lora, lora_parameters, parse_targets
from ..parallel.layers import pad_shard, real_range
from .export import gather_full
from .hf import CheckpointError, SafetensorsSource, read_safetensors_header

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# LoraConfig fields whose non-default values change the numbers in ways not supported here
UNSUPPORTED = {"bias": "none", "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
               "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
               "layer_replication": None, "target_parameters": None}


def check_adapter_dir(folder: str, flag: str = "--lora_dir") -> None:
    """Cheap early check (every rank, before a model is built): the folder holds a PEFT adapter."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(f"{flag} {folder}: no {name} (expected a PEFT LoRA adapter folder)")


def read_adapter_config(folder: str, flag: str = "--lora_dir") -> LoRASpec:
    """The LoRASpec of a PEFT adapter folder (errors name the file and the field)."""
    check_adapter_dir(folder, flag)
    path = os.path.join(folder, CONFIG_FILE)
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, default in UNSUPPORTED.items():
        if cfg.get(key, default) not in (default, None) and not (default == {} and not cfg.get(key)):
            raise CheckpointError(f"{path}: {key}={cfg[key]!r} is not supported (expected {default!r})")
    targets = cfg.get("target_modules") or "all-linear"
    if isinstance(targets, list):  # PEFT writes all-linear as the list of module paths it matched
        targets = sorted({t.rsplit(".", 1)[-1] for t in targets})
    elif targets != "all-linear":
        raise CheckpointError(f"{path}: target_modules {targets!r} (a regex) is not supported: list module names "
                              f"from {','.join(TARGET_MODULES)}")
    try:
        targets = parse_targets(targets)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return LoRASpec(int(cfg["r"]), float(cfg.get("lora_alpha", 8)), float(cfg.get("lora_dropout", 0.0)), targets,
                    bool(cfg.get("use_rslora", False)))


def adapter_config(spec: LoRASpec, base_model: str | None) -> dict:
    """adapter_config.json as PEFT writes it (the fields PEFT's LoraConfig reads; the others take its defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": list(spec.targets),
            "use_rslora": spec.use_rslora, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True, "use_dora": False, "revision": None}


def save_adapter(model, ps, out_dir: str, base_model: str | None = None) -> None:
    """Write ``model``'s adapter as a PEFT folder into ``out_dir`` (an existing directory). Call on every rank."""
    tensors = {}
    if ps.dp_rank == 0 and ps.sp_rank == 0:  # the MP group holding global rank 0
        for name, param in lora_parameters(model).items():
            full = gather_full(param, ps)
            if ps.rank == 0:
                tensors[KEY_PREFIX + name] = full.float().contiguous()
    if ps.rank == 0:
        save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(adapter_config(model.lora_spec, base_model), f, indent=2)


@torch.no_grad()
def load_adapter(model, folder: str, flag: str = "--lora_dir") -> LoRASpec:
    """Put the PEFT adapter in ``folder`` on ``model`` (base loaded): this rank's slices only, keys checked strictly."""
    spec = read_adapter_config(folder, flag)
    apply_lora(model, spec)
    path = os.path.join(folder, WEIGHTS_FILE)
    header, _ = read_safetensors_header(path)
    source = SafetensorsSource({key: path for key in header})
    try:
        expected = {KEY_PREFIX + n: p for n, p in lora_parameters(model).items()}
        available = {k.replace(".default.", ".") for k in header}  # PEFT's in-memory names carry the adapter name
        missing = sorted(set(expected) - available)
        unexpected = sorted(available - set(expected))
        if missing or unexpected:
            what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise CheckpointError(f"{flag} {folder}: the adapter does not fit this model ({what}; "
                                  f"{len(missing)} missing, {len(unexpected)} unexpected keys)")
        for key, param in expected.items():
            stored = key if key in header else key.replace(".lora_A.", ".lora_A.default.").replace(
                ".lora_B.", ".lora_B.default.")
            shape = tuple(source.shape(stored))
            if shape != tuple(param.shard.full_shape):
                raise CheckpointError(f"{flag} {folder}: {key} has shape {list(shape)} but this model needs "
                                      f"{list(param.shard.full_shape)} (an adapter for another base model?)")
            info = param.shard
            if info.dim is None:
                part = source.read(stored)
            else:
                start, stop = real_range(info)
                part = pad_shard(source.read(stored, info.dim, start, stop), info)
            param.copy_(part.to(param.dtype))
    finally:
        source.close()
    return spec
