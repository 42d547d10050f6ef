"""Per-token log-probs of a batch under a sharded model, and the sums over ranks that the losses built on them
need: shared by GRPO (policy, old and reference log-probs) and preference optimization (chosen/rejected).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..parallel.comm import all_reduce, copy_to_group, reduce_from_group
from ..parallel.cross_entropy import IGNORE_INDEX, upcast, vocab_parallel_entropy, vocab_parallel_log_probs
from ..parallel.sequence_split import zigzag_split
from ..runtime import autocast


def local_part(batch: dict, ps) -> dict:
    """This rank's tokens: the whole batch, or its zigzag chunks under sequence parallelism."""
    batch = {k: v.to(ps.device) for k, v in batch.items()}
    if ps.sp_size == 1:
        return batch
    return {k: zigzag_split(v, ps.sp_size, ps.sp_rank) for k, v in batch.items()}


LOGIT_CHUNK_BYTES = 2**30  # fp32 logits of one row chunk, per rank


def token_logprobs(model, batch: dict, ps, temperature: float, compute_dtype, with_entropy: bool = False,
                   entropy_grad: bool = False, chunk_rows: int | None = None):
    """log p(label) per position of this rank's tokens under softmax(logits / T), vocab-parallel: [B, S_local]
    (0 where the label is ignored), and the entropy there. The LM head runs only on positions with a label (the
    completions), ``chunk_rows`` of them at a time (default: 1 GiB of fp32 logits); with grad, each chunk's
    logits are recomputed in backward, so a micro-batch never holds more than one chunk's. ``entropy_grad`` (an
    entropy bonus) differentiates the entropy too. A batch with ``index`` (training/update_batch.completion_batch)
    has labels [R, C] per completion token, predicted by the hidden states at ``index`` [R, C] of the flattened
    rows; the results are [R, C] then."""
    labels = batch["labels"]
    scored = labels != IGNORE_INDEX  # [B, S] or [R, C]; the same on every MP rank
    with autocast(compute_dtype, ps.device):
        hidden = model(batch["input_ids"], position_ids=batch["position_ids"], hidden_only=True,
                       branches=batch.get("branches"))  # [B, S, h]
    if "index" in batch:  # [B * S, h] -> the predicting positions [N, h] (shared ones repeated; grads add up)
        rows = hidden.reshape(-1, hidden.shape[-1])[batch["index"][scored]]
    else:
        rows = hidden[scored]  # [N, h]
    targets = labels[scored]  # [N]
    width = model.model.embed_tokens.vocab_stop - model.model.embed_tokens.vocab_start  # V_padded / mp
    step = chunk_rows or max(1, LOGIT_CHUNK_BYTES // (4 * width))

    def chunk(h, t):  # [n, h], [n] -> log-probs [n], entropy [n]
        with autocast(compute_dtype, ps.device):
            logits = model.logits(h)  # [n, V/mp]
        logits = upcast(logits)  # fp64 stays fp64
        if temperature > 0 and temperature != 1.0:  # x / 1 == x exactly: no pass over [n, V/mp] for it
            logits = logits / temperature
        entropy = None
        if with_entropy:
            entropy = vocab_parallel_entropy(logits, ps.mp_group, differentiable=entropy_grad)
        logp = vocab_parallel_log_probs(logits, t, ps.mp_group, overwrite_logits=not entropy_grad)  # logits die
        return logp, entropy

    recompute = torch.is_grad_enabled() and rows.shape[0] > step
    # at least one (maybe empty) chunk: a rank without scored tokens still joins backward's collectives (MP, SP)
    parts = [checkpoint(chunk, rows[lo:lo + step], targets[lo:lo + step], use_reentrant=False) if recompute
             else chunk(rows[lo:lo + step], targets[lo:lo + step]) for lo in range(0, max(rows.shape[0], 1), step)]
    values = torch.cat([lp for lp, _ in parts])  # fp32 (fp64 for an fp64 model)
    logp = torch.zeros(labels.shape, dtype=values.dtype, device=labels.device)
    logp[scored] = values
    entropy = None
    if with_entropy:
        entropy = torch.zeros(labels.shape, dtype=values.dtype, device=labels.device)
        entropy[scored] = torch.cat([e for _, e in parts])
    return logp, entropy


def sequence_sum(ps):
    """Sum over each sequence's positions, whose tokens SP ranks share: fwd all-reduce, bwd all-reduce (every
    rank's loss reaches every rank's tokens); None (a plain sum) without SP."""
    if ps.sp_size == 1:
        return None
    return lambda x: reduce_from_group(copy_to_group(x.sum(-1), ps.sp_group), ps.sp_group)


def global_sum(values: list[float], ps) -> list[float]:
    """Sum floats over DP ranks (every MP/SP peer holds the same rollouts)."""
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=ps.device), ps.dp_group).tolist()
