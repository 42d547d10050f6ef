"""Preference optimization (DPO, IPO, hinge, SimPO) behind solver_dpo.py, on the same MP/SP/DP layouts as SFT.

Chosen and rejected responses of a micro-batch's pairs go through one forward as one [2B, S] batch; sequence
log-probs are sums of vocab-parallel token log-probs over the response (SP ranks add their zigzag chunks).
Reference log-probs are computed once, before the first step, by the initial policy (with LoRA: the same model
with its adapters off) and kept by pair id; no second model is held while training.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import numpy as np
import torch

from ..data import collate
from ..data.pairs import PairRows, build_pair_data
from ..parallel.comm import all_reduce
from ..parallel.cross_entropy import IGNORE_INDEX
from ..runtime import UsageError, log
from .dpo_loss import PreferenceLoss, pair_losses, step_loss
from .evaluation import due
from .logprobs import global_sum, local_part, sequence_sum, token_logprobs
from .setup import TrainingRun
from .sft import format_eta

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "nll/chosen")


def pair_batch(pairs: list, pad_id: int, ps) -> dict:
    """[2B, S] tensors: the chosen responses of ``pairs`` (None: padding), then their rejected responses."""
    rows = [p.chosen if p else None for p in pairs] + [p.rejected if p else None for p in pairs]
    return collate(rows, pad_id, multiple=2 * ps.sp_size if ps.sp_size > 1 else 1)


def sequence_logps(model, batch: dict, ps, compute_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [2B] (differentiable when grad is on; equal on every MP and SP rank) and the
    response token counts [2B] of a collated pair batch."""
    counts = (batch["labels"] != IGNORE_INDEX).sum(-1).to(ps.device)  # [2B]
    logp, _ = token_logprobs(model, local_part(batch, ps), ps, 1.0, compute_dtype)  # [2B, S_local]
    total = sequence_sum(ps)
    return (logp.sum(-1) if total is None else total(logp)), counts


def reference_logps(model, pairs: PairRows, ps, compute_dtype, pad_id: int, micro_batch: int, lora: bool):
    """[n_pairs, 2] float64 (chosen, rejected) summed log-probs of every pair under the initial model (adapters
    off with LoRA); each DP rank scores every DP-th pair, then the table is summed over DP."""
    table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=ps.device)
    mine = list(range(ps.dp_rank, len(pairs), ps.dp_size))
    context = contextlib.nullcontext()
    if lora:
        from ..models.lora import adapters_disabled
        context = adapters_disabled(model)
    was_training = model.training
    model.eval()
    with torch.no_grad(), context:
        for start in range(0, len(mine), micro_batch):
            chunk = [pairs[i] for i in mine[start:start + micro_batch]]
            logps, _ = sequence_logps(model, pair_batch(chunk, pad_id, ps), ps, compute_dtype)
            index = torch.tensor([p.index for p in chunk], device=ps.device)
            table[index] = torch.stack(logps.double().chunk(2), dim=-1)
    model.train(was_training)
    return all_reduce(table, ps.dp_group).cpu()


def pair_forward(model, pairs: list, ref: torch.Tensor | None, cfg: PreferenceLoss, ps, compute_dtype, pad_id: int):
    """Per-pair losses, rewards and log-probs of one micro-batch ([B] each; padding pairs have valid 0)."""
    logps, counts = sequence_logps(model, pair_batch(pairs, pad_id, ps), ps, compute_dtype)
    chosen, rejected = logps.chunk(2)
    n_c, n_r = counts.chunk(2)
    valid = torch.tensor([p is not None for p in pairs], dtype=chosen.dtype, device=chosen.device)
    ref_c = ref_r = None
    if cfg.needs_reference:
        picked = torch.stack([ref[p.index] if p else torch.zeros(2, dtype=ref.dtype) for p in pairs])
        ref_c, ref_r = picked.to(device=chosen.device, dtype=chosen.dtype).unbind(-1)
    losses, reward_c, reward_r = pair_losses(cfg, chosen, rejected, ref_c, ref_r, n_c, n_r)
    return losses * valid, reward_c, reward_r, chosen, rejected, n_c, valid


def metric_sums(losses, reward_c, reward_r, chosen, rejected, n_c, valid) -> list[float]:
    """Sums over a micro-batch's real pairs, in METRICS order (the NLL as a token sum)."""
    v = valid.detach().double()
    c, r = reward_c.double(), reward_r.double()
    lc, lr = chosen.detach().double(), rejected.detach().double()
    return [(losses.detach().double() * v).sum().item(), (c * v).sum().item(), (r * v).sum().item(),
            ((c - r) * v).sum().item(), ((c > r).double() * v).sum().item(), (lc * v).sum().item(),
            (lr * v).sum().item(), -(lc * v).sum().item()]


