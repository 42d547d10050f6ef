"""Record every tensor handed to torch.distributed, and how it was made.

On the CPU every tensor is on ``ps.device``, so the device alone cannot tell a NCCL-safe tensor from one
that would break on a GPU. ``CollectiveAudit`` therefore tracks creation: a tensor made by a factory
(``torch.tensor``, ``zeros``, ``arange``, ...) without a ``device`` is *host-made*; ``.to(device)`` /
``.cuda()`` make it device-made; any other op's result is host-made when all its tensor inputs are (on a
GPU such a result would stay on the CPU). Each call to a wrapped collective records (function, device,
dtype, host-made, the first package frame calling it); ``problems()`` lists the calls that would fail
or stage data on the GPU under NCCL: a host-made tensor, a tensor on another device than ``ps.device``,
or an object collective over a group that is not gloo.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.linspace, torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye,
             torch.scalar_tensor, torch.from_numpy}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}
TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                      "reduce", "gather", "scatter", "all_to_all_single", "send", "recv",
                      "reduce_scatter")  # isend/irecv stay unwrapped: P2POp checks their identity
OBJECT_COLLECTIVES = ("gather_object", "all_gather_object", "broadcast_object_list", "scatter_object_list")
HOST_MADE = "_audit_host_made"


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)
    elif isinstance(obj, dist.P2POp):
        yield obj.tensor


def host_made(t: torch.Tensor) -> bool:
    return bool(getattr(t, HOST_MADE, False))


def _mark(out, value: bool) -> None:
    for t in _tensors(out):
        try:
            setattr(t, HOST_MADE, value)
        except (AttributeError, RuntimeError):  # some internal tensors refuse attributes
            pass


class _Provenance(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            _mark(out, kwargs.get("device") is None)
        elif func in MOVES:
            moved = func is torch.Tensor.cuda or "device" in kwargs or any(
                isinstance(a, (torch.device, str, int, torch.Tensor)) for a in args[1:])
            _mark(out, False if moved else host_made(args[0]))
        elif isinstance(out, torch.Tensor) or (isinstance(out, (list, tuple)) and out and
                                                 isinstance(out[0], torch.Tensor)):
            inputs = [t for t in _tensors((args, kwargs))]
            _mark(out, bool(inputs) and all(host_made(t) for t in inputs))
        return out


@dataclass
class Call:
    function: str
    device: str
    dtype: str
    host_made: bool
    where: str
    backend: str = ""


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/llama_rlhf/" in frame.filename and not frame.filename.endswith("parallel/comm.py"):
            return f"{frame.filename.split('/llama_rlhf/')[-1]}:{frame.lineno} ({frame.name})"
    return "?"


class CollectiveAudit:
    """``with CollectiveAudit(ps.device) as audit: ...``; then ``audit.calls`` and ``audit.problems()``."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.calls: list[Call] = []
        self._saved = {}
        self._mode = _Provenance()

    def _wrap(self, name, original):
        def wrapper(*args, **kwargs):
            where = _caller()
            if name in OBJECT_COLLECTIVES:
                group = kwargs.get("group")
                backend = str(dist.get_backend(group)) if dist.is_initialized() else "?"
                self.calls.append(Call(name, "-", "object", False, where, backend))
            else:
                for t in _tensors((args, kwargs)):
                    self.calls.append(Call(name, str(t.device), str(t.dtype).replace("torch.", ""), host_made(t),
                                           where))
            return original(*args, **kwargs)
        return wrapper

    def __enter__(self):
        for name in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES + ("batch_isend_irecv",):
            original = getattr(dist, name)
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(dist, name, original)
        return False

    def problems(self) -> list[str]:
        bad = []
        for c in self.calls:
            if c.function in OBJECT_COLLECTIVES:
                if "gloo" not in c.backend:
                    bad.append(f"{c.function} over a {c.backend} group at {c.where}")
            elif c.host_made:
                bad.append(f"{c.function} of a host-made {c.dtype} tensor at {c.where}")
            elif c.device != str(self.device):
                bad.append(f"{c.function} of a {c.dtype} tensor on {c.device} (not {self.device}) at {c.where}")
        return sorted(set(bad))
