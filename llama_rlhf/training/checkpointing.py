"""Run directories: atomic checkpoints (HF export + training state), rotation, resume.

A checkpoint is written into ``save_dir/.checkpoint-N.tmp`` and renamed to ``save_dir/checkpoint-N`` only
when every rank has finished writing, so a crash mid-save leaves the previous checkpoints intact.
Layout of a checkpoint:
    checkpoint-N/                       an HF folder (config.json, *.safetensors, tokenizer files)
    checkpoint-N/training_state/        trainer.json (step, data position, ...) and mp<R>.pt per MP rank
                                        (optimizer state, RNG, and fp32 master weights when exported in 16 bit)
The save directory is assumed to be on a filesystem every node sees.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from ..checkpoint.export import export_hf
from ..models.families import locate_config

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_config_source(args, resume_from: str | None) -> str | None:
    """The config.json an export starts from: the resumed checkpoint's, the run's own, or none (from scratch)."""
    if resume_from:
        return os.path.join(resume_from, "config.json")
    if getattr(args, "from_scratch", False):
        return None
    path = locate_config("config.json", args.ckpt_dir, args.config_file)
    return path if os.path.isfile(path) else None  # a Meta original has none: the export writes one from the model


def checkpoint_dirs(save_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``save_dir`` as (step, path), oldest first."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        m = CHECKPOINT_RE.match(name)
        if m and os.path.isfile(os.path.join(save_dir, name, "training_state", "trainer.json")):
            found.append((int(m.group(1)), os.path.join(save_dir, name)))
    return sorted(found)


def latest_checkpoint(save_dir: str) -> str | None:
    found = checkpoint_dirs(save_dir)
    return found[-1][1] if found else None


def check_save_dir(save_dir: str, resume: bool) -> None:
    """Refuse to write a new run over a directory that holds another one (unless resuming it)."""
    if resume or not os.path.isdir(save_dir):
        return
    held = [n for n in os.listdir(save_dir) if CHECKPOINT_RE.match(n) or n == "metrics.jsonl"]
    if held:
        raise FileExistsError(f"--save_dir {save_dir} already holds a run ({', '.join(sorted(held)[:3])}); pass "
                              f"--resume true to continue it, or choose another --save_dir")


def _barrier(ps):
    if ps.world_size > 1:
        dist.barrier()


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(save_dir: str, step: int, model, optimizer, trainer_state: dict, ps, *,
                    source_config: str | None, tokenizer_dir: str | None, save_dtype: torch.dtype,
                    keep: int | None) -> str:
    """Write checkpoint-``step`` atomically (call on every rank); returns its path."""
    tmp = os.path.join(save_dir, f".checkpoint-{step}.tmp")
    final = os.path.join(save_dir, f"checkpoint-{step}")
    if ps.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "training_state"))
    _barrier(ps)
    export_hf(model, ps, tmp, source_config, tokenizer_dir, save_dtype)
    if ps.dp_rank == 0 and ps.sp_rank == 0:
        state = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        if save_dtype != torch.float32:  # the export rounded the weights: keep the fp32 masters for resume
            state["master"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        _atomic_torch_save(state, os.path.join(tmp, "training_state", f"mp{ps.mp_rank}.pt"))
    if ps.rank == 0:
        with open(os.path.join(tmp, "training_state", "trainer.json"), "w", encoding="utf-8") as f:
            json.dump({**trainer_state, "step": step, "mp": ps.mp_size, "sp": ps.sp_size, "dp": ps.dp_size}, f,
                      indent=2)
    _barrier(ps)
    if ps.rank == 0:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for _, old in checkpoint_dirs(save_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(ps)
    return final


def load_training_state(ckpt: str, model, optimizer, ps) -> dict:
    """Restore optimizer, RNG and (if saved) fp32 master weights; returns trainer.json's contents."""
    with open(os.path.join(ckpt, "training_state", "trainer.json"), encoding="utf-8") as f:
        trainer = json.load(f)
    if (trainer["mp"], trainer["sp"]) != (ps.mp_size, ps.sp_size):
        raise ValueError(f"{ckpt} was trained with --model_parallel_size {trainer['mp']} --sequence_parallel_size "
                         f"{trainer['sp']}; resume with the same sizes (the HF folder itself loads at any size)")
    state = torch.load(os.path.join(ckpt, "training_state", f"mp{ps.mp_rank}.pt"), map_location=ps.device,
                       weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if "master" in state:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state["master"][name])
    return trainer
