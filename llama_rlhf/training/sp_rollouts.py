"""GRPO rollouts under sequence parallelism: the SP peers of a DP rank sample disjoint prompts (whole groups) and
all-gather the token ids, so every peer trains on the same rollouts without generating them twice and without
relying on two GPUs' sampling being bitwise equal (one differing token would change the shapes of the ring).

Random streams are keyed by (seed, global prompt id, sample), so which peer samples a prompt changes nothing:
the rollouts equal those of SP = 1.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..inference.engine import Completion, generate

FINISH = ("stop", "length")


def pack_completions(completions: list[list[Completion]], rows: int, group: int, max_new: int,
                     device) -> torch.Tensor:
    """[rows, group, 2 + 2 * max_new] float64: length, finish code, token ids (exact below 2^53), log-probs."""
    out = torch.zeros(rows, group, 2 + 2 * max_new, dtype=torch.float64)
    for i, samples in enumerate(completions):
        for s, c in enumerate(samples):
            n = len(c.token_ids)
            out[i, s, 0], out[i, s, 1] = n, FINISH.index(c.finish_reason)
            out[i, s, 2:2 + n] = torch.tensor(c.token_ids, dtype=torch.float64)
            out[i, s, 2 + max_new:2 + max_new + n] = torch.tensor(c.logprobs, dtype=torch.float64)
    return out.to(device)


def unpack_completions(packed: torch.Tensor, count: int, max_new: int) -> list[list[Completion]]:
    rows = packed[:count].cpu()
    out = []
    for samples in rows:
        out.append([])
        for row in samples:
            n = int(row[0])
            out[-1].append(Completion(row[2:2 + n].long().tolist(), row[2 + max_new:2 + max_new + n].tolist(),
                                      FINISH[int(row[1])]))
    return out


def generate_rollouts(model, prompts: list[list[int]], params, end_ids, ps, *, prompt_keys: list[int],
                      max_batch_size: int = 0, **kwargs) -> list[list[Completion]]:
    """``generate`` for this DP rank's prompts, split over its SP peers (prompt i on SP rank i % SP) and
    all-gathered; returns every prompt's completions, in order, on every peer. ``max_batch_size`` 0: all of
    this rank's samples decode together."""
    sp = ps.sp_size
    mine = list(range(ps.sp_rank, len(prompts), sp))
    local = []
    if mine:
        local = generate(model, [prompts[i] for i in mine], params, end_ids, ps,
                         max_batch_size=max_batch_size or len(mine) * params.num_samples,
                         prompt_keys=[prompt_keys[i] for i in mine], **kwargs)
    if sp == 1:
        return local
    rows = math.ceil(len(prompts) / sp)
    packed = pack_completions(local, rows, params.num_samples, params.max_new_tokens, ps.device)
    parts = [torch.empty_like(packed) for _ in range(sp)]
    dist.all_gather(parts, packed, group=ps.sp_group)
    gathered = [unpack_completions(part, len(range(r, len(prompts), sp)), params.max_new_tokens)
                for r, part in enumerate(parts)]
    return [gathered[i % sp][i // sp] for i in range(len(prompts))]
