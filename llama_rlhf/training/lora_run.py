"""The LoRA side of the shared run setup: flag checks, the adapted model, and checkpoints as PEFT folders.

``lora_request(args)`` (before any model is built) says whether the run trains adapters and checks the flags;
``load_lora_model`` builds the frozen base from --ckpt_dir (optionally quantized) and puts on it the adapter of the
resumed checkpoint, of --lora_dir, or a fresh one; ``export_lora`` writes a checkpoint's model part: the adapter
(PEFT format), the tokenizer, and with --merge_lora the merged HF model in ``merged/``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..checkpoint.export import copy_tokenizer_files, export_hf
from ..checkpoint.peft import check_adapter_dir, load_adapter, save_adapter
from ..models.lora import LoRASpec, apply_lora, freeze_base, lora_parameters, merged_tensors, parse_targets
from ..models.pretrained import load_pretrained
from ..runtime import UsageError, log

DEFAULT_ALPHA = 16.0
MERGED_DIR = "merged"


@dataclass
class LoRARequest:
    spec: LoRASpec | None  # None: taken from --lora_dir's adapter_config.json
    lora_dir: str | None
    quantize: str | None  # None, "int8", "nf4"
    merge: bool


def lora_request(args) -> LoRARequest | None:
    """The run's LoRA settings from its flags (None: full fine-tuning); one-line UsageError on a bad combination."""
    rank, lora_dir = getattr(args, "lora_rank", 0), getattr(args, "lora_dir", None)
    shape_flags = {"--lora_alpha": args.lora_alpha, "--lora_target_modules": args.lora_target_modules,
                   "--use_rslora": args.use_rslora}
    other = {"--lora_dropout": args.lora_dropout, "--merge_lora": args.merge_lora,
             "--quantize_base": None if args.quantize_base in (None, "none") else args.quantize_base}
    if rank < 0:
        raise UsageError(f"--lora_rank must be >= 0 (0: no adapters), got {rank}")
    if rank == 0 and not lora_dir:
        given = [k for k, v in {**shape_flags, **other}.items() if v is not None]
        if given:
            raise UsageError(f"{given[0]} needs --lora_rank >= 1 (or --lora_dir): without them the run fine-tunes "
                             f"every weight and has no adapters")
        return None
    if getattr(args, "from_scratch", False):
        raise UsageError("--from_scratch trains a new model: LoRA (--lora_rank / --lora_dir) needs a --ckpt_dir base")
    if lora_dir:
        given = [k for k, v in {"--lora_rank": rank or None, **shape_flags}.items() if v is not None]
        if given:
            raise UsageError(f"{given[0]} is read from --lora_dir {lora_dir}/adapter_config.json: drop it")
        check_adapter_dir(lora_dir)
    if args.lora_dropout is not None and not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise UsageError(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    spec = None
    if not lora_dir:
        spec = LoRASpec(rank, DEFAULT_ALPHA if args.lora_alpha is None else args.lora_alpha,
                        args.lora_dropout or 0.0, parse_targets(args.lora_target_modules or "all-linear"),
                        bool(args.use_rslora))
    return LoRARequest(spec, lora_dir, other["--quantize_base"], bool(args.merge_lora))


def load_lora_model(req: LoRARequest, args, ps, model_type: str, compute_dtype: torch.dtype,
                    resume_from: str | None):
    """Frozen base (in the compute dtype, or quantized) + adapters (fp32): resumed, from --lora_dir, or new."""
    base_dtype = compute_dtype if compute_dtype.itemsize == 2 else torch.float32
    model = load_pretrained(args.ckpt_dir, model_type, ps, args.config_file, dtype=base_dtype)
    if req.quantize:
        from ..models.quant import quantize_base
        stats = quantize_base(model, req.quantize)
        log(f"--quantize_base {req.quantize}: {stats['params'] / 1e6:.1f}M base parameters per rank in "
            f"{stats['bytes'] / 2**20:.1f} MiB ({stats['bytes_per_param']:.4f} bytes/parameter)", ps)
    source = resume_from or req.lora_dir
    if source:
        spec = load_adapter(model, source, "--resume" if resume_from else "--lora_dir")
        if args.lora_dropout is not None and args.lora_dropout != spec.dropout:
            spec = _set_dropout(model, spec, args.lora_dropout)
    else:
        spec = req.spec
        apply_lora(model, spec, seed=args.seed)
    freeze_base(model, base_dtype)
    trainable = sum(p.numel() for p in lora_parameters(model).values())
    log(f"LoRA r={spec.rank} alpha={spec.alpha:g}{' (rsLoRA)' if spec.use_rslora else ''} dropout {spec.dropout:g} "
        f"on {','.join(spec.targets)}: {trainable / 1e6:.3f}M trainable parameters per rank"
        + (f", adapter from {source}" if source else ""), ps)
    return model


def _set_dropout(model, spec: LoRASpec, dropout: float) -> LoRASpec:
    from dataclasses import replace
    from ..models.lora import lora_layers
    for _, layer in lora_layers(model):
        layer.lora_dropout = dropout
    model.lora_spec = replace(spec, dropout=dropout)
    return model.lora_spec


def export_lora(model, ps, out_dir: str, *, base_dir: str, source_config: str | None, tokenizer_dir: str | None,
                save_dtype: torch.dtype, merge: bool) -> None:
    """A checkpoint's model part under LoRA (call on every rank): PEFT adapter + tokenizer (+ merged/ HF model)."""
    save_adapter(model, ps, out_dir, os.path.abspath(base_dir))
    if ps.rank == 0:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    if merge:
        merged = os.path.join(out_dir, MERGED_DIR)
        if ps.rank == 0:
            os.makedirs(merged, exist_ok=True)
        export_hf(model, ps, merged, source_config, tokenizer_dir, save_dtype,
                  tensors=merged_tensors(model, torch.float32))
