"""Communication per transformer layer: calls and bytes for model parallelism (all-reduce) and sequence
parallelism (ring P2P), counted by wrapping torch.distributed, next to the theoretical minimum.

A tiny Llama (hidden 64, 4 query / 2 KV heads of size 16, fp32) runs one forward and one backward of the
vocab-parallel cross-entropy on B=2 x S=64 tokens in a gloo world of 4 processes, at MP = 2, 4 and SP = 2, 4
(the remaining ranks are data-parallel replicas; data-parallel gradient sync is not part of forward/backward
and is not counted). Per-layer figures are the difference between a 3-layer and a 1-layer model, divided by 2;
"outside layers" is every call (any op) the 1-layer model makes beyond one layer's (embedding, loss). Bytes are the payload
one rank hands to each call (an all-reduce of a [B, S, h] fp32 tensor counts B*S*h*4 bytes, whatever the
backend's algorithm moves on the wire); a P2P transfer counts the bytes it sends. Nothing is asserted.

Theoretical minimum per layer (Megatron MP): 2 all-reduces of B*S*h forward (after attention and MLP), 2 in
backward (their inputs' gradients). Ring attention (SP): SP-1 K/V block transfers forward, each
2*B*(S/SP)*Hkv*D; backward SP-1 K/V transfers plus SP-1 dK/dV transfers (same size): 2(SP-1).

    python -m benchmarks.comm
"""
from __future__ import annotations

import argparse
import os
import queue
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

BATCH, SEQ, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 64, 64, 4, 2, 16, 128
WORLD = 4
LAYOUTS = (("mp", 2), ("mp", 4), ("sp", 2), ("sp", 4))


@dataclass
class Event:
    phase: str
    op: str  # all_reduce, all_gather, ..., or "p2p send" / "p2p recv" for each op of a batch_isend_irecv
    bytes: int
    group_size: int
    tag: int = 0


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class CommCounter:
    """Records every collective / P2P call made through ``torch.distributed`` inside the ``with`` block.

    Wrapped: all_reduce, all_gather, all_gather_into_tensor, reduce_scatter_tensor, broadcast, reduce, gather,
    scatter, all_to_all, send, recv, batch_isend_irecv (one event per P2P op in the batch). ``isend``/``irecv``
    are not wrapped (``P2POp`` insists on the originals); the framework posts P2P only through batch_isend_irecv.
    Set ``counter.phase`` to label the events that follow.
    """

    PAYLOAD_ARG = {"all_reduce": 0, "all_gather": 1, "all_gather_into_tensor": 1, "reduce_scatter_tensor": 1,
                   "broadcast": 0, "reduce": 0, "gather": 0, "scatter": 0, "all_to_all": 1, "send": 0, "recv": 0}

    def __init__(self):
        self.events: list[Event] = []
        self.phase = "forward"
        self._saved: dict = {}

    def _group_size(self, group) -> int:
        return dist.get_world_size(group) if group is not None else dist.get_world_size()

    def _wrap(self, name: str, real):
        index = self.PAYLOAD_ARG[name]

        def wrapper(*args, **kwargs):
            payload = args[index] if len(args) > index else kwargs.get("tensor")  # this rank's contribution
            self.events.append(Event(self.phase, name, _nbytes(payload), self._group_size(kwargs.get("group"))))
            return real(*args, **kwargs)
        return wrapper

    def _wrap_batch(self, real):
        def wrapper(ops):
            for op in ops:
                kind = "p2p send" if op.op is dist.isend or getattr(op.op, "__name__", "") == "isend" else "p2p recv"
                self.events.append(Event(self.phase, kind, _nbytes(op.tensor), self._group_size(op.group), op.tag))
            return real(ops)
        return wrapper

    def __enter__(self) -> "CommCounter":
        for name in self.PAYLOAD_ARG:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        self._saved["batch_isend_irecv"] = dist.batch_isend_irecv
        dist.batch_isend_irecv = self._wrap_batch(self._saved["batch_isend_irecv"])
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(dist, name, real)
        self._saved.clear()

    def total(self, phase: str, ops: tuple[str, ...]) -> tuple[int, int]:
        """(calls, bytes) of the events of ``phase`` whose op is one of ``ops``."""
        chosen = [e for e in self.events if e.phase == phase and e.op in ops]
        return len(chosen), sum(e.bytes for e in chosen)


def tiny_config(layers: int):
    from llama_rlhf.models.config import ModelConfig
    return ModelConfig("llama-hf", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                       num_layers=layers, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                       rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=SEQ)


