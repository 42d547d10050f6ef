"""Next-token choice on vocab-parallel logits: greedy, temperature, top-k, top-p; identical on every MP rank.

Randomness is counter-based: the uniform number behind the token a sample draws at step ``t`` is a hash of
(seed, prompt key, sample index, t). A sample's tokens therefore do not depend on the batch it shared, the
continuous-batching schedule, or how prompts were split over data-parallel ranks; DP replicas draw different
numbers because they hold different prompts, and ``--seed`` makes the whole run reproducible.

Only MP rank 0 chooses; it broadcasts (token, log-prob) to its MP peers, so they can never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runtime import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 is greedy (top_k/top_p are then ignored)."""

    temperature: float = 1.0
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens (0: all)
    max_new_tokens: int = 256
    num_samples: int = 1  # samples per prompt (the prompt is prefilled once and its cache shared)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UsageError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"--top_k must be >= 0 (0: off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise UsageError(f"--num_samples_per_prompt must be >= 1, got {self.num_samples}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MUL1, _MUL2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 step on int64 tensors (multiplication wraps modulo 2^64)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MUL1
    x = (x ^ _shift_right(x, 27)) * _MUL2
    return x ^ _shift_right(x, 31)


def uniforms(seed: int, keys: torch.Tensor) -> torch.Tensor:
    """keys [B, K] int64 -> [B] float64 uniform in [0, 1), a fixed function of (seed, row of keys)."""
    h = _mix(torch.full(keys.shape[:1], _signed(seed % (1 << 64)), dtype=torch.int64, device=keys.device))
    for j in range(keys.shape[1]):
        h = _mix(h ^ keys[:, j])
    return _shift_right(h, 11).double() * 2.0 ** -53


TOP_P_CANDIDATES = 1024  # top-p looks for its nucleus among this many most likely tokens before sorting all
BLOCK = 256  # the inverse-CDF draw first finds the block of this many tokens, then the token inside it


def filtered_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [B, V] -> probabilities [B, V] in token-id order, summing to 1 up to rounding. Order as in
    transformers: temperature, then top-k, then top-p on what top-k kept.

    Token-id order (not probability order) keeps the draw stable: a logit perturbation as small as MP's
    reduction-order rounding moves each token's CDF interval by as little, instead of reordering near-equal
    tokens. Probabilities are computed in float64 and returned in the logits' precision (at least fp32).
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / params.temperature
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        vals, ids = torch.topk(x, params.top_k, dim=-1)  # [B, V] -> [B, k], sorted descending
        probs = _top_p(torch.softmax(vals.double(), dim=-1), params.top_p)
    elif params.top_p < 1.0:
        lse = torch.logsumexp(x, dim=-1, keepdim=True).double()  # the whole vocabulary's normaliser
        vals, ids = torch.topk(x, min(TOP_P_CANDIDATES, x.shape[-1]), dim=-1)  # sorted descending
        probs = torch.exp(vals.double() - lse)
        wide = (probs.sum(-1) < params.top_p).nonzero().squeeze(-1)  # rows whose nucleus has more tokens
        probs = _top_p(probs, params.top_p)
        if len(wide) and ids.shape[-1] < x.shape[-1]:
            dense = _scatter(probs, ids, x)
            vals, order = torch.sort(x[wide], dim=-1, descending=True)  # only those rows sort everything
            dense[wide] = _scatter(_top_p(torch.exp(vals.double() - lse[wide]), params.top_p), order, x[wide])
            return dense
    else:
        return torch.softmax(x, dim=-1)
    return _scatter(probs, ids, x)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of probabilities sorted descending [B, K]: keep the smallest prefix whose mass reaches top_p."""
    if top_p >= 1.0:
        return probs
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
    return probs.masked_fill(before >= top_p, 0.0)  # the most likely token always stays


def _scatter(probs: torch.Tensor, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, K] float64 weights of tokens ``ids`` -> normalised probabilities [B, V] in token-id order (zero
    elsewhere), in the dtype of ``like`` [B, V]."""
    probs = (probs / probs.sum(-1, keepdim=True)).to(like.dtype)
    return torch.zeros_like(like).scatter_add_(-1, ids, probs)


def _last_positive(p: torch.Tensor) -> torch.Tensor:
    """Index of the last entry > 0 in each row of p [B, K]."""
    return p.shape[-1] - 1 - (p > 0).flip(-1).to(torch.int8).argmax(-1)