def finish_metrics(sums: list[float], pairs: float, chosen_tokens: float) -> dict:
    out = {name: s / max(pairs, 1) for name, s in zip(METRICS, sums)}
    out["nll/chosen"] = sums[-1] / max(chosen_tokens, 1)
    return out


def dpo_backward(model, optimizer, micro, ref, cfg: PreferenceLoss, ps, compute_dtype, pad_id: int,
                 global_pairs: int, global_chosen_tokens: int) -> dict:
    """Forward/backward every micro-batch of pairs and reduce the gradients; returns the step's metrics. Each
    rank's share is its pairs' losses over the step's global pair count, split evenly between SP peers (who
    hold the same sequence sums), so gradients simply add over DP x SP and micro-batches."""
    sums = [0.0] * len(METRICS)
    for i, pairs in enumerate(micro):
        out = pair_forward(model, pairs, ref, cfg, ps, compute_dtype, pad_id)
        losses, _, _, chosen, _, _, valid = out
        share = step_loss(cfg, losses, chosen * valid, global_pairs, global_chosen_tokens) / ps.sp_size
        optimizer.start_micro_batch(last=i == len(micro) - 1)
        (share * optimizer.loss_scale).backward()
        sums = [a + b for a, b in zip(sums, metric_sums(*out))]
    optimizer.finish_gradients()  # before any other collective on the DP x SP group
    metrics = finish_metrics(global_sum(sums, ps), global_pairs, global_chosen_tokens)
    metrics["loss"] = metrics["loss"] + cfg.sft_weight * metrics["nll/chosen"]
    return metrics


def dpo_step(model, optimizer, micro, ref, cfg: PreferenceLoss, ps, compute_dtype, pad_id: int,
             global_pairs: int, global_chosen_tokens: int, max_grad_norm: float):
    """``dpo_backward``, then the optimizer step (clipped; skipped when the loss or the norm is non-finite)."""
    metrics = dpo_backward(model, optimizer, micro, ref, cfg, ps, compute_dtype, pad_id, global_pairs,
                           global_chosen_tokens)
    grad_norm, skipped = optimizer.step(max_grad_norm, loss_is_finite=math.isfinite(metrics["loss"]))
    return metrics, grad_norm, skipped


@torch.no_grad()
def evaluate(model, pairs: PairRows, ref, cfg: PreferenceLoss, ps, compute_dtype, pad_id: int, micro_batch: int):
    """Preference loss, accuracy and margins over the whole eval set (pairs split over DP ranks)."""
    model.eval()
    mine = list(range(ps.dp_rank, len(pairs), ps.dp_size))
    steps = -(-len(pairs) // (ps.dp_size * micro_batch))  # the same count on every rank
    sums = [0.0] * len(METRICS)
    for s in range(steps):
        chunk = [pairs[i] for i in mine[s * micro_batch:(s + 1) * micro_batch]] or [None]
        out = pair_forward(model, chunk, ref, cfg, ps, compute_dtype, pad_id)
        sums = [a + b for a, b in zip(sums, metric_sums(*out))]
    model.train()
    chosen_tokens = sum(sum(1 for t in pairs[i].chosen.labels if t != IGNORE_INDEX) for i in range(len(pairs)))
    metrics = finish_metrics(global_sum(sums, ps), len(pairs), chosen_tokens)
    return {f"eval_{k}": v for k, v in metrics.items()}


def reference_file(run: TrainingRun, key: str) -> str:
    return os.path.join(run.args.save_dir, "reference_logps", f"{key}.npy")


def load_or_compute_reference(run: TrainingRun, pairs: PairRows, key: str, cfg: PreferenceLoss):
    """The reference table of ``pairs``: computed at the start of a run and written next to the checkpoints, read
    back on resume (the resumed policy is no longer the reference; with LoRA it is recomputed, adapters off)."""
    if not cfg.needs_reference:
        return None
    path, args, ps = reference_file(run, key), run.args, run.ps
    if run.resume_from and os.path.isfile(path):
        table = torch.from_numpy(np.load(path, allow_pickle=False))
        if table.shape != (len(pairs), 2):
            raise UsageError(f"{path} holds {table.shape[0]} pairs, the data has {len(pairs)}: the data changed")
        return table
    if run.resume_from and not run.lora:
        raise UsageError(f"--resume: {path} (the initial model's log-probs) is missing; resume needs it")
    t0 = time.time()
    table = reference_logps(run.model, pairs, ps, run.compute_dtype, run.tok.pad_id, args.max_batch_size,
                            bool(run.lora))
    log(f"reference log-probs of {len(pairs)} pairs in {time.time() - t0:.1f} s", ps)
    if ps.rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path + ".tmp.npy", table.numpy())
        os.replace(path + ".tmp.npy", path)
    return table


