"""GRPO: sample G completions per prompt, score them, normalise rewards per group, and update the policy with
a surrogate (clipped, CISPO or SAPO; token- or sequence-level ratios; training/grpo_loss.py) plus an optional k3
KL penalty to a frozen reference, on the same MP/SP/DP layout; one or several optimizer steps per rollout batch.

Each DP rank owns whole groups (its prompts and all their samples); every completion is a ``Rollout`` that
carries its own ids, rewards, advantage, old and reference log-probs from sampling to update, never re-sorted.

The update runs each prompt once per micro-batch, followed by all of its samples' completions in the same row
(training/update_batch.py, --shared_prompts; one row per sample under SP).

Rollouts may come from a sampling copy of the policy in another precision (--rollout_dtype, --rollout_quantization
int8: inference/rollout_model.py), refreshed after updates. The loss never sees the sampler's log-probs: with one
update per rollout batch the old log-probs are the trainer's own current ones (detached: what a recompute before
the update would give, at no cost), otherwise the trainer recomputes them before the first update. The
sampler-trainer mismatch (mean and max |delta log p| per token, and a k3 estimate of KL(sampler || trainer)) is
logged every step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..inference.batch_generate import fit_prompt, prompt_ids
from ..data import epoch_order
from ..data.readers import read_records
from ..jsonl import DataError
from ..models.pretrained import load_pretrained
from ..parallel.comm import all_reduce
from ..parallel.cross_entropy import IGNORE_INDEX
from ..runtime import UsageError, log
from ..inference.sampling import SamplingParams
from .evaluation import HeldOutEval, due
from .logprobs import global_sum, local_part, sequence_sum, token_logprobs
from .update_batch import completion_values, update_batch
from .grpo_loss import LossConfig, group_advantages, loss_share, mean_and_std, token_terms, token_weights
from ..rewards import build_rewards, reward_sample, score, total
from .setup import TrainingRun
from .sp_rollouts import generate_rollouts


@dataclass
class Prompt:
    index: int  # line order in the data file (the prompt's id)
    ids: list[int]
    sample: dict  # the jsonl object, passed to reward functions


@dataclass
class Rollout:
    """One completion and everything the update needs about it."""

    prompt: Prompt
    sample_index: int
    completion_ids: list[int]
    finish_reason: str
    sampler_logprobs: list[float]
    text: str = ""
    rewards: list[float] = field(default_factory=list)
    reward: float = 0.0
    advantage: float = 0.0
    old_logprobs: torch.Tensor | None = None  # [completion length]
    ref_logprobs: torch.Tensor | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def load_prompts(path: str, tok, use_chat_template: bool, system_prompt: str | None, max_prompt_len: int,
                 needs_answer: bool) -> tuple[list[Prompt], int]:
    """Prompts from jsonl, rendered as solver_generate renders them (``instruction`` or ``messages``; other
    fields kept for the rewards); returns them and how many were cut from the left to ``max_prompt_len``."""
    prompts, cut = [], 0
    for where, obj in read_records(path):
        if needs_answer and "answer" not in obj:
            raise DataError(f"{where}: the accuracy reward needs an 'answer' field")
        ids, n_cut = fit_prompt(prompt_ids(obj, tok, use_chat_template, system_prompt, where), max_prompt_len + 1,
                                tok.bos_id)
        cut += n_cut > 0
        prompts.append(Prompt(len(prompts), ids, obj))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts, cut


STAT_NAMES = ("loss", "kl", "low_clip", "high_clip", "entropy", "tokens", "mismatch_abs", "mismatch_kl",
              "mismatch_tokens")


class UpdateStats:
    """Metric sums of micro-batches, held as one float64 tensor on the device so that adding them up needs no host
    sync (one per step, when the metrics are reduced); each name reads as a float. ``mismatch_max`` is a max."""

    def __init__(self, device="cpu"):
        self.values = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=device)
        self.mismatch_max = torch.zeros((), dtype=torch.float64, device=device)

    def __iadd__(self, other: "UpdateStats") -> "UpdateStats":
        self.values = self.values + other.values.to(self.values.device)
        self.mismatch_max = torch.maximum(self.mismatch_max, other.mismatch_max.to(self.values.device))
        return self

    def __getattr__(self, name):
        if name in STAT_NAMES:
            return float(self.values[STAT_NAMES.index(name)])
        raise AttributeError(name)


def mismatch_sums(trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sampler-trainer log-prob mismatch over the masked tokens: (sum |d|, sum of k3 = exp(d) - 1 - d, count,
    max |d|) with d = log p_trainer - log p_sampler; k3's mean estimates KL(sampler || trainer) from the sampler's
    own tokens. Float64 tensors; nothing leaves the device."""
    d = (trainer.detach().double() - sampler.double()) * mask
    k3 = (torch.expm1(d) - d) * mask
    return d.abs().sum(), k3.sum(), mask.sum().double(), (d.abs() * mask).max() if d.numel() else d.new_zeros(())


