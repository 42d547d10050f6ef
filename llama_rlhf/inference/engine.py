"""Batched generation: a preallocated KV cache, one prefill per admitted group of prompts, one-token decode steps,
and continuous batching (a finished row is refilled with a waiting prompt at once).

The cache is one shared timeline of slots per row. Prompts are left-padded so that every active row writes its
next token into the same slot ``t``; a row's tokens fill the contiguous slots [row start, t), slots outside that
are masked by ``valid``. Position ids start at 0 at each prompt's first real token, so padding never shifts RoPE,
and slot distances equal position distances (sliding windows stay correct). Active rows are always rows 0..n-1:
a finished row is refilled in place or the last active row moves into it, so decode runs on a contiguous view.
Decode attends only from the oldest live row's first slot on; when the timeline reaches the cache's capacity,
the live slots are moved back to slot 0 (and moved right when a longer prompt arrives than fits before t).

Every MP rank runs the same schedule: tokens come from MP rank 0 (``sampling.next_tokens``).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..parallel.cpu_allocator import keep_freed_memory
from ..runtime import autocast
from .packed import packed_weights
from .prefix import PrefixedWindow, shared_prefix_length
from .sampling import SamplingParams, next_tokens
from .static_step import StaticDecodeStep


PREFILL_TOKENS = 16384  # padded prompt tokens per prefill forward (bounds its activation memory)


@dataclass
class Completion:
    """One sample: generated token ids (the end token included when it stopped), their log-probs under the
    sampling distribution, and why it ended: "stop" (an end token) or "length" (max_new_tokens/max_seq_len)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


