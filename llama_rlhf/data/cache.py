"""The token cache: every record tokenized once, shared by all ranks through memory-mapped files.

A cache folder ``<root>/<key>`` holds ``ids.bin`` (int32 token ids of all samples back to back), ``mask.bin``
(uint8: 1 where the shifted label is trained; the label is then the next id), ``offsets.bin`` (int64 [n + 1]
sample boundaries) and ``manifest.json`` (sizes, a CRC-32 per 16 MiB block of every file, counts). The key is a
SHA-256 of everything that changes the ids: the data files' bytes, the tokenizer file's bytes and settings, the
chat template, the format options and the maximum length. The build is split over ranks (each tokenizes a share
of every file), rank 0 joins the parts, writes the manifest last and renames the folder into place, so a reader
never sees half a cache. A cache whose files do not match its manifest is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from array import array

import numpy as np
import torch.distributed as dist

from ..jsonl import DataError
from ..parallel.cross_entropy import IGNORE_INDEX
from .readers import read_records, source_files
from .samples import DatasetStats, check_not_empty, sample_arrays

VERSION = 1
BLOCK = 1 << 24
FILES = {"ids.bin": np.int32, "mask.bin": np.uint8, "offsets.bin": np.int64}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    """obj from every rank, in rank order (every rank calls it)."""
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _hash_file(h, path: str) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)


def tokenizer_fingerprint(tok) -> dict:
    h = hashlib.sha256()
    if tok.source_file:
        _hash_file(h, tok.source_file)
    return {"file": h.hexdigest(), "kind": tok.kind, "vocab": tok.vocab_size, "bos": tok.bos_id, "eos": tok.eos_id,
            "end": sorted(tok.end_ids), "adds_bos": tok.adds_bos, "template": tok.chat_template,
            "names": tok.token_names}


def _content_blocks(sources: list[str]) -> list[tuple[int, str, int]]:
    """Every (source index, file, block index) of the sources' bytes, in a fixed order."""
    out = []
    for s, src in enumerate(sources):
        for path in source_files(src):
            out += [(s, path, j) for j in range(max(1, -(-os.path.getsize(path) // BLOCK)))]
    return out


def _block_digests(blocks, mine) -> dict[int, str]:
    """SHA-256 of the listed blocks (indices into ``blocks``)."""
    out, buf = {}, bytearray(BLOCK)
    for i in mine:
        _, path, j = blocks[i]
        with open(path, "rb") as f:
            f.seek(j * BLOCK)
            got = f.readinto(buf)
        out[i] = hashlib.sha256(memoryview(buf)[:got]).hexdigest()
    return out


def cache_key(sources: list[str], tok, options: dict, share: tuple[int, int] = (0, 1)) -> str:
    """SHA-256 over the sources' bytes, the tokenizer and the options that shape the ids. The sources are hashed
    in 16 MiB blocks, split over the ranks of ``share`` (every rank calls it); the key does not depend on that."""
    blocks = _content_blocks(sources)
    rank, world = share
    mine = _block_digests(blocks, range(rank, len(blocks), world))
    digests = {}
    for part in (_gather(mine) if world > 1 else [mine]):
        digests.update(part)
    files = [[os.path.relpath(path, src) if os.path.isdir(src) else "", j, digests[i]]
             for i, ((s, path, j), src) in enumerate((b, sources[b[0]]) for b in blocks)]
    blob = json.dumps({"version": VERSION, "files": files, "tokenizer": tokenizer_fingerprint(tok),
                       "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _block_crcs(path: str, blocks=None) -> dict[int, int]:
    """CRC-32 of the given 16 MiB blocks of a file (all when None), read into one reused buffer."""
    out, buf = {}, bytearray(BLOCK)
    with open(path, "rb") as f:
        n = (os.path.getsize(path) + BLOCK - 1) // BLOCK
        for j in range(n) if blocks is None else blocks:
            f.seek(j * BLOCK)
            got = f.readinto(buf)
            out[j] = zlib.crc32(memoryview(buf)[:got])
    return out


def _check_share(folder: str, rank: int, world: int) -> str | None:
    """None when this rank's share of the cache matches its manifest, else what is wrong."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return "missing" if not os.path.exists(folder) else "no readable manifest"
    if manifest.get("version") != VERSION:
        return "an older cache version"
    for name, info in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != info["bytes"]:
            return f"{name} has the wrong size"
        n = len(info["crc32"])
        mine = [j for j in range(n) if j % world == rank]
        for j, crc in _block_crcs(path, mine).items():
            if crc != info["crc32"][j]:
                return f"{name} block {j} fails its checksum"
    return None


class TokenCache:
    """A built cache, memory-mapped: samples as (ids, shifted labels) slices."""

    def __init__(self, folder: str):
        with open(os.path.join(folder, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.folder = folder
        n = self.manifest["samples"]
        self.ids = np.memmap(os.path.join(folder, "ids.bin"), np.int32, "r")
        self.mask = np.memmap(os.path.join(folder, "mask.bin"), np.uint8, "r")
        self.offsets = np.memmap(os.path.join(folder, "offsets.bin"), np.int64, "r", shape=(n + 1,))
        self.sources = self.manifest["sources"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def tokens(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and shifted labels of samples a..b-1 back to back ([T] int64 each)."""
        s, e = int(self.offsets[a]), int(self.offsets[b])
        ids = np.asarray(self.ids[s:e], dtype=np.int64)
        nxt = np.empty_like(ids)
        nxt[:-1] = ids[1:]
        nxt[-1:] = IGNORE_INDEX
        return ids, np.where(np.asarray(self.mask[s:e]) != 0, nxt, IGNORE_INDEX)


class _PartWriter:
    """One rank's tokenized share of one source, appended to files as it goes (memory stays flat)."""

    def __init__(self, prefix: str):
        self.files = {k: open(f"{prefix}.{k}", "wb") for k in ("ids", "mask", "len")}
        self.buf = {"ids": array("i"), "mask": array("B"), "len": array("q")}

    def add(self, ids: list[int], labels: list[int]) -> None:
        self.buf["ids"].extend(ids)
        self.buf["mask"].extend(1 if t != IGNORE_INDEX else 0 for t in labels)
        self.buf["len"].append(len(ids))
        if len(self.buf["ids"]) > 1 << 20:
            self.flush()

    def flush(self) -> None:
        for k, f in self.files.items():
            self.buf[k].tofile(f)
            del self.buf[k][:]

    def close(self) -> None:
        self.flush()
        for f in self.files.values():
            f.close()


def _tokenize_share(sources, tok, options, tmp, rank, world, progress) -> list[dict]:
    """Tokenize this rank's share of every source into part files; per-source stats as dicts."""
    stats_out, t0, last, seen = [], time.time(), time.time(), 0
    for s, src in enumerate(sources):
        stats, writer = DatasetStats(), _PartWriter(os.path.join(tmp, f"part-{s}-{rank}"))
        for where, obj in read_records(src, (rank, world)):
            arrays = sample_arrays(obj, tok, options["use_chat_template"], options["system_prompt"],
                                   options["max_len"], where, stats, options["format"])
            if arrays is not None:
                writer.add(*arrays)
            seen += 1
            if progress and time.time() - last > 10:
                last = time.time()
                progress(f"tokenizing {src}: {seen} records on rank 0 ({seen / (last - t0):.0f}/s per rank)")
        writer.close()
        stats_out.append(vars(stats))
    return stats_out


def _join_parts(tmp: str, n_sources: int, world: int, stats: list[DatasetStats], sources, options) -> None:
    """Rank 0: concatenate the parts (source order, then rank order), write checksums and the manifest."""
    with open(os.path.join(tmp, "ids.bin"), "wb") as ids_f, open(os.path.join(tmp, "mask.bin"), "wb") as mask_f, \
            open(os.path.join(tmp, "offsets.bin"), "wb") as off_f:
        total, counts = 0, []
        np.zeros(1, np.int64).tofile(off_f)
        for s in range(n_sources):
            count = 0
            for r in range(world):
                prefix = os.path.join(tmp, f"part-{s}-{r}")
                for suffix, out in (("ids", ids_f), ("mask", mask_f)):
                    with open(f"{prefix}.{suffix}", "rb") as f:
                        shutil.copyfileobj(f, out, BLOCK)
                lengths = np.fromfile(f"{prefix}.len", np.int64)
                (np.cumsum(lengths) + total).tofile(off_f)
                total += int(lengths.sum())
                count += len(lengths)
                for suffix in ("ids", "mask", "len"):
                    os.remove(f"{prefix}.{suffix}")
            counts.append(count)
    files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                    "crc32": [c for _, c in sorted(_block_crcs(os.path.join(tmp, name)).items())]} for name in FILES}
    first = np.cumsum([0] + counts).tolist()
    manifest = {"version": VERSION, "samples": sum(counts), "tokens": total, "files": files, "options": options,
                "sources": [{"path": src, "first": first[i], "samples": counts[i], "stats": vars(stats[i])}
                            for i, src in enumerate(sources)]}
    with open(os.path.join(tmp, "manifest.json.tmp"), "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    for name in FILES:
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    os.replace(os.path.join(tmp, "manifest.json.tmp"), os.path.join(tmp, "manifest.json"))


def _raise_first(errors: list) -> None:
    """Every rank raises the first error (in file order: the lowest rank's), so all exit with the same line."""
    from ..runtime import UsageError
    for rank, e in enumerate(errors):
        if e is not None:
            kind, message = e
            if kind in ("DataError", "UsageError", "FileNotFoundError"):
                raise {"DataError": DataError, "UsageError": UsageError,
                       "FileNotFoundError": FileNotFoundError}[kind](message)
            raise RuntimeError(f"tokenizing on rank {rank} failed: {kind}: {message}")


def open_cache(sources: list[str], tok, options: dict, root: str, log=print) -> TokenCache:
    """The cache of ``sources`` under ``root``: mapped when it is there and intact, else (re)built first.
    Every rank calls it; returns the same TokenCache on every rank."""
    rank, world = _world()
    key = cache_key(sources, tok, options, (rank, world))
    folder = os.path.join(root, key)
    problems = _gather(_check_share(folder, rank, world))
    problem = next((p for p in problems if p), None)
    if problem is None:
        if rank == 0:
            log(f"data cache: {folder} (hit)")
        return TokenCache(folder)
    tmp = f"{folder}.building"
    if rank == 0:
        log(f"data cache: building {folder}" + ("" if problem == "missing" else f" (the old one: {problem})"))
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _gather(None)  # barrier: the build folder exists
    t0 = time.time()
    try:
        result, error = _tokenize_share(sources, tok, options, tmp, rank, world, log if rank == 0 else None), None
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
        result, error = None, (type(exc).__name__, str(exc))
    gathered = _gather((result, error))
    _raise_first([e for _, e in gathered])
    stats = []
    for s, src in enumerate(sources):
        merged = DatasetStats()
        for part, _ in gathered:
            merged.add(DatasetStats(**part[s]))
        check_not_empty(src, merged)
        stats.append(merged)
    if rank == 0:
        _join_parts(tmp, len(sources), world, stats, sources, options)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        log(f"data cache: built in {time.time() - t0:.1f} s at world {world}")
    _gather(None)  # barrier: the cache is in place
    return TokenCache(folder)