def grpo_backward(model, rollouts: list[Rollout], ps, *, temperature: float, compute_dtype, pad_id: int,
                  loss: LossConfig, global_sequences: int, global_tokens: float, global_micro_batches: int,
                  max_completion_length: int, mask_truncated: bool, on_policy: bool,
                  loss_scale: float = 1.0, measure_mismatch: bool = False, share_prompts: bool = True) -> UpdateStats:
    """Forward + backward of one micro-batch of rollouts; returns its (unnormalised) metric sums, on the device.

    ``on_policy`` (one update per rollout batch): the old log-probs are the trainer's current ones, detached
    (never the sampler's). ``measure_mismatch``: also sum the sampler-trainer mismatch (``mismatch_sums``) of these
    log-probs. The global counts are those of the optimizer step (see grpo_loss.token_weights). ``share_prompts``:
    each prompt runs once per micro-batch, followed by its samples' completions (training/update_batch.py; not
    under SP).
    """
    fields = ("old", "ref", "adv") + (("sampler",) if measure_mismatch else ())
    batch = update_batch(rollouts, pad_id, ps, fields, share_prompts)
    mask = (batch["labels"] != IGNORE_INDEX).float()
    if mask_truncated:
        mask = mask * torch.tensor([0.0 if r.truncated else 1.0 for r in rollouts], device=mask.device).unsqueeze(-1)
    counts = dict(global_sequences=global_sequences, global_tokens=global_tokens,
                  global_micro_batches=global_micro_batches, max_completion_length=max_completion_length)
    batch["weight"] = token_weights(mask, loss.loss_type, **counts)
    batch["entropy_weight"] = token_weights(mask, "bnpo", **counts)
    batch["mask"] = mask
    local = local_part(batch, ps)
    logp, entropy = token_logprobs(model, local, ps, temperature, compute_dtype, with_entropy=True,
                                   entropy_grad=loss.entropy_coef != 0.0)
    old = logp.detach() if on_policy else local["old"]
    terms = token_terms(logp, old, local["adv"], loss, local["ref"] if loss.beta else None, local["mask"],
                        sequence_sum(ps))
    share = loss_share(terms, local["weight"], entropy, local["entropy_weight"], loss.entropy_coef)
    (share * loss_scale).backward()
    m = local["mask"]
    zero = m.new_zeros(())
    stats = UpdateStats(m.device)
    parts = [share.detach(), (terms.kl.detach() * m).sum() if terms.kl is not None else zero,
             (terms.low_clipped.float() * m).sum(), (terms.high_clipped.float() * m).sum(),
             (entropy.detach() * m).sum(), m.sum()]
    if measure_mismatch:
        *sums, stats.mismatch_max = mismatch_sums(logp, local["sampler"], (local["labels"] != IGNORE_INDEX).float())
        parts += sums
    else:
        parts += [zero] * 3
    stats.values = torch.stack([v.double() for v in parts])
    return stats


