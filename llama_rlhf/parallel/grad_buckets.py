"""Flat fp32 gradient buckets over the data-parallel group (DP x SP): the distributed optimizer's communication.

Every trainable parameter's gradient lives in a contiguous fp32 bucket; ``param.main_grad`` is its view. An
fp32 parameter accumulates straight into it (``param.grad`` is the same view and autograd adds in place); a
16-bit parameter adds its gradient into it from a post-accumulate hook and drops its own copy.

On the last micro-batch of a step a bucket is launched, asynchronously, as soon as all of its parameters have
their gradient, while backward goes on through earlier layers. Buckets are launched strictly in order, so every
rank issues the same collectives in the same sequence whatever order its hooks fire in. What overlaps: the
reduction of the later layers' buckets with backward through the earlier ones (buckets are filled in reverse
order of the parameters, which is the order backward reaches them). What does not: the last bucket (the first
layers and the embeddings, reached last), the sums of MP-partial gradients, and the all-gather of updated
parameters after the optimizer step.

Stage 0: a bucket is all-reduced (sum) over DP x SP; every rank then updates all of it.
Stage 1 (ZeRO-1): a bucket, padded to a multiple of N = DP x SP elements, is reduce-scattered in place: rank k of
the group ends with the group's sum of elements [k n/N, (k+1) n/N) in that range of its own buffer. The
parameters are views of one flat buffer per bucket, and after the update each rank's range is all-gathered
back into it (in place).

Gradients that are partial over MP (replicated KV slices, per-head norms, whole LoRA factors: see
``training/grad_sync.py::mp_partial_group_size``) sit in buckets of their own, summed over their MP subgroup
after the DP reduction (stage 1: only the owned range).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import group_rank, group_size


def reduce_scatter_in_place(flat: torch.Tensor, group, async_op: bool = False):
    """Sum ``flat`` [n] over the group, leaving rank k's range [k n/N, (k+1) n/N) of ``flat`` summed (the rest
    of ``flat`` is left undefined). n must be a multiple of N. Returns a work handle when ``async_op``."""
    size = group_size(group)
    if size == 1:
        return None
    own = flat.narrow(0, group_rank(group) * (flat.numel() // size), flat.numel() // size)
    if hasattr(dist, "reduce_scatter_single"):  # torch >= 2.13 spells it this way
        return dist.reduce_scatter_single(own, flat, group=group, async_op=async_op)
    return dist.reduce_scatter_tensor(own, flat, group=group, async_op=async_op)


def all_gather_in_place(flat: torch.Tensor, group, async_op: bool = False):
    """Fill all of ``flat`` [n] with every rank's own range [k n/N, (k+1) n/N) (each rank's input is its own
    range of the same buffer). Returns a work handle when ``async_op``."""
    size = group_size(group)
    if size == 1:
        return None
    own = flat.narrow(0, group_rank(group) * (flat.numel() // size), flat.numel() // size)
    if hasattr(dist, "all_gather_single"):
        return dist.all_gather_single(flat, own, group=group, async_op=async_op)
    return dist.all_gather_into_tensor(flat, own, group=group, async_op=async_op)


@dataclass
class Bucket:
    """Parameters whose gradients are reduced by one collective."""

    params: list  # nn.Parameter, in bucket order
    offsets: list  # element offset of each parameter in the flat buffers
    elements: int  # length of the flat buffers, padded to a multiple of the group size at stage 1
    partial_group: object = None  # MP subgroup over which these gradients are partial (None: not partial)
    grad: torch.Tensor | None = None  # fp32 [elements] (stage 1: allocated when the bucket is flattened)
    data: torch.Tensor | None = None  # stage 1: the flat parameter buffer the parameters are views of
    ready: int = 0
    launched: bool = False
    handle: object = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return self.elements

    def own_range(self, rank: int, size: int) -> tuple[int, int]:
        share = self.numel // size
        return rank * share, (rank + 1) * share


class GradBuckets:
    """The buckets of one model's trainable parameters, their backward hooks, and their collectives.

    ``params`` should be given in the order backward produces gradients (the reverse of the forward order).
    ``param_dtype`` (stage 1 only) is the dtype the parameters are held in from now on.
    """

    def __init__(self, params: list[nn.Parameter], ps, stage: int, partial_size, bucket_elems: int,
                 param_dtype: torch.dtype | None = None):
        if stage not in (0, 1):
            raise ValueError(f"zero stage must be 0 or 1, got {stage}")
        self.ps, self.stage, self.param_dtype = ps, stage, param_dtype
        self.group = ps.dpsp_group
        self.size, self.rank = group_size(self.group), group_rank(self.group)
        self.last_micro_batch = False
        self.grad_dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32  # fp64: tests
        self.buckets: list[Bucket] = []
        self._next_launch = 0
        self.launched_during_backward = 0  # buckets of the last step whose reduction overlapped backward
        self._bucket_of: dict[int, Bucket] = {}
        by_partial: dict[int, list] = {}
        for p in params:
            by_partial.setdefault(partial_size(p), []).append(p)
        for size in sorted(by_partial):  # every rank builds the same buckets in the same order
            group = ps.mp_subgroup(size) if size > 1 else None
            chunk, elems = [], 0
            for p in by_partial[size]:
                chunk.append(p)
                elems += p.numel()
                if elems >= bucket_elems:
                    self._add_bucket(chunk, group)
                    chunk, elems = [], 0
            if chunk:
                self._add_bucket(chunk, group)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    # -- construction -----------------------------------------------------------------------------------
    def _add_bucket(self, params: list, partial_group) -> None:
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += p.numel()
        multiple = self.size if self.stage == 1 else 1
        bucket = Bucket(params, offsets, -(-n // multiple) * multiple, partial_group)
        if self.stage == 0:
            self._allocate_grad(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket
        self.buckets.append(bucket)

    def _allocate_grad(self, bucket: Bucket) -> None:
        bucket.grad = torch.zeros(bucket.elements, dtype=self.grad_dtype, device=bucket.params[0].device)
        for p, off in zip(bucket.params, bucket.offsets):
            p.main_grad = bucket.grad.narrow(0, off, p.numel()).view_as(p)

    def flatten_parameters(self, before_flatten=None) -> None:
        """Stage 1: make every parameter a view of its bucket's flat buffer (cast to its dtype).

        Bucket by bucket: its gradient and parameter buffers are allocated, ``before_flatten(bucket)`` runs while
        the parameters still hold their original (fp32) values (the optimizer copies its fp32 master range from
        them there), then the parameters move into the buffer and their original storage is freed. So building
        the optimizer never holds the loaded fp32 parameters and all the new buffers at once (for bf16 parameters
        at most 2 + 4 + 4/N bytes per parameter, against 4 + 4 + 2 if every buffer came first).
        """
        for bucket in self.buckets:
            self._allocate_grad(bucket)
            bucket.data = torch.zeros(bucket.elements, dtype=self.param_dtype or bucket.params[0].dtype,
                                      device=bucket.params[0].device)
            if before_flatten is not None:
                before_flatten(bucket)
            for p, off in zip(bucket.params, bucket.offsets):
                view = bucket.data.narrow(0, off, p.numel()).view_as(p)
                view.copy_(p.detach())
                p.data = view
        self.attach_grads()

    def attach_grads(self) -> None:
        """fp32 parameters accumulate into their bucket directly (``param.grad`` is the bucket view)."""
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = p.main_grad if p.dtype == self.grad_dtype else None

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- backward ---------------------------------------------------------------------------------------
    def start_micro_batch(self, last: bool) -> None:
        """Call before each backward of a step; ``last`` on the step's final one enables the overlapped launch."""
        self.last_micro_batch = last

    def _on_grad(self, p: nn.Parameter) -> None:
        grad = p.grad
        if grad is not None and grad.data_ptr() != p.main_grad.data_ptr():  # 16-bit (or detached): fold it in
            p.main_grad.add_(grad)
            p.grad = p.main_grad if p.dtype == self.grad_dtype else None
        if not self.last_micro_batch:
            return
        bucket = self._bucket_of[id(p)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.ready < len(bucket.params):
                return
            self._launch(bucket)
            self._next_launch += 1
            self.launched_during_backward += 1

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        if self.size == 1:
            return
        if self.stage == 0:
            bucket.handle = dist.all_reduce(bucket.grad, group=self.group, async_op=True)
        else:
            bucket.handle = reduce_scatter_in_place(bucket.grad, self.group, async_op=True)

    @torch.no_grad()
    def finish_reduction(self) -> None:
        """Launch what backward did not (in order), wait for everything, then sum MP-partial gradients."""
        for bucket in self.buckets[self._next_launch:]:
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None  # a finished work object can hold the backend's copy (gloo: the bucket)
            if bucket.partial_group is not None:
                lo, hi = self.reduced_range(bucket)
                dist.all_reduce(bucket.grad.narrow(0, lo, hi - lo), group=bucket.partial_group)

    def reduced_range(self, bucket: Bucket) -> tuple[int, int]:
        """The range of ``bucket`` this rank holds reduced gradients for (stage 0: all of it)."""
        return bucket.own_range(self.rank, self.size) if self.stage == 1 else (0, bucket.numel)

    @torch.no_grad()
    def zero(self) -> None:
        """Clear every bucket for the next step."""
        for bucket in self.buckets:
            bucket.grad.zero_()
            bucket.ready, bucket.launched, bucket.handle = 0, False, None
        self._next_launch = 0
        self.launched_during_backward = 0
        self.last_micro_batch = False
        self.attach_grads()

    @torch.no_grad()
    def gather_parameters(self) -> None:
        """Stage 1, after the update: every rank's range of the flat parameter buffers to every rank."""
        handles = [all_gather_in_place(b.data, self.group, async_op=True) for b in self.buckets]
        for h in handles:
            if h is not None:
                h.wait()
