"""The GRPO update's batches: rollouts laid out as model rows, with their per-token fields (labels, old and reference
log-probs, advantages, sampler log-probs).

Two layouts:
* completion layout (no sequence parallelism, ``completion_batch``): the fields are [R, C], rollout r's i-th
  completion token at [r, i]. With ``share_prompts`` each model row holds one prompt followed by the completions of
  all of its rollouts in the micro-batch, which attend to the prompt and to themselves only (``branches``,
  ``models/attention.shared_prefix_mask``): a prompt's forward and backward run once per group instead of once per
  sample, and the gradient is the same sum (the prompt's activations are identical for every sample, and the
  gradients reaching them from each completion add up in backward). ``index`` [R, C] names the flattened row position
  whose hidden state predicts each token: the prompt's last position for every completion's first token.
* position layout (sequence parallelism, ``rollout_batch``): one rollout per row and every field at the position
  that predicts its token, so the zigzag split of the rows splits the fields with them.
"""
from __future__ import annotations

import math

import torch

from ..parallel.cross_entropy import IGNORE_INDEX

SHARED_ROW_TOKENS = 4096  # a longer shared row falls back to one row per rollout (its dense mask grows as S^2)


def _rows(rollouts, share_prompts: bool) -> list[list[int]]:
    """Rollout indices per model row: each prompt's rollouts together (first-appearance order), or one each."""
    if not share_prompts:
        return [[i] for i in range(len(rollouts))]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rollouts):  # the same prompt tokens (a prompt's samples)
        groups.setdefault(tuple(r.prompt.ids), []).append(i)
    rows = list(groups.values())
    longest = max(len(rollouts[g[0]].prompt.ids) + sum(len(rollouts[i].completion_ids) for i in g) for g in rows)
    if longest > SHARED_ROW_TOKENS or len(rows) == len(rollouts):
        return [[i] for i in range(len(rollouts))]
    return rows


def completion_batch(rollouts, pad_id: int, fields=("old", "ref", "adv"), share_prompts: bool = True) -> dict:
    """Model inputs [B, S] (``input_ids``, ``position_ids``, and ``branches`` when prompts are shared), ``index`` and
    ``labels`` [R, C], and each of ``fields`` [R, C] (zeros where absent), for the rollouts of one micro-batch."""
    rows = _rows(rollouts, share_prompts)
    shared = len(rows) < len(rollouts)
    width = max(len(rollouts[g[0]].prompt.ids) + sum(len(rollouts[i].completion_ids) for i in g) for g in rows)
    c_max = max(1, max(len(r.completion_ids) for r in rollouts))
    b, n = len(rows), len(rollouts)
    batch = {"input_ids": torch.full((b, width), pad_id, dtype=torch.long),
             "position_ids": torch.zeros((b, width), dtype=torch.long),
             "index": torch.zeros((n, c_max), dtype=torch.long),
             "labels": torch.full((n, c_max), IGNORE_INDEX, dtype=torch.long)}
    if shared:
        batch["branches"] = torch.full((b, width), -1, dtype=torch.long)
    for name in fields:
        batch[name] = torch.zeros(n, c_max)
    for row, members in enumerate(rows):
        prompt = rollouts[members[0]].prompt.ids
        p = len(prompt)
        batch["input_ids"][row, :p] = torch.tensor(prompt)
        batch["position_ids"][row, :p] = torch.arange(p)
        if shared:
            batch["branches"][row, :p] = 0
        at = p  # the next free slot of the row
        for branch, i in enumerate(members, start=1):
            r, c = rollouts[i], len(rollouts[i].completion_ids)
            if not c:
                continue
            slots = torch.arange(at, at + c)
            batch["input_ids"][row, at:at + c] = torch.tensor(r.completion_ids)
            batch["position_ids"][row, at:at + c] = torch.arange(p, p + c)
            if shared:
                batch["branches"][row, at:at + c] = branch
            predictors = torch.cat([torch.tensor([p - 1]), slots[:-1]])  # token 0 <- the prompt's last position
            batch["index"][i, :c] = row * width + predictors
            batch["labels"][i, :c] = torch.tensor(r.completion_ids)
            _fill_fields(batch, fields, i, slice(0, c), r)
            at += c
    return batch


def rollout_batch(rollouts, pad_id: int, multiple: int, fields=("old", "ref", "adv")) -> dict:
    """[B, S] tensors for the update, right-padded to a multiple of ``multiple``. Position t of every field
    describes the token at t + 1 (labels are shifted): only completion tokens have labels."""
    length = max(len(r.prompt.ids) + len(r.completion_ids) for r in rollouts)
    length = int(math.ceil(length / multiple) * multiple)
    b = len(rollouts)
    batch = {"input_ids": torch.full((b, length), pad_id, dtype=torch.long),
             "labels": torch.full((b, length), IGNORE_INDEX, dtype=torch.long),
             "position_ids": torch.arange(length).repeat(b, 1)}
    for name in fields:
        batch[name] = torch.zeros(b, length)
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt.ids), len(r.completion_ids)
        batch["input_ids"][i, :p + c] = torch.tensor(r.prompt.ids + r.completion_ids)
        if c:
            span = slice(p - 1, p + c - 1)  # positions that predict the completion tokens
            batch["labels"][i, span] = torch.tensor(r.completion_ids)
            _fill_fields(batch, fields, i, span, r)
    return batch


def _fill_fields(batch: dict, fields, i: int, span: slice, r) -> None:
    """Row ``i``, columns ``span`` of each field from rollout ``r``."""
    if "old" in fields and r.old_logprobs is not None:
        batch["old"][i, span] = r.old_logprobs
    if "ref" in fields and r.ref_logprobs is not None:
        batch["ref"][i, span] = r.ref_logprobs
    if "adv" in fields:
        batch["adv"][i, span] = r.advantage
    if "sampler" in fields and len(r.sampler_logprobs) == len(r.completion_ids):
        batch["sampler"][i, span] = torch.tensor(r.sampler_logprobs, dtype=torch.float32)


def completion_values(values: torch.Tensor, rollouts, batch: dict, ps) -> list[torch.Tensor]:
    """Per-rollout completion values [len] from a batch's per-token values: [R, C] (completion layout) or
    [B, S_local] (position layout, gathered over SP)."""
    if "index" in batch:
        return [values[i, :len(r.completion_ids)].detach().float().cpu() for i, r in enumerate(rollouts)]
    if ps.sp_size > 1:
        from ..parallel.sequence_split import gather_zigzag
        values = gather_zigzag(values, ps.sp_group)
    out = []
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt.ids), len(r.completion_ids)
        out.append(values[i, p - 1:p + c - 1].detach().float().cpu())
    return out


def update_batch(rollouts, pad_id: int, ps, fields=("old", "ref", "adv"), share_prompts: bool = True) -> dict:
    """The layout this rank's parallelism takes: completion layout without SP, position layout with it."""
    if ps.sp_size > 1:
        return rollout_batch(rollouts, pad_id, 2 * ps.sp_size, fields)
    return completion_batch(rollouts, pad_id, fields, share_prompts)