def _search(cdf: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """First column whose cdf exceeds target [B] (never a zero-weight column, whatever the rounding)."""
    col = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    return torch.minimum(col, _last_positive(weights))


def sample(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw: probs [B, V] (token-id order), u [B] in [0, 1) -> (tokens [B], their log-probs [B]).

    Two levels, cumulated in float64: the block of BLOCK tokens holding the quantile, then the token in it.
    """
    b, k = probs.shape
    rows = torch.arange(b, device=probs.device)
    if k <= 4 * BLOCK:
        weights = probs.double()
        cdf = torch.cumsum(weights, dim=-1)
        total = cdf[:, -1]
        token = _search(cdf, u * total, weights)
    else:
        padded = torch.nn.functional.pad(probs, (0, -k % BLOCK)) if k % BLOCK else probs
        blocks = padded.view(b, -1, BLOCK)  # [B, V / BLOCK, BLOCK]
        block_mass = blocks.sum(-1).double()  # a sum of BLOCK terms: fine in the probabilities' own precision
        block_cdf = torch.cumsum(block_mass, dim=-1)
        total = block_cdf[:, -1]
        target = u * total
        blk = _search(block_cdf, target, block_mass)
        inner = blocks[rows, blk].double()  # [B, BLOCK]
        before = block_cdf[rows, blk] - block_mass[rows, blk]
        token = blk * BLOCK + _search(torch.cumsum(inner, dim=-1), target - before, inner)
    return token, probs[rows, token].double().log() - total.log()


def _gather_to_src(x: torch.Tensor, ps) -> list[torch.Tensor] | None:
    """Every MP rank's ``x`` (same shape), in MP-rank order, on MP rank 0; None elsewhere."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ps.mp_size)] if ps.mp_rank == 0 else None
    dist.gather(x, parts, dst=ps.mp_src, group=ps.mp_group)
    return parts


def _greedy_local(logits: torch.Tensor, ps, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Argmax over the vocab-parallel logits with only [B, 3] numbers per rank sent to MP rank 0.

    Returns (token [B], log-prob under softmax(logits) [B]) on MP rank 0, None elsewhere. Ties go to the
    lowest token id, as torch.argmax does on the full row.
    """
    best, arg = logits.max(dim=-1)  # first occurrence
    lse = torch.logsumexp(logits, dim=-1)  # fp32: one pass over B x V, exact enough for log-probs
    stats = torch.stack([best.double(), (arg + vocab_start).double(), lse.double()], dim=-1)  # [B, 3]
    if ps.mp_size == 1:
        return arg, stats[:, 0] - stats[:, 2]
    parts = _gather_to_src(stats, ps)
    if parts is None:
        return None
    stats = torch.stack(parts)  # [MP, B, 3]
    owner = stats[:, :, 0].argmax(0)  # lowest rank (= lowest ids) among equal maxima
    chosen = stats.gather(0, owner.view(1, -1, 1).expand(1, -1, 3)).squeeze(0)  # [B, 3]
    return chosen[:, 1].long(), chosen[:, 0] - torch.logsumexp(stats[:, :, 2], dim=0)


def next_tokens(logits: torch.Tensor, params: SamplingParams, ps, vocab_start: int, seed: int = 0,
                keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's vocab slice of the last-position logits [B, V_padded / MP] -> (tokens [B] long,
    log-probs [B] float64), identical on every MP rank.

    Sampling gathers the full rows on MP rank 0 (B x V numbers); greedy sends only each rank's best.
    ``keys`` [B, K] int64 name each row's random draw (e.g. prompt key, sample index, step).
    Log-probs are under the distribution sampled from (after temperature, top-k, top-p); for greedy, under
    softmax(logits).
    """
    logits = logits.float()
    if params.greedy:
        chosen = _greedy_local(logits, ps, vocab_start)
    else:
        if keys is None:
            raise ValueError("sampling needs keys naming each row's random draw")
        full = logits
        if ps.mp_size > 1:
            parts = _gather_to_src(logits, ps)
            full = torch.cat(parts, dim=-1) if parts is not None else None  # [B, V_padded]
        chosen = None
        if full is not None:
            chosen = sample(filtered_distribution(full, params), uniforms(seed, keys.to(full.device)))
    if ps.mp_size == 1:
        return chosen[0], chosen[1]
    packed = torch.empty(logits.shape[0], 2, dtype=torch.float64, device=logits.device)
    if chosen is not None:
        packed[:, 0], packed[:, 1] = chosen[0].double(), chosen[1]
    dist.broadcast(packed, src=ps.mp_src, group=ps.mp_group)  # token ids < 2^53 are exact in float64
    return packed[:, 0].long(), packed[:, 1]
