"""AdamW over gradient buckets: stage 0 (replicated state) and stage 1 (ZeRO-1, state partitioned over DP x SP).

Stage 0: gradients are all-reduced over DP x SP; every rank holds fp32 parameters (the masters) and both AdamW
moments for all of its MP shard, and updates all of it.
Stage 1: gradients are reduce-scattered; each rank of a DP x SP group owns a contiguous 1/N of every bucket and
holds the fp32 masters and moments of that range only, updates it, and the updated ranges are all-gathered back
into the parameters. With fp32 parameters the owned range of the flat parameter buffer is the master itself;
with 16-bit parameters (``param_dtype`` bf16/fp16) the masters are a separate fp32 copy of the owned range.

Per local parameter, stage 1 holds: parameters (4 or 2 bytes), the fp32 gradient bucket (4), and 8/N (fp32
parameters) or 12/N (16-bit parameters) of optimizer state. The loss is divided by the step's global token count
before backward, so both stages take the same step. Clipping uses one global norm with each element counted once:
DP x SP partitions are disjoint and MP copies of a replicated parameter are weighted by 1/copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..parallel.comm import group_size
from ..parallel.grad_buckets import Bucket, GradBuckets
from .grad_sync import mp_partial_group_size
from .loss_scale import DynamicLossScaler

ZERO_STAGES = (0, 1)


@dataclass
class Piece:
    """The part [lo, hi) of one parameter's flattened local shard that this rank updates."""

    name: str
    param: nn.Parameter
    lo: int
    hi: int
    master: torch.Tensor  # fp32, hi - lo elements (stage 0: the parameter itself)
    grad: torch.Tensor  # fp32 reduced gradient of the same elements