def train_dpo(args, ps, compute_dtype: torch.dtype) -> str:
    """Run preference optimization as configured by solver_dpo's flags; returns the final checkpoint path."""
    cfg = PreferenceLoss(args.loss_type, args.beta, args.label_smoothing, args.simpo_gamma, args.sft_weight)
    cfg.check()
    run = TrainingRun.prepare(args, ps, compute_dtype)
    tok = run.tok
    data = build_pair_data(args, tok, ps)
    schedule = data.schedule
    total_steps = args.epochs * schedule.steps_per_epoch
    model = run.load_model()
    optimizer = run.optimizer
    if run.resume_from and run.trainer_state.get("global_batch") != schedule.global_batch:
        raise UsageError(f"{run.resume_from} used a global batch of {run.trainer_state.get('global_batch')} pairs; "
                         f"this run has {schedule.global_batch} (max_batch_size x DP x accumulation): keep them equal")
    ref = load_or_compute_reference(run, data.pairs, data.cache_key, cfg)
    eval_ref = None
    if data.eval_pairs is not None:
        eval_key = "eval-" + os.path.basename(data.eval_pairs.cache.folder)
        eval_ref = load_or_compute_reference(run, data.eval_pairs, eval_key, cfg)
    start_step = run.start_step
    last_step = total_steps if not args.max_steps else min(total_steps, args.max_steps)
    log(f"{cfg.loss_type} preference training of {run.model_type} | {run.describe()} | {len(data.pairs)} pairs, "
        f"{schedule.steps_per_epoch} steps/epoch x {args.epochs} epochs, global batch {schedule.global_batch} pairs "
        f"| beta {cfg.beta}", ps)

    def save(step):
        return run.save(step, {"epoch": step // schedule.steps_per_epoch,
                               "step_in_epoch": step % schedule.steps_per_epoch,
                               "global_batch": schedule.global_batch, "total_steps": total_steps})

    evaluating = data.eval_pairs is not None and args.eval_steps > 0
    if evaluating and start_step == 0:  # the "before" point: the policy is its reference, every margin is 0
        before = evaluate(model, data.eval_pairs, eval_ref, cfg, ps, compute_dtype, tok.pad_id, args.max_batch_size)
        run.metrics.write({"step": 0, **before})
        log(f"step 0 | eval loss {before['eval_loss']:.4f} | eval accuracy {before['eval_rewards/accuracies']:.3f} "
            f"| eval margin {before['eval_rewards/margins']:.4f}", ps)
    t0, pairs_done, skipped_total = time.time(), 0, 0
    for step in range(start_step, last_step):
        epoch, in_epoch = divmod(step, schedule.steps_per_epoch)
        micro, _ = schedule.micro_batches(epoch, in_epoch, ps.dp_rank)
        step_pairs = [p for p in schedule.step_rows(epoch, in_epoch) if p is not None]
        chosen_tokens = sum(sum(1 for t in p.chosen.labels if t != IGNORE_INDEX) for p in step_pairs)
        lr = run.set_lr(step, total_steps)
        metrics, grad_norm, skipped = dpo_step(model, optimizer, micro, ref, cfg, ps, compute_dtype, tok.pad_id,
                                               len(step_pairs), chosen_tokens, args.max_grad_norm)
        pairs_done += len(step_pairs)
        skipped_total += skipped
        elapsed = time.time() - t0
        record = {"step": step + 1, "epoch": epoch, **metrics, "lr": lr, "grad_norm": grad_norm,
                  "pairs_per_s": pairs_done / max(elapsed, 1e-9), "elapsed_s": elapsed, "skipped": skipped,
                  "skipped_steps": skipped_total}
        if skipped:
            log(f"step {step + 1}: non-finite loss or gradient (loss {metrics['loss']}, grad-norm {grad_norm}); "
                f"update skipped ({skipped_total} so far)", ps)
        if evaluating and due(step + 1, args.eval_steps, last_step):
            record.update(evaluate(model, data.eval_pairs, eval_ref, cfg, ps, compute_dtype, tok.pad_id,
                                   args.max_batch_size))
        run.metrics.write(record)
        if ps.rank == 0 and ((step + 1) % args.log_steps == 0 or step + 1 == last_step):
            eta = elapsed / (step + 1 - start_step) * (last_step - step - 1)
            extra = f" | eval accuracy {record['eval_rewards/accuracies']:.3f}" if "eval_loss" in record else ""
            log(f"step {step + 1}/{last_step} | loss {metrics['loss']:.4f} | accuracy "
                f"{metrics['rewards/accuracies']:.3f} | margin {metrics['rewards/margins']:.4f} | lr {lr:.2e} | "
                f"grad-norm {grad_norm:.3f} | {record['pairs_per_s']:.1f} pairs/s | peak "
                f"{record['peak_memory_mb']:.0f} MB/rank | ETA {format_eta(eta)}{extra}")
        run.end_of_step(step + 1, last_step, save)
    return save(last_step)