@torch.no_grad()
def fill_logprobs(model, rollouts: list[Rollout], ps, attr: str, temperature: float, compute_dtype, pad_id: int,
                  micro_batch: int, share_prompts: bool = True) -> None:
    """Set ``rollout.<attr>`` to each completion's token log-probs under ``model`` (no grad)."""
    for start in range(0, len(rollouts), micro_batch):
        chunk = rollouts[start:start + micro_batch]
        batch = update_batch(chunk, pad_id, ps, (), share_prompts)
        logp, _ = token_logprobs(model, local_part(batch, ps), ps, temperature, compute_dtype)
        for r, values in zip(chunk, completion_values(logp, chunk, batch, ps)):
            setattr(r, attr, values)


def score_rollouts(rollouts: list[Rollout], rewards, tok) -> None:
    for r in rollouts:
        r.text = tok.decode(r.completion_ids, skip_special_tokens=True)
        r.rewards = score(rewards, r.text, reward_sample(r.prompt.sample, r.completion_ids, r.truncated))
        r.reward = total(rewards, r.rewards)


def dp_sum(ps):
    """Sum a host tensor over DP ranks (every MP/SP peer holds the same rollouts); the result is on the host."""
    return lambda t: all_reduce(t.to(ps.device), ps.dp_group).cpu()


def assign_advantages(rollouts: list[Rollout], group: int, scale: str, ps) -> None:
    """Group-normalised advantages; with ``batch`` scaling the std is over the whole global batch."""
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    adv = group_advantages(rewards, group, scale, reduce=dp_sum(ps))
    for r, a in zip(rollouts, adv.tolist()):
        r.advantage = a


