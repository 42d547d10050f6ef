"""The supervised fine-tuning / pretraining loop behind solver_train.py."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch

from ..data import StepBatches, collate, load_samples, pack
from ..models.families import config_folder, detect_model_type, get_family
from ..models.pretrained import create_from_config, load_pretrained
from ..parallel.comm import all_reduce
from ..parallel.cpu_allocator import keep_freed_memory
from ..parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from ..runtime import UsageError, autocast, log
from ..tokenizer import load_tokenizer, tokenizer_source
from .checkpointing import (SAVE_DTYPES, check_save_dir, export_config_source, latest_checkpoint,
                            load_training_state, save_checkpoint)
from .grad_sync import GradientSync, clip_grad_norm
from .optim import lr_at, make_optimizer, set_lr


def resolve_model_type(args, ps) -> str:
    if args.model_type:
        get_family(args.model_type)
        return args.model_type
    source = config_folder(args.ckpt_dir, args.config_file)
    model_type = detect_model_type(source)
    log(f"detected --model_type {model_type} from {source}", ps)
    return model_type


def sequence_batch(batch: dict, ps) -> dict:
    """This rank's part of a collated batch: under sequence parallelism, its zigzag chunks."""
    if ps.sp_size == 1:
        return batch
    from ..parallel.sequence_split import split_for_sequence_parallel
    return split_for_sequence_parallel(batch, ps)


def forward_loss_sum(model, batch: dict, ps, compute_dtype, packing: bool) -> torch.Tensor:
    """Sum of per-token cross-entropy over this rank's tokens (fp32 scalar, differentiable). The LM head, the
    largest matmul per token, runs only on positions whose label is trained (not on prompts or padding)."""
    batch = {k: v.to(ps.device) for k, v in sequence_batch(batch, ps).items()}
    trained = batch["labels"] != IGNORE_INDEX  # [B, S]; the same on every MP rank
    with autocast(compute_dtype, ps.device):
        hidden = model(batch["input_ids"], position_ids=batch["position_ids"],
                       segment_ids=batch["segment_ids"] if packing else None, hidden_only=True)  # [B, S, h]
        logits = model.logits(hidden[trained])  # [N, V/mp], N = trained positions
    return vocab_parallel_cross_entropy(logits, batch["labels"][trained], ps.mp_group, overwrite_logits=True).sum()


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool


def train_step(model, optimizer, sync: GradientSync, micro_batches, total_trained: int, ps, compute_dtype,
               pad_id: int, max_grad_norm: float, packing: bool) -> StepResult:
    """Forward/backward every micro-batch (loss divided by the step's global trained-token count), sync
    gradients over MP sharers and DP x SP, clip with one global norm, and step unless something is non-finite."""
    local = torch.zeros((), dtype=torch.float64, device=ps.device)
    for rows in micro_batches:
        batch = collate(rows, pad_id, multiple=2 * ps.sp_size if ps.sp_size > 1 else 1)
        loss = forward_loss_sum(model, batch, ps, compute_dtype, packing) / max(total_trained, 1)
        loss.backward()
        local += loss.detach().double()
    sync()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = clip_grad_norm(params, max_grad_norm, ps)
    total_loss = all_reduce(local, ps.dpsp_group).item()
    skipped = not (math.isfinite(total_loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total_loss, grad_norm, skipped)


@torch.no_grad()
def evaluate(model, schedule: StepBatches, ps, compute_dtype, pad_id: int, packing: bool) -> float:
    """Token-mean loss over the whole eval set (rows split over DP ranks)."""
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=ps.device)
    total_tokens = 0
    for step in range(schedule.steps_per_epoch):
        micro, trained = schedule.micro_batches(0, step, ps.dp_rank)
        total_tokens += trained
        for rows in micro:
            batch = collate(rows, pad_id, multiple=2 * ps.sp_size if ps.sp_size > 1 else 1)
            total_loss += forward_loss_sum(model, batch, ps, compute_dtype, packing).double()
    model.train()
    return all_reduce(total_loss, ps.dpsp_group).item() / max(total_tokens, 1)


