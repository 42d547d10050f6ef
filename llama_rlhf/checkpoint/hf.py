"""Reading Hugging Face checkpoints slice by slice: *.safetensors (sharded or not) and pytorch_model*.bin.

A source answers three questions — which keys, what full shape, and "give me rows [start, stop) of this
key along dim" — so a rank reads only its own slices (safetensors ``get_slice``; .bin via mmap).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing/unexpected keys, wrong shapes, no weight files."""


class SafetensorsSource:
    """Tensors spread over one or more .safetensors files, read by slice."""

    def __init__(self, files_by_key: dict[str, str]):
        self._file_of = files_by_key
        self._handles: dict[str, object] = {}

    def _open(self, key: str):
        path = self._file_of[key]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def keys(self) -> set[str]:
        return set(self._file_of)

    def shape(self, key: str) -> tuple:
        return tuple(self._open(key).get_slice(key).get_shape())

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or rows [start, stop) along ``dim``; only those bytes are read."""
        sl = self._open(key).get_slice(key)
        if dim is None:
            return sl[:]
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return sl[index]

    def close(self):
        self._handles.clear()


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
            with safe_open(os.path.join(ckpt_dir, name), framework="pt") as f:
                files.update({key: os.path.join(ckpt_dir, name) for key in f.keys()})
        return SafetensorsSource(files)
    if "pytorch_model.bin.index.json" in names:
        return TorchFileSource(sorted(set(_index_files(ckpt_dir, "pytorch_model.bin.index.json").values())))
    bins = [os.path.join(ckpt_dir, n) for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    if bins:
        return TorchFileSource(bins)
    raise CheckpointError(f"no weights in {ckpt_dir}: expected model*.safetensors (with or without "
                          f"model.safetensors.index.json) or pytorch_model*.bin")
