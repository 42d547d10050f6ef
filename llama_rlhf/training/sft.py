"""The supervised fine-tuning / pretraining loop behind solver_train.py."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..data import StepBatches, build_train_data, collate
from ..parallel.comm import all_reduce
from ..parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from ..runtime import UsageError, autocast, log
from .distributed_optimizer import DistributedAdamW
from .evaluation import SampleTracker, due
from .setup import TrainingRun


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


def train_step(model, optimizer: DistributedAdamW, micro_batches, total_trained: int, ps, compute_dtype,
               pad_id: int, max_grad_norm: float, packing: bool) -> StepResult:
    """Forward/backward every micro-batch (loss divided by the step's global trained-token count); the optimizer
    reduces gradients over MP sharers and DP x SP (overlapped with the last backward), clips with one global
    norm, and steps unless the loss or the norm is non-finite."""
    local = torch.zeros((), dtype=torch.float64, device=ps.device)
    for i, rows in enumerate(micro_batches):
        batch = collate(rows, pad_id, multiple=2 * ps.sp_size if ps.sp_size > 1 else 1)
        loss = forward_loss_sum(model, batch, ps, compute_dtype, packing) / max(total_trained, 1)
        optimizer.start_micro_batch(last=i == len(micro_batches) - 1)
        (loss * optimizer.loss_scale).backward()
        local += loss.detach().double()
    optimizer.finish_gradients()  # before any other collective on the DP x SP group
    total_loss = all_reduce(local, ps.dpsp_group).item()
    grad_norm, skipped = optimizer.step(max_grad_norm, loss_is_finite=math.isfinite(total_loss))
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
    run = TrainingRun.prepare(args, ps, compute_dtype)
    tok = run.tok
    data = build_train_data(args, tok, ps)
    schedule, eval_schedule = data.schedule, data.eval_schedule
    total_steps = args.epochs * schedule.steps_per_epoch
    tracker = SampleTracker(args, tok, ps) if args.sample_prompts_file else None

    model = run.load_model()
    optimizer = run.optimizer
    if run.resume_from and run.trainer_state.get("global_batch") != schedule.global_batch:
        raise UsageError(f"{run.resume_from} used a global batch of {run.trainer_state.get('global_batch')} rows; "
                         f"this run has {schedule.global_batch} (max_batch_size x DP x accumulation): keep them equal")
    start_step = run.start_step
    last_step = total_steps if not args.max_steps else min(total_steps, args.max_steps)
    log(f"training {run.model_type} | {run.describe()} | {schedule.epoch_rows} rows, {schedule.steps_per_epoch} "
        f"steps/epoch x {args.epochs} epochs, global batch {schedule.global_batch}", ps)

    def save(step):
        return run.save(step, {"epoch": step // schedule.steps_per_epoch,
                               "step_in_epoch": step % schedule.steps_per_epoch,
                               "global_batch": schedule.global_batch, "total_steps": total_steps})

    if tracker is not None and start_step == 0:
        run.metrics.write({"step": 0, **tracker(model, 0, compute_dtype)})
    t0, tokens_done, skipped_total = time.time(), 0, 0
    for step in range(start_step, last_step):
        epoch, in_epoch = divmod(step, schedule.steps_per_epoch)
        micro, trained = schedule.micro_batches(epoch, in_epoch, ps.dp_rank)
        lr = run.set_lr(step, total_steps)
        result = train_step(model, optimizer, micro, trained, ps, compute_dtype, tok.pad_id, args.max_grad_norm,
                            args.packing)
        tokens_done += count_input_tokens(schedule.step_rows(epoch, in_epoch))
        skipped_total += result.skipped
        elapsed = time.time() - t0
        record = {"step": step + 1, "epoch": epoch, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                  "tokens_per_s": tokens_done / max(elapsed, 1e-9), "elapsed_s": elapsed,
                  "skipped": result.skipped, "skipped_steps": skipped_total}
        if result.skipped:
            log(f"step {step + 1}: non-finite loss or gradient (loss {result.loss}, grad-norm {result.grad_norm}); "
                f"update skipped ({skipped_total} so far)", ps)
        if eval_schedule is not None and args.eval_steps and (step + 1) % args.eval_steps == 0:
            record["eval_loss"] = evaluate(model, eval_schedule, ps, compute_dtype, tok.pad_id, args.packing)
        if tracker is not None and due(step + 1, args.sample_steps, last_step):
            record.update(tracker(model, step + 1, compute_dtype))
        run.metrics.write(record)
        if ps.rank == 0 and ((step + 1) % args.log_steps == 0 or step + 1 == last_step):
            eta = elapsed / (step + 1 - start_step) * (last_step - step - 1)
            extra = f" | eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""
            log(f"step {step + 1}/{last_step} | loss {result.loss:.4f} | lr {lr:.2e} | grad-norm "
                f"{result.grad_norm:.3f} | {record['tokens_per_s']:.0f} tok/s | peak {record['peak_memory_mb']:.0f} MB"
                f"/rank | ETA {format_eta(eta)}{extra}")
        run.end_of_step(step + 1, last_step, save)
    return save(last_step)
