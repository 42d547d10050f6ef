"""Reading Hugging Face checkpoints slice by slice: *.safetensors (sharded or not) and pytorch_model*.bin.

A source answers three questions — which keys, what full shape, and "give me rows [start, stop) of this
key along dim" — so a rank reads only its own slices (safetensors by positioned reads; .bin via mmap).
"""
from __future__ import annotations

import json
import os

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing/unexpected keys, wrong shapes, no weight files."""


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """({name: {"dtype", "shape", "data_offsets"}}, byte offset of the data) of a .safetensors file."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        size = int.from_bytes(size_bytes, "little")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _pread_exact(fd: int, count: int, offset: int) -> bytearray:
    buf = bytearray(count)
    view, done = memoryview(buf), 0
    while done < count:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"unexpected end of file reading {count} bytes at offset {offset}")
        done += n
    return buf


class SafetensorsSource:
    """Tensors spread over one or more .safetensors files, read by slice with positioned reads.

    Plain reads (not mmap) keep a rank's memory to the slices it asked for: a column slice of a matrix is
    read in blocks of rows and cut, so nothing else of the file stays resident.
    """

    BLOCK_BYTES = 64 * 2**20

    def __init__(self, files_by_key: dict[str, str]):
        self._file_of = files_by_key
        self._headers: dict[str, tuple[dict, int]] = {}
        self._fds: dict[str, int] = {}

    def _entry(self, key: str) -> tuple[dict, int, int]:
        """(header entry, absolute data offset, fd) of ``key``."""
        path = self._file_of[key]
        if path not in self._headers:
            self._headers[path] = read_safetensors_header(path)
            self._fds[path] = os.open(path, os.O_RDONLY)
        header, data_start = self._headers[path]
        if key not in header:
            raise CheckpointError(f"{path}: the index lists {key} but the file does not hold it")
        entry = header[key]
        return entry, data_start + entry["data_offsets"][0], self._fds[path]

    def keys(self) -> set[str]:
        return set(self._file_of)

    def shape(self, key: str) -> tuple:
        return tuple(self._entry(key)[0]["shape"])

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or indices [start, stop) along ``dim``; only those bytes are read."""
        entry, offset, fd = self._entry(key)
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{key}: unsupported safetensors dtype {entry['dtype']}")
        dtype, shape = _DTYPES[entry["dtype"]], list(entry["shape"])
        item = torch.empty((), dtype=dtype).element_size()
        if dim is None:
            dim, start, stop = 0, 0, shape[0] if shape else 1
            if not shape:
                return torch.frombuffer(_pread_exact(fd, item, offset), dtype=dtype).reshape(())
        stop = shape[dim] if stop is None else stop
        outer = 1
        for n in shape[:dim]:
            outer *= n
        inner = 1
        for n in shape[dim + 1:]:
            inner *= n
        out_shape = shape[:dim] + [stop - start] + shape[dim + 1:]
        if outer == 1 or stop - start == 0:  # one contiguous byte range
            count = (stop - start) * inner * item
            data = _pread_exact(fd, count, offset + start * inner * item) if count else bytearray()
            return torch.frombuffer(data, dtype=dtype).reshape(out_shape) if count else torch.empty(out_shape,
                                                                                                       dtype=dtype)
        row = shape[dim] * inner  # elements per outer index
        out = torch.empty(outer, stop - start, inner, dtype=dtype)
        per_block = max(1, self.BLOCK_BYTES // (row * item))
        for first in range(0, outer, per_block):
            n = min(per_block, outer - first)
            block = torch.frombuffer(_pread_exact(fd, n * row * item, offset + first * row * item), dtype=dtype)
            out[first:first + n] = block.view(n, shape[dim], inner)[:, start:stop]
        return out.reshape(out_shape)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._headers.clear()


class TorchFileSource:
    """Tensors in pytorch_model*.bin / *.pth files, loaded memory-mapped with weights_only=True."""

    def __init__(self, files: list[str]):
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for key, value in state.items():
                if torch.is_tensor(value):
                    self._tensors[key] = value

    def keys(self) -> set[str]:
        return set(self._tensors)

    def shape(self, key: str) -> tuple:
        return tuple(self._tensors[key].shape)

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self._tensors[key]
        if dim is None:
            return t.clone()
        stop = t.shape[dim] if stop is None else stop
        return t.narrow(dim, start, stop - start).clone()

    def close(self):
        self._tensors.clear()


def _index_files(ckpt_dir: str, index_name: str) -> dict[str, str]:
    with open(os.path.join(ckpt_dir, index_name), encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    return {key: os.path.join(ckpt_dir, name) for key, name in weight_map.items()}


def open_hf_checkpoint(ckpt_dir: str):
    """A tensor source over an HF checkpoint directory; errors name the directory and what was looked for."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory does not exist: {ckpt_dir}")
    names = sorted(os.listdir(ckpt_dir))
    if "model.safetensors.index.json" in names:
        return SafetensorsSource(_index_files(ckpt_dir, "model.safetensors.index.json"))
    shards = [n for n in names if n.endswith(".safetensors")]
    if shards:
        files = {}
        for name in shards:
            header, _ = read_safetensors_header(os.path.join(ckpt_dir, name))
            files.update({key: os.path.join(ckpt_dir, name) for key in header})
        return SafetensorsSource(files)
    if "pytorch_model.bin.index.json" in names:
        return TorchFileSource(sorted(set(_index_files(ckpt_dir, "pytorch_model.bin.index.json").values())))
    bins = [os.path.join(ckpt_dir, n) for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    if bins:
        return TorchFileSource(bins)
    raise CheckpointError(f"no weights in {ckpt_dir}: expected model*.safetensors (with or without "
                          f"model.safetensors.index.json) or pytorch_model*.bin")