def count_step(ps, layers: int, seed: int = 0) -> CommCounter:
    """One forward + backward of the tiny model's loss at layout ``ps``, with every call recorded."""
    from llama_rlhf.models.init import init_weights
    from llama_rlhf.models.pretrained import build_model
    from llama_rlhf.parallel.cross_entropy import mean_over_tokens, vocab_parallel_cross_entropy
    from llama_rlhf.parallel.sequence_split import zigzag_slots
    model = build_model(tiny_config(layers), ps)
    init_weights(model, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], dim=1)  # already shifted
    if ps.sp_size > 1:
        slots = zigzag_slots(SEQ, ps.sp_size, ps.sp_rank)
        ids, labels = ids[:, slots], labels[:, slots]
    with CommCounter() as counter:
        logits = model(ids)  # [B, S_local, V/mp]
        loss = mean_over_tokens(vocab_parallel_cross_entropy(logits, labels, ps.mp_group), labels, ps.sp_group)
        counter.phase = "backward"
        loss.backward()
    return counter


MP_OPS = ("all_reduce",)
SP_OPS = ("p2p send",)


def theory(kind: str, size: int) -> dict:
    """Minimum per-layer (calls, bytes) per rank, forward and backward, for this tiny model in fp32."""
    if kind == "mp":
        one = BATCH * SEQ * HIDDEN * 4
        return {"forward": (2, 2 * one), "backward": (2, 2 * one)}
    block = 2 * BATCH * (SEQ // size) * KV_HEADS * HEAD_DIM * 4  # K and V of one rank's chunks
    return {"forward": (size - 1, (size - 1) * block), "backward": (2 * (size - 1), 2 * (size - 1) * block)}


def layout_rows(kind: str, size: int, counts: dict) -> list[dict]:
    """Rows for one layout from {layers: CommCounter} (this rank's counts)."""
    ops = MP_OPS if kind == "mp" else SP_OPS
    rows = []
    for phase in ("forward", "backward"):
        c1, b1 = counts[1].total(phase, ops)
        c3, b3 = counts[3].total(phase, ops)
        calls, nbytes = (c3 - c1) / 2, (b3 - b1) / 2
        min_calls, min_bytes = theory(kind, size)[phase]
        everything = [e for e in counts[1].events if e.phase == phase and e.op != "p2p recv"]  # recv: a send's twin
        other = [e for e in everything if e.op not in ops]
        rows.append({"benchmark": "comm", "layout": f"{kind.upper()}={size}", "kind": kind, "size": size,
                     "phase": phase, "ops_counted": list(ops), "calls_per_layer": calls, "bytes_per_layer": nbytes,
                     "min_calls_per_layer": min_calls, "min_bytes_per_layer": min_bytes,
                     "outside_layers_calls": len(everything) - calls,
                     "outside_layers_bytes": sum(e.bytes for e in everything) - nbytes,
                     "other_ops_calls": len(other), "other_ops": sorted({e.op for e in other}),
                     "model": f"B={BATCH} S={SEQ} h={HIDDEN} heads={HEADS} kv={KV_HEADS} d={HEAD_DIM} fp32"})
    return rows


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from llama_rlhf.parallel.state import ParallelState
    states = {(kind, size): ParallelState.build(size if kind == "mp" else 1, size if kind == "sp" else 1)
              for kind, size in LAYOUTS}  # every group on every rank, in the same order
    rows = []
    for kind, size in LAYOUTS:
        counts = {layers: count_step(states[(kind, size)], layers) for layers in (1, 3)}
        rows += layout_rows(kind, size, counts)
    results.put((rank, rows))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(quick: bool = False) -> list[dict]:
    """Counts from every rank; the row kept is rank 0's, with ``same_on_all_ranks`` saying whether all agree."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    per_rank = {}
    try:
        while len(per_rank) < WORLD:
            try:
                rank, rows = results.get(timeout=5.0)
                per_rank[rank] = rows
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a comm benchmark rank failed") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    rows = per_rank[0]
    key = ("calls_per_layer", "bytes_per_layer")
    for i, row in enumerate(rows):
        row["same_on_all_ranks"] = all(tuple(r[i][k] for k in key) == tuple(row[k] for k in key)
                                       for r in per_rank.values())
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'layout':<7} {'phase':<9} {'calls/layer':>11} {'min':>5} {'bytes/layer':>12} {'min bytes':>10} "
             f"{'outside layers (calls, bytes)':>30}"]
    for r in rows:
        lines.append(f"{r['layout']:<7} {r['phase']:<9} {r['calls_per_layer']:>11g} {r['min_calls_per_layer']:>5} "
                     f"{r['bytes_per_layer']:>12.0f} {r['min_bytes_per_layer']:>10} "
                     f"{r['outside_layers_calls']:>17g}, {r['outside_layers_bytes']:>10.0f}")
    lines.append(f"(per rank; MP counts all-reduces, SP counts ring P2P sends; {rows[0]['model']})")
    return "\n".join(lines)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(format_table(run()))


if __name__ == "__main__":
    main()
