"""Checkpoint manifests: every file's size and CRC-32, recorded when the checkpoint is saved, checked on resume.

``checkpoint-N/manifest.json``: {"format": 1, "files": {relative path: {"bytes": size, "crc32": "08x"}}}. It is
written last, before the folder gets its final name, so a complete checkpoint of this release always has one.
"""
from __future__ import annotations

import json
import os
import zlib

from .writes import writing

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def list_files(folder: str) -> list[str]:
    """Every file under ``folder`` (relative paths, sorted), the manifest itself left out."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def crc32(path: str, chunk: int = 16 * 2**20) -> str:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            value = zlib.crc32(block, value)
    return f"{value:08x}"


def describe(folder: str, files: list[str]) -> dict:
    """{relative path: {"bytes", "crc32"}} for ``files`` of ``folder``."""
    return {rel: {"bytes": os.path.getsize(os.path.join(folder, rel)), "crc32": crc32(os.path.join(folder, rel))}
            for rel in files}


def write_manifest(folder: str, entries: dict) -> None:
    path = os.path.join(folder, MANIFEST)
    text = json.dumps({"format": MANIFEST_FORMAT, "files": dict(sorted(entries.items()))}, indent=1)
    with writing(path, len(text)):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def read_manifest(folder: str) -> dict | None:
    """The manifest's files, or None when the checkpoint has none (saved by an earlier release).
    Raises ValueError for a manifest that is not valid JSON."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{MANIFEST} is unreadable ({exc})") from None


def file_problem(folder: str, rel: str, entry: dict, checksum: bool) -> str | None:
    """What is wrong with ``rel`` against its manifest entry (missing, another size, another checksum), or None."""
    path = os.path.join(folder, rel)
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        return f"{size:,} bytes, the manifest says {entry['bytes']:,}"
    if checksum and crc32(path) != entry["crc32"]:
        return "its CRC-32 differs from the manifest's"
    return None