class KVCache:
    """Keys and values of every layer for ``rows`` sequences: [rows, Hkv_local, capacity, head_dim] each.

    ``valid`` [rows, capacity] marks the slots holding a real token of the row's sequence.
    """

    def __init__(self, num_layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (rows, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity

    def window(self, rows: int, offset: int, start: int) -> "CacheWindow":
        """What one forward sees: rows [0, rows), slots from ``offset``; its tokens go to offset + start + i."""
        return CacheWindow(self, rows, offset, start)

    def move_slots(self, rows: int, lo: int, hi: int, to: int) -> None:
        """Move slots [lo, hi) of rows [0, rows) to [to, to + hi - lo) in every layer (ranges may overlap)."""
        for buf in self.k + self.v + [self.valid.unsqueeze(1).unsqueeze(-1)]:
            buf[:rows, :, to:to + hi - lo] = buf[:rows, :, lo:hi].clone()

    def copy_rows(self, dst: slice | torch.Tensor, src: torch.Tensor, lo: int, hi: int, other: "KVCache" = None,
                  other_lo: int | None = None) -> None:
        """Rows ``dst``, slots [lo, hi) <- rows ``src`` of ``other`` (default: this cache), slots from ``other_lo``
        (default: ``lo``)."""
        other = other or self
        other_lo = lo if other_lo is None else other_lo
        n = hi - lo
        for mine, theirs in zip(self.k + self.v, other.k + other.v):
            mine[dst, :, lo:hi] = theirs[src, :, other_lo:other_lo + n]
        self.valid[dst, lo:hi] = other.valid[src, other_lo:other_lo + n]


class CacheWindow:
    """The model's view of the cache for one forward: ``.start`` and ``.update(layer, k, v)``."""

    def __init__(self, cache: KVCache, rows: int, offset: int, start: int):
        self.cache, self.rows, self.offset, self.start = cache, rows, offset, start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, S, Hkv, D] at this forward's slots; return all keys/values so far [B, Sk, Hkv, D] (views)."""
        lo = self.offset + self.start
        hi = lo + k.shape[1]
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys[:self.rows, :, lo:hi] = k.transpose(1, 2)
        values[:self.rows, :, lo:hi] = v.transpose(1, 2)
        return (keys[:self.rows, :, self.offset:hi].transpose(1, 2),
                values[:self.rows, :, self.offset:hi].transpose(1, 2))


@dataclass
class _Row:
    """One sample in flight."""

    prompt: int  # index into the prompt list
    sample: int  # sample index within its prompt
    prompt_len: int
    start: int  # first slot of its sequence on the timeline
    out: Completion = field(default_factory=Completion)


def _kv_layout(model) -> tuple[int, int]:
    attn = model.model.layers[0].self_attn
    return attn.n_kv_heads, attn.head_dim


def _left_padded(seqs: list[list[int]], width: int, first_position: int = 0):
    """Token lists -> ids, position ids (from ``first_position`` at each first real token) and validity, each
    [len(seqs), width], every sequence right-aligned."""
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    positions = torch.zeros((len(seqs), width), dtype=torch.long)
    valid = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, seq in enumerate(seqs):
        n = len(seq)
        ids[i, width - n:] = torch.tensor(seq)
        positions[i, width - n:] = torch.arange(first_position, first_position + n)
        valid[i, width - n:] = True
    return ids, positions, valid


class Generator:
    """Runs one ``generate`` call: holds the cache, the active rows and the queue of waiting samples."""

    def __init__(self, model, prompts, params: SamplingParams, end_ids, ps, max_batch_size: int,
                 max_seq_len: int | None, seed: int, prompt_keys, compute_dtype, progress, progress_every,
                 cache_slack: int | None = None, prefill_tokens: int = PREFILL_TOKENS,
                 pack_weights: bool = True, static_decode: bool = False, share_prefixes: bool = True):
        self.model, self.prompts, self.params, self.ps = model, prompts, params, ps
        self.end_ids = frozenset(int(i) for i in end_ids)
        self.seed = seed
        self.keys = list(range(len(prompts))) if prompt_keys is None else [int(k) for k in prompt_keys]
        if len(self.keys) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(self.keys)} prompt keys")
        self.max_seq_len = max_seq_len or model.cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens, leaving no room below max_seq_len "
                                 f"{self.max_seq_len}; truncate it first")
        weight_dtype = next(model.parameters()).dtype
        self.dtype = compute_dtype or weight_dtype
        self.autocast_dtype = self.dtype if self.dtype != weight_dtype else torch.float32
        self.rows = max(1, max_batch_size)
        longest = max((len(p) for p in prompts), default=1)
        self.max_row_len = min(self.max_seq_len, longest + params.max_new_tokens)
        # slots beyond the longest row: the timeline is compacted once every ~slack decode steps at most
        self.capacity = self.max_row_len + (max(32, self.max_row_len // 4) if cache_slack is None else cache_slack)
        if self.capacity <= self.max_row_len:
            raise ValueError("cache_slack must be >= 1")
        self.prefill_tokens = prefill_tokens
        self.packed = pack_weights
        self.share_prefixes = share_prefixes
        self.windows = {model.cfg.layer_window(i) for i in range(model.cfg.num_layers)}
        kv_heads, head_dim = _kv_layout(model)
        self.cache = KVCache(model.cfg.num_layers, self.rows, kv_heads, head_dim, self.capacity, self.dtype,
                             ps.device)
        # fixed-shape decode over the whole cache: a CUDA graph on GPU, eager elsewhere (inference/static_step.py)
        self.static_step = StaticDecodeStep(model, self.cache, ps.device, cuda_graph=True) if static_decode else None
        self.t = 0  # next free slot on the timeline
        self.active: list[_Row] = []
        self.waiting = deque((i, s) for i in range(len(prompts)) for s in range(params.num_samples))
        self.results = [[None] * params.num_samples for _ in prompts]
        self.prompts_left = [params.num_samples] * len(prompts)
        self.progress, self.progress_every = progress, progress_every
        self.done_prompts, self.new_tokens, self.t0, self.last_report = 0, 0, time.time(), time.time()
        self.stats = {"prefills": 0, "shared_prefix_tokens": 0, "decode_steps": 0, "shifts_left": 0,
                      "shifts_right": 0, "row_moves": 0}

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self) -> list[list[Completion]]:
        keep_freed_memory(self.ps.device)  # CPU: each step's logits and packed copies reuse freed heap, no page faults
        # one autocast region for the whole run: it keeps its low-precision copy of each weight across steps
        with autocast(self.autocast_dtype, self.ps.device), packed_weights(self.model, self.dtype, self.rows,
                                                                           self.packed):
            while self.waiting or self.active:
                if self.waiting and len(self.active) < self.rows:
                    self.admit()
                if self.active:
                    self.decode_step()
                self.report()
        self.report(final=True)
        return self.results

    def forward_last_logits(self, ids, positions, key_valid, window) -> torch.Tensor:
        """Logits of the last position only: [B, S] -> this rank's vocab slice [B, V_padded / MP]."""
        hidden = self.model(ids, position_ids=positions, key_valid=key_valid, kv_cache=window,
                            hidden_only=True)  # [B, S, h]
        return self.model.logits(hidden[:, -1])  # [B, h] -> [B, V_padded / MP]

    def admit(self) -> None:
        """Move waiting samples into free rows: prefill each distinct prompt once (in chunks of at most
        ``prefill_tokens`` padded tokens), copy its cache to its samples' rows, and choose their first tokens."""
        units = [self.waiting.popleft() for _ in range(min(self.rows - len(self.active), len(self.waiting)))]
        chunk: list[int] = []
        for p in dict.fromkeys(p for p, _ in units):  # distinct prompts, in order
            width = max(len(self.prompts[q]) for q in chunk + [p])
            if chunk and width * (len(chunk) + 1) > self.prefill_tokens:
                self.prefill([u for u in units if u[0] in chunk], chunk)
                chunk = []
            chunk.append(p)
        self.prefill([u for u in units if u[0] in chunk], chunk)

    def prefill(self, units: list[tuple[int, int]], prompt_ids: list[int]) -> None:
        lengths = [len(self.prompts[p]) for p in prompt_ids]
        width, device = max(lengths), self.ps.device
        shared = (shared_prefix_length([self.prompts[p] for p in prompt_ids], self.windows)
                  if self.share_prefixes else 0)
        logits, scratch = (self.prefill_shared(prompt_ids, shared) if shared
                           else self.prefill_whole(prompt_ids))  # [P, V_padded / MP], a cache [P, ..., width, ...]
        self.stats["prefills"] += 1
        if self.t < width:  # make room on the left of the timeline for the longest prompt
            self.relayout(width - self.t)
        n, which = len(self.active), torch.tensor([prompt_ids.index(p) for p, _ in units], device=device)
        self.cache.copy_rows(slice(n, n + len(units)), which, self.t - width, self.t, scratch, 0)
        self.cache.valid[n:n + len(units), :self.t - width] = False
        self.cache.valid[n:n + len(units), self.t:] = False
        for p, s in units:
            self.active.append(_Row(p, s, len(self.prompts[p]), self.t - len(self.prompts[p])))
        self.choose(logits[which], self.active[n:])

    def prefill_whole(self, prompt_ids: list[int]) -> tuple[torch.Tensor, KVCache]:
        """Every prompt whole, left-padded -> last logits and their cache (each prompt in its last slots)."""
        prompts = [self.prompts[p] for p in prompt_ids]
        width, device = max(len(p) for p in prompts), self.ps.device
        scratch = KVCache(self.model.cfg.num_layers, len(prompts), *_kv_layout(self.model), width, self.dtype, device)
        ids, positions, valid = _left_padded(prompts, width)
        scratch.valid.copy_(valid)
        key_valid = None if min(len(p) for p in prompts) == width else scratch.valid  # no padding: plain causal
        logits = self.forward_last_logits(ids.to(device), positions.to(device), key_valid,
                                          scratch.window(len(prompts), 0, 0))
        return logits, scratch

    def prefill_shared(self, prompt_ids: list[int], shared: int) -> tuple[torch.Tensor, KVCache]:
        """The prompts' first ``shared`` tokens (the same in each) once as one row, then every prompt's rest over
        their keys and values (``inference/prefix.py``) -> last logits and the cache the plain prefill leaves."""
        device, rows = self.ps.device, len(prompt_ids)
        prefix_cache = KVCache(self.model.cfg.num_layers, 1, *_kv_layout(self.model), shared, self.dtype, device)
        prefix = torch.tensor(self.prompts[prompt_ids[0]][:shared], device=device).view(1, shared)
        self.model(prefix, position_ids=torch.arange(shared, device=device).view(1, shared),
                   kv_cache=prefix_cache.window(1, 0, 0), hidden_only=True)  # fills prefix_cache
        rests = [self.prompts[p][shared:] for p in prompt_ids]
        ids, positions, valid = _left_padded(rests, max(len(r) for r in rests), first_position=shared)
        key_valid = torch.cat([torch.ones(rows, shared, dtype=torch.bool), valid], dim=1).to(device)  # [P, L + S]
        window = PrefixedWindow(prefix_cache, rows)
        logits = self.forward_last_logits(ids.to(device), positions.to(device), key_valid, window)
        scratch = KVCache(0, rows, *_kv_layout(self.model), shared + ids.shape[1], self.dtype, device)
        window.right_aligned(scratch, [shared + len(r) for r in rests])  # fills every layer
        self.stats["shared_prefix_tokens"] += shared * (rows - 1)
        return logits, scratch

    def decode_step(self) -> None:
        """Feed every active row's last token at slot t; choose the next one."""
        if self.t == self.capacity:
            self.relayout(-min(r.start for r in self.active))
        rows, offset = len(self.active), min(r.start for r in self.active)
        device = self.ps.device
        # last token and its position of every row in one host-to-device copy per step
        step = torch.tensor([[r.out.token_ids[-1], r.prompt_len + len(r.out.token_ids) - 1] for r in self.active])
        if self.static_step is not None:
            logits = self.static_step(step, self.t)
        else:
            step = step.to(device, non_blocking=True) if device.type == "cuda" else step
            ids, positions = step[:, :1], step[:, 1:]  # [B, 1] each
            self.cache.valid[:rows, self.t] = True
            logits = self.forward_last_logits(ids, positions, self.cache.valid[:rows, offset:],
                                              self.cache.window(rows, offset, self.t - offset))
        self.t += 1
        self.stats["decode_steps"] += 1
        self.choose(logits, self.active)

    def choose(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Pick one token for each of ``rows`` (same order as the logits), then retire finished rows."""
        keys = torch.tensor([[self.keys[r.prompt], r.sample, len(r.out.token_ids)] for r in rows])
        tokens, logprobs = next_tokens(logits, self.params, self.ps, self.model.vocab_start, self.seed, keys)
        for r, tok, lp in zip(rows, tokens.tolist(), logprobs.tolist()):
            r.out.token_ids.append(tok)
            r.out.logprobs.append(lp)
            if tok in self.end_ids:
                r.out.finish_reason = "stop"
            elif (len(r.out.token_ids) >= self.params.max_new_tokens
                  or r.prompt_len + len(r.out.token_ids) >= self.max_seq_len):
                r.out.finish_reason = "length"
        self.new_tokens += len(rows)
        self.retire()

    def retire(self) -> None:
        """Store finished samples; keep active rows contiguous by moving the last active row into each hole."""
        for i in reversed(range(len(self.active))):
            row = self.active[i]
            if row.out.finish_reason is None:
                continue
            self.results[row.prompt][row.sample] = row.out
            self.prompts_left[row.prompt] -= 1
            self.done_prompts += self.prompts_left[row.prompt] == 0
            last = len(self.active) - 1
            if i != last:
                lo = min(r.start for r in self.active)
                self.cache.copy_rows(slice(i, i + 1), torch.tensor([last], device=self.ps.device), lo, self.t)
                self.cache.valid[i, :lo] = False
                self.active[i] = self.active[last]
                self.stats["row_moves"] += 1
            self.active.pop()

    def relayout(self, shift: int) -> None:
        """Move every active row's slots by ``shift`` (negative: compact to the left when the timeline is full;
        positive: make room on the left for a longer prompt)."""
        if self.active:
            lo = min(r.start for r in self.active)
            self.cache.move_slots(len(self.active), lo, self.t, lo + shift)
            rows = len(self.active)
            if shift > 0:
                self.cache.valid[:rows, lo:lo + shift] = False
            else:
                self.cache.valid[:rows, self.t + shift:self.t] = False
            for r in self.active:
                r.start += shift
            self.stats["shifts_left" if shift < 0 else "shifts_right"] += 1
        self.t += shift

    def report(self, final: bool = False) -> None:
        now = time.time()
        if self.progress is not None and (final or now - self.last_report >= self.progress_every):
            self.last_report = now
            self.progress(self.done_prompts, len(self.prompts), self.new_tokens, now - self.t0)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], params: SamplingParams, end_ids, ps, max_batch_size: int = 16,
             max_seq_len: int | None = None, seed: int = 0, prompt_keys: list[int] | None = None,
             compute_dtype: torch.dtype | None = None, progress=None,
             progress_every: float = 10.0, pack_weights: bool = True,
             static_decode: bool = False, share_prefixes: bool = True) -> list[list[Completion]]:
    """Generate ``params.num_samples`` completions for each prompt (token ids, no padding).

    Returns, in input order, a list of completions per prompt. ``max_batch_size`` sequences decode together
    (a prompt's samples share one prefill); a sample stops at any of ``end_ids``, after
    ``params.max_new_tokens`` tokens, or when prompt + completion reach ``max_seq_len`` (default: the model's
    max_position_embeddings; every prompt must be shorter). ``prompt_keys`` (default: the prompt indices)
    name each prompt's random stream together with ``seed``: pass global indices when prompts are split over
    data-parallel ranks, and a new seed for each round of GRPO rollouts. ``compute_dtype`` other than the
    weights' runs under autocast; the cache has the compute dtype. ``progress(done_prompts, total_prompts,
    new_tokens, seconds)`` is called every ``progress_every`` seconds and at the end. ``pack_weights``: on CPU,
    run every GEMM on oneDNN-prepacked copies of the weights (``inference/packed.py``; one extra copy of the
    weights in memory during the call); False keeps plain ``F.linear``. ``static_decode``: every decode step runs
    all ``max_batch_size`` rows over the whole cache with fixed shapes (``inference/static_step.py``), captured once
    as a CUDA graph and replayed on GPU (``--cuda_graphs``); on CPU it runs eagerly and is no faster.
    ``share_prefixes``: prompts prefilled together run the tokens they all start with once
    (``inference/prefix.py``); False prefills every prompt whole.
    Every MP rank of the model must call this with the same arguments.
    """
    was_training = model.training
    model.eval()
    try:
        return Generator(model, prompts, params, end_ids, ps, max_batch_size, max_seq_len, seed, prompt_keys,
                         compute_dtype, progress, progress_every, pack_weights=pack_weights,
                         static_decode=static_decode, share_prefixes=share_prefixes).run()
    finally:
        model.train(was_training)
