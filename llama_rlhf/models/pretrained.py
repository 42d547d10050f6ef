"""Build a sharded model: from a checkpoint directory (any family) or from a config (pretraining)."""
from __future__ import annotations

import os

import torch

from ..checkpoint.load import load_sharded
from ..parallel.state import ParallelState
from .config import ModelConfig
from .families import get_family
from .init import init_weights
from .transformer import CausalLM


def build_model(cfg: ModelConfig, ps: ParallelState, dtype: torch.dtype = torch.float32) -> CausalLM:
    """An uninitialised sharded model on ``ps.device`` (fill it with load_sharded or init_weights)."""
    cfg.check_model_parallel(ps.mp_size)
    with torch.device(ps.device):
        model = CausalLM(cfg, ps)
    return model.to(dtype)


def load_pretrained(ckpt_dir: str, model_type: str, ps: ParallelState, config_file: str | None = None,
                    dtype: torch.dtype = torch.float32) -> CausalLM:
    """Read the config, build this rank's shard, and load only this rank's slices of the weights."""
    family = get_family(model_type)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory does not exist: {ckpt_dir}")
    cfg = family.read_config(ckpt_dir, config_file)
    model = build_model(cfg, ps, dtype)
    load_sharded(model, family.open_checkpoint(ckpt_dir, cfg), ckpt_dir)
    return model


def create_from_config(config_file: str, model_type: str, ps: ParallelState, seed: int,
                       dtype: torch.dtype = torch.float32) -> CausalLM:
    """A new model with layout-independent random weights (for pretraining from scratch)."""
    cfg = get_family(model_type).read_config("", config_file)
    model = build_model(cfg, ps, dtype)
    init_weights(model, seed)
    return model