def count_input_tokens(micro_rows) -> int:
    return sum(len(r.ids) for r in micro_rows if r is not None)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train(args, ps, compute_dtype: torch.dtype) -> str:
    """Run SFT/pretraining as configured by solver_train's flags; returns the final checkpoint path."""
    model_type = resolve_model_type(args, ps)
    tokenizer_dir = tokenizer_source(args.tokenizer_file, args.ckpt_dir)
    if not tokenizer_dir:
        raise UsageError("--tokenizer_file is required with --from_scratch (no --ckpt_dir to take it from)")
    tok = load_tokenizer(tokenizer_dir, model_type=model_type)
    check_save_dir(args.save_dir, args.resume)
    log_dir = args.log_dir or args.save_dir

    samples, stats = load_samples(args.train_file, tok, args.use_chat_template, args.system_prompt, args.max_seq_len)
    log(f"{args.train_file}: {stats.samples} samples, {stats.truncated} truncated to {args.max_seq_len} tokens, "
        f"{stats.skipped_no_response} skipped (no response tokens left)", ps)
    rows = pack(samples, args.max_seq_len, args.packing)
    schedule = StepBatches(rows, args.max_batch_size, ps.dp_size, args.gradient_accumulation_steps, args.seed)
    total_steps = args.epochs * schedule.steps_per_epoch
    eval_schedule = None
    if args.eval_file:
        eval_samples, _ = load_samples(args.eval_file, tok, args.use_chat_template, args.system_prompt,
                                       args.max_seq_len)
        eval_schedule = StepBatches(pack(eval_samples, args.max_seq_len, args.packing), args.max_batch_size,
                                    ps.dp_size, 1, args.seed)

    resume_from = latest_checkpoint(args.save_dir) if args.resume else None
    if args.resume and resume_from is None:
        log(f"--resume: no checkpoint in {args.save_dir} yet, starting a new run", ps)
    if resume_from:
        model = load_pretrained(resume_from, model_type, ps)
    elif args.from_scratch:
        if not args.config_file:
            raise UsageError("--from_scratch needs --config_file (the architecture of the new model)")
        model = create_from_config(args.config_file, model_type, ps, args.seed)
    else:
        if not args.ckpt_dir:
            raise UsageError("--ckpt_dir is required (or --from_scratch with --config_file)")
        model = load_pretrained(args.ckpt_dir, model_type, ps, args.config_file)
    model.activation_checkpointing = args.activation_checkpointing
    model.train()
    optimizer = make_optimizer(model, args.lr, args.weight_decay, (args.adam_beta1, args.adam_beta2))
    sync = GradientSync(model, ps)
    keep_freed_memory(ps.device)  # after the load: steps reuse freed memory instead of page-faulting it
    start_step = 0
    if resume_from:
        trainer = load_training_state(resume_from, model, optimizer, ps)
        if trainer.get("global_batch") != schedule.global_batch:
            raise UsageError(f"{resume_from} used a global batch of {trainer.get('global_batch')} rows; this run "
                             f"has {schedule.global_batch} (max_batch_size x DP x accumulation): keep them equal")
        start_step = trainer["step"]
        log(f"resumed from {resume_from} at step {start_step}", ps)

    source_config = export_config_source(args, resume_from)
    save_dtype = SAVE_DTYPES[args.save_dtype]
    last_step = total_steps if not args.max_steps else min(total_steps, args.max_steps)
    metrics_path = os.path.join(log_dir, "metrics.jsonl")
    if ps.rank == 0:
        os.makedirs(log_dir, exist_ok=True)
        os.makedirs(args.save_dir, exist_ok=True)
    log(f"training {model_type} | layout MP={ps.mp_size} SP={ps.sp_size} DP={ps.dp_size} | {len(rows)} rows, "
        f"{schedule.steps_per_epoch} steps/epoch x {args.epochs} epochs, global batch {schedule.global_batch} | "
        f"compute {str(compute_dtype).replace('torch.', '')}", ps)

    def save(step):
        state = {"epoch": step // schedule.steps_per_epoch, "step_in_epoch": step % schedule.steps_per_epoch,
                 "global_batch": schedule.global_batch, "total_steps": total_steps, "model_type": model_type}
        path = save_checkpoint(args.save_dir, step, model, optimizer, state, ps, source_config=source_config,
                               tokenizer_dir=tokenizer_dir, save_dtype=save_dtype, keep=args.save_total_limit)
        log(f"saved {path}", ps)
        return path

    t0, tokens_done, skipped_total, path = time.time(), 0, 0, None
    for step in range(start_step, last_step):
        epoch, in_epoch = divmod(step, schedule.steps_per_epoch)
        micro, trained = schedule.micro_batches(epoch, in_epoch, ps.dp_rank)
        lr = lr_at(step, args.lr, total_steps, args.warmup_steps, args.lr_scheduler)
        set_lr(optimizer, lr)
        result = train_step(model, optimizer, sync, micro, trained, ps, compute_dtype, tok.pad_id,
                            args.max_grad_norm, args.packing)
        tokens_done += count_input_tokens(schedule.step_rows(epoch, in_epoch))
        skipped_total += result.skipped
        elapsed = time.time() - t0
        record = {"step": step + 1, "epoch": epoch, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                  "tokens_per_s": tokens_done / max(elapsed, 1e-9), "elapsed_s": elapsed,
                  "skipped": result.skipped}
        if result.skipped:
            log(f"step {step + 1}: non-finite loss or gradient (loss {result.loss}, grad-norm {result.grad_norm}); "
                f"update skipped ({skipped_total} so far)", ps)
        if eval_schedule is not None and args.eval_steps and (step + 1) % args.eval_steps == 0:
            record["eval_loss"] = evaluate(model, eval_schedule, ps, compute_dtype, tok.pad_id, args.packing)
        if ps.rank == 0:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if (step + 1) % args.log_steps == 0 or step + 1 == last_step:
                eta = elapsed / (step + 1 - start_step) * (last_step - step - 1)
                extra = f" | eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                log(f"step {step + 1}/{last_step} | loss {result.loss:.4f} | lr {lr:.2e} | grad-norm "
                    f"{result.grad_norm:.3f} | {record['tokens_per_s']:.0f} tok/s | ETA {format_eta(eta)}{extra}")
        if args.save_steps and (step + 1) % args.save_steps == 0 and step + 1 != last_step:
            path = save(step + 1)
    if last_step > start_step or path is None:
        path = save(last_step)
    return path