def rollout_slices(rollouts: list[Rollout], n: int) -> list[list[Rollout]]:
    """``n`` contiguous, near-equal slices (one per optimizer step); slices hold whole groups when n divides
    the groups, and a slice may be empty at the end of an epoch (its rank still joins the step)."""
    return [rollouts[i * len(rollouts) // n:(i + 1) * len(rollouts) // n] for i in range(n)]


def load_reference(args, run: TrainingRun):
    """The frozen initial model for the KL term, held in the compute dtype, outside the optimizer (with LoRA: the
    same model with its adapters off, no second copy)."""
    if run.lora:
        from ..models.lora import AdaptersOff
        return AdaptersOff(run.model)
    reference = load_pretrained(args.ckpt_dir, run.model_type, run.ps, args.config_file,
                                dtype=run.compute_dtype).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def off_policy_mismatch(rollouts: list[Rollout], device) -> UpdateStats:
    """The mismatch of the trainer's recomputed old log-probs vs the sampler's (whole completions, on the host)."""
    stats = UpdateStats(device)
    pairs = [(r.old_logprobs, torch.tensor(r.sampler_logprobs, dtype=torch.float32)) for r in rollouts
             if r.old_logprobs is not None and len(r.sampler_logprobs) == len(r.old_logprobs) > 0]
    if pairs:
        trainer, sampler = torch.cat([t for t, _ in pairs]), torch.cat([s for _, s in pairs])
        *sums, stats.mismatch_max = mismatch_sums(trainer, sampler, torch.ones_like(trainer))
        stats.values[6:9] = torch.stack(sums).to(device)
        stats.mismatch_max = stats.mismatch_max.to(device)
    return stats


def rollout_sampler(args, run: TrainingRun):
    """The model rollouts sample from and its compute dtype: the policy itself, or a RolloutModel copy in
    --rollout_dtype / int8 (None when the flags ask for exactly what the policy already is)."""
    dtype_name = getattr(args, "rollout_dtype", None)
    quant = getattr(args, "rollout_quantization", "none")
    if dtype_name is None and quant in (None, "none"):
        return None
    from ..inference.rollout_model import ROLLOUT_DTYPES, RolloutModel
    dtype = ROLLOUT_DTYPES[dtype_name or "float32"]
    held = next(run.model.parameters()).dtype
    if quant in (None, "none") and dtype == held:
        log(f"--rollout_dtype {dtype_name}: the policy is already held in it; rollouts sample from it directly",
            run.ps)
        return None
    rollout = RolloutModel(run.model, dtype, quant)
    log(f"rollout copy: {dtype_name or 'float32'}{' + int8 decoder linears' if rollout.quantization else ''}, "
        f"{rollout.nbytes / 2**20:.1f} MiB per rank, {rollout.refreshed_tensors} tensors refreshed after updates",
        run.ps)
    return rollout


def train_grpo(args, ps, compute_dtype: torch.dtype) -> str:
    """The GRPO loop behind solver_grpo.py; returns the final checkpoint path."""
    run = TrainingRun.prepare(args, ps, compute_dtype)
    tok, model_type = run.tok, run.model_type
    rewards = build_rewards(args.reward_funcs, args.reward_weights, (args.length_min, args.length_max))
    max_prompt_len = args.max_seq_len - args.max_new_tokens
    if max_prompt_len < 1:
        raise UsageError(f"--max_seq_len {args.max_seq_len} leaves no room for prompts after --max_new_tokens "
                         f"{args.max_new_tokens}")
    prompts, cut = load_prompts(args.train_file, tok, args.use_chat_template, args.system_prompt, max_prompt_len,
                                any(name == "accuracy" for name, _, _ in rewards))
    log(f"{args.train_file}: {len(prompts)} prompts ({cut} cut from the left to {max_prompt_len} tokens)", ps)
    evaluator = HeldOutEval(args, tok, rewards, ps, max_prompt_len) if args.eval_file else None
    group = args.num_samples_per_prompt
    prompts_per_step = args.max_batch_size * ps.dp_size
    steps_per_epoch = math.ceil(len(prompts) / prompts_per_step)
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps

    model = run.load_model()
    optimizer = run.optimizer
    reference = load_reference(args, run) if args.beta != 0.0 else None
    rollout_copy = rollout_sampler(args, run)
    sampler = rollout_copy.model if rollout_copy else model
    sampler_dtype = rollout_copy.dtype if rollout_copy else compute_dtype
    cuda_graphs = getattr(args, "cuda_graphs", False) and ps.device.type == "cuda"  # decode steps as CUDA graphs
    share = getattr(args, "shared_prompts", True)  # one prompt + its samples' completions per update row
    start_step = run.start_step
    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens, group)
    loss_cfg = LossConfig.from_args(args)
    slices = args.steps_per_rollout
    updates = args.num_iterations * slices  # optimizer steps per rollout batch; the lr schedule counts these
    log(f"GRPO {model_type} | {run.describe()} | {prompts_per_step} prompts x "
        f"{group} samples per step, {total_steps} steps x {updates} updates | rewards {args.reward_funcs} | loss "
        f"{args.loss_type} ({args.importance_sampling_level} ratios), beta {args.beta} ({args.kl_estimator})", ps)
    skipped_total = int(run.trainer_state.get("skipped_steps", 0))

    def save(step):
        return run.save(step, {"total_steps": total_steps, "skipped_steps": skipped_total})

    if evaluator is not None and start_step == 0:
        run.metrics.write({"step": 0, **evaluator(model, 0, compute_dtype)})
    t_start = time.time()
    for step in range(start_step, last_step):
        t0 = time.time()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(len(prompts), args.seed, epoch)
        chosen = order[in_epoch * prompts_per_step:(in_epoch + 1) * prompts_per_step]
        mine = [prompts[i] for i in chosen[ps.dp_rank * args.max_batch_size:(ps.dp_rank + 1) * args.max_batch_size]]
        # rollouts: whole groups on this DP rank, random streams keyed by (seed, step) and global prompt ids
        # (under SP, each peer samples a share of the prompts and the token ids are all-gathered)
        if rollout_copy is not None:
            rollout_copy.refresh()  # the weights of the last updates (every rank: no communication)
        completions = generate_rollouts(sampler, [p.ids for p in mine], params, tok.end_ids, ps,
                                        max_batch_size=args.rollout_batch_size, max_seq_len=args.max_seq_len,
                                        seed=args.seed * 1_000_003 + step, prompt_keys=[p.index for p in mine],
                                        compute_dtype=sampler_dtype, static_decode=cuda_graphs) if mine else []
        rollouts = [Rollout(p, s, c.token_ids, c.finish_reason, c.logprobs)
                    for p, samples in zip(mine, completions) for s, c in enumerate(samples)]
        t_rollout = time.time() - t0
        score_rollouts(rollouts, rewards, tok)
        assign_advantages(rollouts, group, args.scale_rewards, ps)
        parts = rollout_slices(rollouts, slices)
        micro = args.train_batch_size or max(map(len, parts)) or 1
        mismatch = None  # on-policy: measured inside the update's own forward
        if updates > 1:  # the trainer's log-probs before the first update (never the sampler's)
            fill_logprobs(model, rollouts, ps, "old_logprobs", args.temperature, compute_dtype, tok.pad_id, micro,
                          share)
            mismatch = off_policy_mismatch(rollouts, ps.device)
        if reference is not None:
            fill_logprobs(reference, rollouts, ps, "ref_logprobs", args.temperature, compute_dtype, tok.pad_id, micro,
                          share)

        def kept_tokens(part):
            return sum(len(r.completion_ids) for r in part if not (args.mask_truncated_completions and r.truncated))
        counts = global_sum([x for part in parts for x in (len(part), kept_tokens(part), math.ceil(len(part) / micro))],
                            ps)
        n_seq = sum(counts[0::3])
        n_tok = sum(counts[1::3]) / slices  # dapo/cispo: the rollout batch's tokens per optimizer step (as TRL)
        totals, norms, step_losses, skipped_steps = UpdateStats(ps.device), [], [], 0
        for iteration in range(args.num_iterations):
            totals = UpdateStats(ps.device)
            for j, part in enumerate(parts):
                lr = run.set_lr((step * args.num_iterations + iteration) * slices + j, total_steps * updates)
                step_loss = torch.zeros((), dtype=torch.float64, device=ps.device)
                for start in range(0, len(part), micro):  # a rank without rollouts still joins the reduction
                    chunk = part[start:start + micro]
                    optimizer.start_micro_batch(last=start + micro >= len(part))
                    s = grpo_backward(model, chunk, ps, temperature=args.temperature, compute_dtype=compute_dtype,
                                      pad_id=tok.pad_id, loss=loss_cfg, global_sequences=int(counts[3 * j]),
                                      global_tokens=n_tok, global_micro_batches=int(counts[3 * j + 2]),
                                      max_completion_length=args.max_new_tokens,
                                      mask_truncated=args.mask_truncated_completions,
                                      on_policy=updates == 1, loss_scale=optimizer.loss_scale,
                                      measure_mismatch=updates == 1, share_prompts=share)
                    totals += s
                    step_loss = step_loss + s.values[0]  # stays on the device: no sync per micro-batch
                step_loss = all_reduce(step_loss, ps.dpsp_group).item()  # one host sync per optimizer step
                grad_norm, skipped = optimizer.step(args.max_grad_norm, loss_is_finite=math.isfinite(step_loss))
                if rollout_copy is not None and not skipped:
                    rollout_copy.mark_stale()
                norms.append(grad_norm)
                step_losses.append(step_loss)
                if skipped:  # the same decision on every rank: the loss and the norm are global
                    skipped_steps += 1
                    log(f"step {step + 1}: update {iteration * slices + j + 1}/{updates} skipped (loss {step_loss}, "
                        f"grad norm {grad_norm}: not finite); {skipped_total + skipped_steps} skipped so far", ps)

        # metrics: sums over DP (and over SP for token-level values, whose tokens are split)
        if mismatch is not None:  # measured on whole completions per DP rank: count it once per SP group
            totals.values[6:9] = mismatch.values[6:9] / ps.sp_size
            totals.mismatch_max = mismatch.mismatch_max
        token_sums = all_reduce(totals.values, ps.dpsp_group).tolist()
        per_fn = [sum(r.rewards[k] for r in rollouts) for k in range(len(rewards))]
        lengths = [len(r.completion_ids) for r in rollouts]
        mean, reward_std = (v.item() for v in mean_and_std(
            torch.tensor([r.reward for r in rollouts], dtype=torch.float64), dp_sum(ps)))
        sums = global_sum([sum(lengths), sum(r.truncated for r in rollouts)] + per_fn, ps)
        # both maxima in one collective (the completion length is the same on SP peers, so MAX over DP x SP)
        mismatch_max, max_len = all_reduce(torch.stack([totals.mismatch_max, totals.mismatch_max.new_tensor(
            float(max(lengths, default=0)))]), ps.dpsp_group, op=torch.distributed.ReduceOp.MAX).tolist()
        n, tokens = max(n_seq, 1), max(token_sums[5], 1)
        record = {"step": step + 1, "epoch": epoch, "lr": lr, "loss": sum(step_losses[-slices:]) / slices,
                  "reward_mean": mean, "reward_std": reward_std, "kl": token_sums[1] / tokens,
                  "clip_low": token_sums[2] / tokens, "clip_high": token_sums[3] / tokens,
                  "entropy": token_sums[4] / tokens, "completion_len_mean": sums[0] / n,
                  "completion_len_max": max_len, "truncated_rate": sums[1] / n,
                  "grad_norm": sum(norms) / len(norms),
                  "rollout_logprob_diff_mean": token_sums[6] / max(token_sums[8], 1),
                  "rollout_logprob_diff_max": mismatch_max, "rollout_kl": token_sums[7] / max(token_sums[8], 1),
                  "tokens_per_s": sums[0] / max(time.time() - t0, 1e-9), "rollout_s": t_rollout,
                  "step_s": time.time() - t0}
        for (name, _, _), value in zip(rewards, sums[2:]):
            record[f"reward/{name}"] = value / n
        skipped_total += skipped_steps
        record.update(skipped=skipped_steps, skipped_steps=skipped_total)
        if evaluator is not None and due(step + 1, args.eval_steps, last_step):
            record.update(evaluator(model, step + 1, compute_dtype))
        run.metrics.write(record)
        if ps.rank == 0:
            eta = (time.time() - t_start) / (step + 1 - start_step) * (last_step - step - 1)
            log(f"step {step + 1}/{last_step} | reward {mean:.3f} ± {record['reward_std']:.3f} | "
                + " ".join(f"{k[len('reward/'):].rsplit(':', 1)[-1]} {v:.3f}" for k, v in record.items()
                           if k.startswith("reward/"))
                + f" | kl {record['kl']:.4f} | clip {record['clip_low'] + record['clip_high']:.3f} | len "
                f"{record['completion_len_mean']:.0f} | {record['tokens_per_s']:.0f} tok/s | peak "
                f"{record['peak_memory_mb']:.0f} MB/rank | skipped {skipped_total} | ETA {eta:.0f}s")
            if args.log_completions_steps and (step + 1) % args.log_completions_steps == 0 and rollouts:
                for r in rollouts[:2]:
                    log(f"  [prompt {r.prompt.index} sample {r.sample_index} reward {r.reward:.2f}] "
                        f"{r.text[:300]!r}")
        run.end_of_step(step + 1, last_step, save)
    return save(last_step)