class DistributedAdamW:
    """AdamW (fused kernel) with weight decay on matrices only; see the module docstring for the two stages."""

    def __init__(self, model: nn.Module, ps, *, stage: int, lr: float, weight_decay: float = 0.0,
                 betas=(0.9, 0.999), eps: float = 1e-8, param_dtype: torch.dtype | None = None,
                 bucket_mb: float = 32.0, loss_scaler: DynamicLossScaler | None = None):
        if stage not in ZERO_STAGES:
            raise ValueError(f"--zero_stage must be one of {ZERO_STAGES}, got {stage}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        loaded = named[0][1].dtype  # fp32 (fp64 in tests): the masters' dtype
        self.ps, self.stage, self.param_dtype = ps, stage, param_dtype or loaded
        self.separate_masters = self.param_dtype != loaded
        if stage == 0 and self.separate_masters:
            raise ValueError("16-bit parameters need --zero_stage 1 (stage 0 keeps fp32 parameters)")
        self.names = {id(p): n for n, p in named}
        self.buckets = GradBuckets([p for _, p in reversed(named)], ps, stage,
                                   lambda p: mp_partial_group_size(p, ps.mp_size), int(bucket_mb * 2**20 / 4),
                                   param_dtype)
        self.pieces: list[Piece] = []
        self._masters: list[tuple[Bucket, torch.Tensor]] = []  # 16-bit parameters: (bucket, fp32 owned range)
        if stage == 0:
            self.pieces = [Piece(n, p, 0, p.numel(), p, p.main_grad) for n, p in named]
            self.buckets.attach_grads()
        else:
            self.buckets.flatten_parameters(self._take_owned_range)
        decay = [pc.master for pc in self.pieces if pc.param.dim() >= 2]
        no_decay = [pc.master for pc in self.pieces if pc.param.dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if not groups:  # this rank owns no element (more ranks than elements): keep a placeholder group
            groups = [{"params": [torch.zeros(0, device=ps.device)], "weight_decay": 0.0}]
        self.inner = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        for pc in self.pieces:
            pc.master.grad = pc.grad
        self._reduced = False
        self.scaler = loss_scaler  # fp16: dynamic loss scaling; None: the loss is not scaled

    @property
    def loss_scale(self) -> float:
        """Multiplied into the loss before backward (fp16); the gradients are divided by it in ``step``."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        """Resume the loss scale (a checkpoint saved without one leaves the scaler at its start)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def _take_owned_range(self, bucket: Bucket) -> None:
        """Stage 1, before the parameters become views of the flat buffer: this rank's pieces and fp32 masters."""
        lo, hi = self.buckets.reduced_range(bucket)
        master_flat = None
        if self.separate_masters:
            master_flat = torch.zeros(hi - lo, dtype=bucket.grad.dtype, device=bucket.grad.device)
            self._masters.append((bucket, master_flat))
        for p, off in zip(bucket.params, bucket.offsets):
            a, b = max(lo, off) - off, min(hi, off + p.numel()) - off
            if a >= b:
                continue
            if master_flat is None:  # fp32 parameters: the owned range of the parameter buffer is the master
                master = bucket.data.narrow(0, off + a, b - a)
            else:
                master = master_flat.narrow(0, off + a - lo, b - a)
                master.copy_(p.detach().reshape(-1)[a:b])
            self.pieces.append(Piece(self.names[id(p)], p, a, b, master, bucket.grad.narrow(0, off + a, b - a)))

    # -- the step ---------------------------------------------------------------------------------------
    def start_micro_batch(self, last: bool) -> None:
        """Call before each backward of a step (``last`` for its final one: then buckets launch during it)."""
        self.buckets.start_micro_batch(last)

    @torch.no_grad()
    def finish_gradients(self) -> None:
        """Complete the gradient reduction (idempotent within a step). Call it before any other collective on the
        DP x SP group once backward is done, so every rank issues its collectives in the same order."""
        if not self._reduced:
            self.buckets.finish_reduction()
            self._reduced = True

    def set_lr(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def grad_norm(self) -> float:
        """Global L2 norm of the reduced gradient: every element once over DP x SP and MP."""
        pieces = [pc for pc in self.pieces if pc.hi > pc.lo]
        total = torch.zeros((), dtype=torch.float64, device=self.ps.device)
        if pieces:
            norms = torch._foreach_norm([pc.grad for pc in pieces])
            copies = torch.tensor([float(pc.param.shard.copies) for pc in pieces], dtype=torch.float64,
                                  device=self.ps.device)
            total = (torch.stack(norms).double().pow(2) / copies).sum()
        # stage 1: the DP x SP partitions are disjoint (summed); stage 0: those ranks hold the same sums
        for group in ([self.ps.dpsp_group] if self.stage == 1 else []) + [self.ps.mp_group]:
            if group_size(group) > 1:
                dist.all_reduce(total, group=group)
        return math.sqrt(total.item())

    @torch.no_grad()
    def step(self, max_grad_norm: float, loss_is_finite: bool = True) -> tuple[float, bool]:
        """Finish the gradient reduction, unscale, clip, update, share the update; returns (grad norm, skipped).

        A non-finite loss or gradient norm skips the update (the gradients are dropped either way); with a loss
        scaler that is an overflow: the scale backs off (the norm is global, so every rank agrees)."""
        self.finish_gradients()
        grads = [pc.grad for pc in self.pieces]
        if self.loss_scale != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / self.loss_scale)
        norm = self.grad_norm()
        skipped = not (loss_is_finite and math.isfinite(norm))
        if self.scaler is not None:
            self.scaler.update(overflow=skipped)
        if not skipped:
            if max_grad_norm > 0 and norm > max_grad_norm and grads:
                torch._foreach_mul_(grads, max_grad_norm / (norm + 1e-6))
            self.inner.step()
            if self.stage == 1:
                self._publish_masters()
        self.zero_grad()
        return norm, skipped

    def _publish_masters(self) -> None:
        """Stage 1: the updated owned ranges into the parameters of every rank."""
        for bucket, master_flat in self._masters:
            lo, hi = self.buckets.reduced_range(bucket)
            bucket.data.narrow(0, lo, hi - lo).copy_(master_flat)
        self.buckets.gather_parameters()

    def zero_grad(self) -> None:
        self.buckets.zero()
        self._reduced = False
        for pc in self.pieces:  # the views stay attached
            pc.master.grad = pc.grad

    def memory_breakdown(self, model: nn.Module) -> dict[str, int]:
        """Bytes this rank holds for the model's parameters, the gradient buckets, the separate fp32 masters and
        the AdamW moments (each storage counted once)."""
        def total(tensors) -> int:
            seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
            return sum(seen.values())
        moments = [s[k] for s in self.inner.state.values() for k in ("exp_avg", "exp_avg_sq") if k in s]
        return {"parameters": total(list(model.parameters())), "gradients": total(b.grad for b in self.buckets.buckets),
                "masters": total(m for _, m in self._masters), "moments": total(moments),
                "trainable_parameters": sum(p.numel() for b in self.buckets.buckets for p in b.params)}

    # -- layout-free state --------------------------------------------------------------------------------
    @property
    def adam_step(self) -> int:
        for state in self.inner.state.values():
            return int(state["step"].item())
        return 0

    @torch.no_grad()
    def state_pieces(self, with_master: bool) -> dict[str, dict]:
        """What this rank owns, keyed by parameter name, in full-tensor coordinates (host tensors)."""
        out = {}
        for pc in self.pieces:
            info = pc.param.shard
            entry = {"full_shape": list(info.full_shape), "dim": info.dim, "start": info.start, "stop": info.stop,
                     "local_shape": list(pc.param.shape), "range": [pc.lo, pc.hi]}
            state = self.inner.state.get(pc.master)
            if state:
                entry["exp_avg"] = state["exp_avg"].reshape(-1).cpu()
                entry["exp_avg_sq"] = state["exp_avg_sq"].reshape(-1).cpu()
            if with_master:
                entry["master"] = pc.master.detach().reshape(-1).float().cpu()
            out[pc.name] = entry
        return out

    @torch.no_grad()
    def load_state_pieces(self, read, adam_step: int) -> None:
        """Fill moments (and masters, when saved) from ``read(name, key, param, lo, hi)`` -> tensor or None."""
        for pc in self.pieces:
            if adam_step > 0:
                moments = [read(pc.name, key, pc.param, pc.lo, pc.hi) for key in ("exp_avg", "exp_avg_sq")]
                if any(m is None for m in moments):
                    raise KeyError(f"the saved optimizer state has no moments for {pc.name}")
                device = pc.master.device
                self.inner.state[pc.master] = {
                    "step": torch.tensor(float(adam_step), dtype=torch.float32, device=device),
                    "exp_avg": moments[0].to(device).view_as(pc.master).clone(),
                    "exp_avg_sq": moments[1].to(device).view_as(pc.master).clone()}
            master = read(pc.name, "master", pc.param, pc.lo, pc.hi)
            if master is not None:
                pc.master.copy_(master.view_as(pc.master))
        if self.stage == 1:
            self._publish_masters()
