"""Run directories: atomic checkpoints (HF export + training state), rotation, resume.

A checkpoint is written into ``save_dir/.checkpoint-N.tmp`` and renamed to ``save_dir/checkpoint-N`` only
when every rank has finished writing, so a crash mid-save leaves the previous checkpoints intact.
Layout of a checkpoint:
    checkpoint-N/                       an HF folder (config.json, *.safetensors, tokenizer files)
    checkpoint-N/training_state/        trainer.json (step, data position, layout, ...), optim-RRRRR.pt from each
                                        rank that owns optimizer state (moments, and the fp32 masters when the
                                        export is not them; in full-tensor coordinates, see
                                        checkpoint/training_state.py), rng-RRRRR.pt from every rank
A resume re-slices the optimizer state to its own layout (any MP, SP, DP, zero stage); RNG streams are restored
when the layout is the same. The save directory is assumed to be on a filesystem every node sees.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from ..checkpoint.export import export_hf
from ..checkpoint.hf import CheckpointError
from ..checkpoint.training_state import (STATE_FORMAT, SavedOptimizerState, atomic_torch_save, optimizer_file,
                                         rng_file)
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


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def layout_of(ps, optimizer) -> dict:
    return {"mp": ps.mp_size, "sp": ps.sp_size, "dp": ps.dp_size, "zero_stage": optimizer.stage}


def save_checkpoint(save_dir: str, step: int, model, optimizer, trainer_state: dict, ps, *,
                    source_config: str | None, tokenizer_dir: str | None, save_dtype: torch.dtype,
                    keep: int | None) -> str:
    """Write checkpoint-``step`` atomically (call on every rank); returns its path.

    Every rank writes what it owns in parallel: its optimizer pieces (stage 1: its partition; stage 0: one rank per
    MP slice) and its RNG state."""
    tmp = os.path.join(save_dir, f".checkpoint-{step}.tmp")
    final = os.path.join(save_dir, f"checkpoint-{step}")
    state_dir = os.path.join(tmp, "training_state")
    if ps.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(state_dir)
    _barrier(ps)
    export_hf(model, ps, tmp, source_config, tokenizer_dir, save_dtype)
    # the fp32 masters are saved unless the exported weights are them (fp32 parameters, fp32 export)
    with_master = optimizer.separate_masters or save_dtype != torch.float32
    if optimizer.stage == 1 or (ps.dp_rank == 0 and ps.sp_rank == 0):
        atomic_torch_save({"format": STATE_FORMAT, "pieces": optimizer.state_pieces(with_master)},
                          optimizer_file(state_dir, ps.rank))
    atomic_torch_save(_rng_state(ps.device), rng_file(state_dir, ps.rank))
    if ps.rank == 0:
        with open(os.path.join(state_dir, "trainer.json"), "w", encoding="utf-8") as f:
            json.dump({**trainer_state, "step": step, "format": STATE_FORMAT, "adam_step": optimizer.adam_step,
                       "loss_scale": optimizer.loss_scale, "loss_scaler": optimizer.scaler_state(),
                       **layout_of(ps, optimizer)}, f, indent=2)
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
    """Restore the optimizer (re-sliced to this layout), masters and RNG; returns trainer.json's contents.

    The model must already hold ``ckpt``'s exported weights (``load_pretrained(ckpt, ...)``)."""
    state_dir = os.path.join(ckpt, "training_state")
    with open(os.path.join(state_dir, "trainer.json"), encoding="utf-8") as f:
        trainer = json.load(f)
    if trainer.get("format") != STATE_FORMAT:
        _load_first_format(state_dir, trainer, model, optimizer, ps)
        return trainer
    saved = SavedOptimizerState(state_dir)
    optimizer.load_state_pieces(saved.read, int(trainer["adam_step"]))
    optimizer.load_scaler_state(trainer.get("loss_scaler"))
    same_layout = all(trainer.get(k) == v for k, v in layout_of(ps, optimizer).items() if k != "zero_stage")
    if same_layout and os.path.isfile(rng_file(state_dir, ps.rank)):
        _set_rng_state(torch.load(rng_file(state_dir, ps.rank), map_location="cpu", weights_only=True), ps.device)
    return trainer


def _load_first_format(state_dir: str, trainer: dict, model, optimizer, ps) -> None:
    """Checkpoints of the first release (one torch optimizer state per MP rank): same MP/SP and stage 0 only."""
    if (trainer["mp"], trainer["sp"]) != (ps.mp_size, ps.sp_size) or optimizer.stage != 0:
        raise CheckpointError(f"{state_dir} is in the first release's format: resume it with "
                              f"--model_parallel_size {trainer['mp']} --sequence_parallel_size {trainer['sp']} "
                              f"--zero_stage 0 (a checkpoint saved after that resumes at any layout)")
    state = torch.load(os.path.join(state_dir, f"mp{ps.mp_rank}.pt"), map_location=ps.device, weights_only=True)
    optimizer.inner.load_state_dict(state["optimizer"])  # stage 0 orders its parameters as the first release did
    _set_rng_state({"torch": state["torch_rng"]}, ps.device)
    if "master" in state:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state["master"][name])
