"""Readers: .jsonl, .json (an array), .parquet, HF ``datasets.save_to_disk`` folders and .arrow files ->
(where, object) in file order, where names the file and line (or row). ``share=(rank, world)`` yields one
contiguous share of the records; the shares of ranks 0..world-1 concatenated are the whole file."""
from __future__ import annotations

import json
import os
from typing import Iterator

from ..jsonl import DataError

KNOWN_KEYS = ("messages", "conversations", "instruction", "output", "prompt", "completion", "text")
_CHUNK = 1 << 24


def source_files(path: str) -> list[str]:
    """The files whose bytes make up a data source (a folder: every file in it, sorted)."""
    if os.path.isdir(path):
        return sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    return [path]


def read_records(path: str, share: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, dict]]:
    """(where, object) for every record of ``path`` in this share, by the file's kind."""
    source_files(path)
    if os.path.isdir(path) or path.endswith(".arrow"):
        return _arrow_rows(path, share)
    if path.endswith(".parquet"):
        return _parquet_rows(path, share)
    if path.endswith(".json") and _first_char(path) == "[":
        return _json_array(path, share)
    return _jsonl(path, share)


def _first_char(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head[:1]


def _decode(raw: bytes, path: str, line_no: int, file_offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte {file_offset + exc.start} of the file, "
                        f"column {exc.start + 1})") from None


def _count_newlines(f, end: int) -> int:
    f.seek(0)
    count, left = 0, end
    while left > 0:
        block = f.read(min(_CHUNK, left))
        if not block:
            break
        count += block.count(b"\n")
        left -= len(block)
    return count


def _jsonl(path: str, share) -> Iterator[tuple[str, dict]]:
    """A line belongs to the share holding its first byte (shares are equal byte ranges)."""
    rank, world = share
    size = os.path.getsize(path)
    lo, hi = size * rank // world, size * (rank + 1) // world
    with open(path, "rb") as f:
        start = 0
        if lo > 0:
            f.seek(lo - 1)
            f.readline()  # finish the line that began before this share
            start = f.tell()
        line_no = _count_newlines(f, start) + 1
        f.seek(start)
        pos = start
        while pos < hi:
            raw = f.readline()
            if not raw:
                break
            text = _decode(raw, path, line_no, pos)
            if pos == 0:
                text = text.lstrip("\ufeff")
            if text.strip():
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
                yield f"{path}:{line_no}", obj
            pos += len(raw)
            line_no += 1


def _json_array(path: str, share) -> Iterator[tuple[str, dict]]:
    """A JSON array of objects; each item is named by the line it starts on."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        line_no = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte {exc.start} of the file)") from None
    decoder, items, pos = json.JSONDecoder(), [], text.index("[") + 1
    line, counted = 1, 0

    def line_of(p):
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    def skip(p):
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    try:
        while True:
            pos = skip(pos)
            if pos < len(text) and text[pos] == "]":
                break
            obj, end = decoder.raw_decode(text, pos)
            items.append((line_of(pos), obj))
            pos = skip(end)
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif pos >= len(text) or text[pos] != "]":
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    rank, world = share
    n = len(items)
    for line_no, obj in items[n * rank // world:n * (rank + 1) // world]:
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        yield f"{path}:{line_no}", obj


def _pyarrow(path: str):
    try:
        import pyarrow  # optional: only parquet and arrow sources need it
        return pyarrow
    except ImportError:
        raise DataError(f"{path}: reading parquet/arrow data needs pyarrow (pip install pyarrow)") from None


def _check_columns(path: str, names) -> None:
    if not any(k in names for k in KNOWN_KEYS):
        raise DataError(f"{path}: columns {list(names)[:8]} have none of the needed ones ({', '.join(KNOWN_KEYS)})")


def _rows_of(path: str, batches, total: int, share) -> Iterator[tuple[str, dict]]:
    rank, world = share
    lo, hi = total * rank // world, total * (rank + 1) // world
    index = 0
    for batch in batches:
        n = batch.num_rows
        if index + n > lo and index < hi:
            part = batch.slice(max(lo - index, 0), min(hi, index + n) - max(lo, index))
            for k, obj in enumerate(part.to_pylist()):
                yield f"{path}: row {max(lo, index) + k}", obj
        index += n
        if index >= hi:
            break


def _parquet_rows(path: str, share) -> Iterator[tuple[str, dict]]:
    _pyarrow(path)
    import pyarrow.parquet as pq
    try:
        f = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    _check_columns(path, f.schema_arrow.names)
    yield from _rows_of(path, f.iter_batches(batch_size=1024), f.metadata.num_rows, share)


def _arrow_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = json.load(open(os.path.join(path, "dataset_dict.json"))).get("splits", [])
        raise DataError(f"{path}: a DatasetDict folder; pass one split's folder, e.g. "
                        f"{os.path.join(path, splits[0] if splits else 'train')}")
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        raise DataError(f"{path}: a folder that is not a datasets.save_to_disk folder (no state.json)")
    with open(state) as f:
        return [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]


def _arrow_rows(path: str, share) -> Iterator[tuple[str, dict]]:
    pa = _pyarrow(path)
    import pyarrow.ipc  # noqa: F401
    files = _arrow_files(path)
    readers = []
    for name in files:
        try:
            readers.append(pa.ipc.open_stream(pa.memory_map(name, "r")))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{name}: not a readable arrow file ({exc})") from None
    _check_columns(path, readers[0].schema.names)
    batches = [b for r in readers for b in r]  # memory-mapped: no copy
    yield from _rows_of(path, batches, sum(b.num_rows for b in batches), share)
