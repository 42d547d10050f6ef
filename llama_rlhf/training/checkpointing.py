"""Run directories: atomic checkpoints (HF export + training state), rotation, resume.

A checkpoint is written into ``save_dir/.checkpoint-N.tmp`` and renamed to ``save_dir/checkpoint-N`` only
when every rank has finished writing, so a crash mid-save leaves the previous checkpoints intact.
Layout of a checkpoint:
    checkpoint-N/                       an HF folder (config.json, *.safetensors, tokenizer files)
    checkpoint-N/training_state/        trainer.json (step, data position, layout, ...), optim-RRRRR.pt from each
                                        rank that owns optimizer state (moments, and the fp32 masters when the
                                        export is not them; in full-tensor coordinates, see
                                        checkpoint/training_state.py), rng-RRRRR.pt from every rank
    checkpoint-N/manifest.json          every file's size and CRC-32 (checkpoint/manifest.py), written last
A resume re-slices the optimizer state to its own layout (any MP, SP, DP, zero stage); RNG streams are restored
when the layout is the same. The save directory is assumed to be on a filesystem every node sees.

Faults: a save first compares its estimated size with the free space (and writes nothing if it does not fit); a
write that fails anyway removes the temporary folder on every rank's behalf and raises a WriteError on every rank.
A resume takes the newest checkpoint whose files match its manifest, warning about the damaged ones it skips.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from ..checkpoint.export import export_bytes, export_hf
from ..checkpoint.hf import CheckpointError
from ..checkpoint.manifest import MANIFEST, describe, file_problem, list_files, read_manifest, write_manifest
from ..checkpoint.training_state import (STATE_FORMAT, SavedOptimizerState, atomic_torch_save, optimizer_file,
                                         rng_file, tensor_bytes)
from ..checkpoint.writes import WriteError, free_bytes, mib, writing
from ..models.families import locate_config
from ..runtime import log

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


def _lowest_rank_with(flag: bool, ps) -> int:
    """The lowest rank where ``flag`` holds, or -1 (a collective over every rank)."""
    t = torch.tensor([ps.rank if flag else ps.world_size], dtype=torch.int64, device=ps.device)
    if ps.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return -1 if int(t.item()) == ps.world_size else int(t.item())


def _give_up_if_failed(error: str | None, tmp: str, step: int, ps) -> None:
    """After a phase of writes (every rank): if any rank failed, remove the temporary folder, raise on every rank."""
    failed = _lowest_rank_with(error is not None, ps)
    if failed < 0:
        return
    if ps.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(ps)
    kept = "earlier checkpoints are intact"
    if error:
        raise WriteError(f"{error}; checkpoint-{step} not saved (removed {tmp}; {kept})")
    raise WriteError(f"checkpoint-{step} not saved: rank {failed} could not write its part (see its message; "
                     f"removed {tmp}; {kept})")


def _check_free_space(save_dir: str, step: int, my_bytes: int, ps) -> None:
    """Every rank's estimated bytes summed, against rank 0's free space: the same verdict on every rank."""
    t = torch.tensor([float(my_bytes), float(free_bytes(save_dir)) if ps.rank == 0 else 0.0], dtype=torch.float64,
                     device=ps.device)
    if ps.world_size > 1:
        dist.all_reduce(t)
    needed, free = (float(v) for v in t.tolist())
    if needed > free:
        raise CheckpointError(f"checkpoint-{step} needs about {mib(needed)} but {save_dir} has {mib(free)} free: "
                              f"free some space, lower --save_total_limit or choose another --save_dir (nothing "
                              f"was written; earlier checkpoints are intact)")


def _record_manifest(tmp: str, ps) -> str | None:
    """Every rank checksums its share of the files; rank 0 writes manifest.json. Returns an error or None."""
    files = list_files(tmp)
    mine = describe(tmp, files[ps.rank::ps.world_size])
    parts = [mine]
    if ps.world_size > 1:
        parts = [None] * ps.world_size
        dist.all_gather_object(parts, mine)
    if ps.rank == 0:
        try:
            write_manifest(tmp, {k: v for part in parts for k, v in part.items()})
        except WriteError as exc:
            return str(exc)
    return None


def save_checkpoint(save_dir: str, step: int, model, optimizer, trainer_state: dict, ps, *,
                    source_config: str | None, tokenizer_dir: str | None, save_dtype: torch.dtype,
                    keep: int | None, export=None) -> str:
    """Write checkpoint-``step`` atomically (call on every rank); returns its path.

    ``export(dir)`` writes the model part instead of the HF export (LoRA: a PEFT adapter folder).
    Every rank writes what it owns in parallel: its optimizer pieces (stage 1: its partition; stage 0: one rank per
    MP slice) and its RNG state."""
    tmp = os.path.join(save_dir, f".checkpoint-{step}.tmp")
    final = os.path.join(save_dir, f"checkpoint-{step}")
    state_dir = os.path.join(tmp, "training_state")
    # the fp32 masters are saved unless the exported weights are them (fp32 parameters, fp32 export)
    with_master = optimizer.separate_masters or save_dtype != torch.float32
    owns_optimizer = optimizer.stage == 1 or (ps.dp_rank == 0 and ps.sp_rank == 0)
    pieces = {"format": STATE_FORMAT, "pieces": optimizer.state_pieces(with_master)} if owns_optimizer else None
    rng = _rng_state(ps.device)
    my_bytes = tensor_bytes(pieces) + tensor_bytes(rng) + 2**12
    if ps.rank == 0:
        my_bytes += export_bytes(model, save_dtype, tokenizer_dir)
    _check_free_space(save_dir, step, my_bytes, ps)

    error = None
    if ps.rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            with writing(state_dir, 0):
                os.makedirs(state_dir)
        except WriteError as exc:
            error = str(exc)
    _give_up_if_failed(error, tmp, step, ps)  # also the barrier: the folder exists
    try:
        if export is None:
            export_hf(model, ps, tmp, source_config, tokenizer_dir, save_dtype)
        else:
            export(tmp)
        if pieces is not None:
            atomic_torch_save(pieces, optimizer_file(state_dir, ps.rank))
        atomic_torch_save(rng, rng_file(state_dir, ps.rank))
        if ps.rank == 0:
            path = os.path.join(state_dir, "trainer.json")
            with writing(path, 0), open(path, "w", encoding="utf-8") as f:
                json.dump({**trainer_state, "step": step, "format": STATE_FORMAT, "adam_step": optimizer.adam_step,
                           "loss_scale": optimizer.loss_scale, "loss_scaler": optimizer.scaler_state(),
                           **layout_of(ps, optimizer)}, f, indent=2)
    except WriteError as exc:
        error = str(exc)
    _give_up_if_failed(error, tmp, step, ps)
    _give_up_if_failed(_record_manifest(tmp, ps), tmp, step, ps)
    if ps.rank == 0:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for _, old in checkpoint_dirs(save_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(ps)
    return final


def checkpoint_problem(path: str, ps) -> str | None:
    """Why ``path`` cannot be resumed (a file missing, truncated or changed since the save), or None; the same
    answer on every rank (a collective). Every rank compares every file's size and checksums its share."""
    try:
        entries = read_manifest(path)
    except ValueError as exc:
        return str(exc)
    if entries is None:  # saved by an earlier release: only trainer.json tells it is complete
        return None if os.path.isfile(os.path.join(path, "training_state", "trainer.json")) else \
            f"training_state/trainer.json missing (and no {MANIFEST})"
    names = sorted(entries)
    first = next((i for i, rel in enumerate(names)
                  if file_problem(path, rel, entries[rel], checksum=i % ps.world_size == ps.rank)), len(names))
    t = torch.tensor([first], dtype=torch.int64, device=ps.device)
    if ps.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    first = int(t.item())
    if first == len(names):
        return None
    return f"{names[first]}: {file_problem(path, names[first], entries[names[first]], checksum=True)}"


def resume_checkpoint(save_dir: str, ps) -> str | None:
    """The newest intact checkpoint-N in ``save_dir`` (None: none yet). Damaged newer ones are named in a warning
    and skipped; when every one is damaged, a CheckpointError."""
    found = sorted((int(m.group(1)), os.path.join(save_dir, name)) for name in
                   (os.listdir(save_dir) if os.path.isdir(save_dir) else []) if (m := CHECKPOINT_RE.match(name)))
    damaged = []
    for _, path in reversed(found):
        problem = checkpoint_problem(path, ps)
        if problem is None:
            for bad, why in damaged:
                log(f"warning: {bad} is damaged ({why}); resuming from {path} instead", ps)
            return path
        damaged.append((path, problem))
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {save_dir} to resume: {damaged[0][0]} is damaged "
                              f"({damaged[0][1]}), and so are the {len(damaged) - 1} earlier ones; move them away to "
                              f"start anew")
    return None


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
