"""Training-data start-up: today's in-memory loader vs the token cache, for 1M synthetic chat samples at world 2.

Stages (each rank a fresh process, gloo):
  1. the in-memory loader (every rank tokenizes every line into Python lists, as before issue 15) on a slice of
     SLICE lines, one process; its time and RSS growth are extrapolated linearly to N lines (it is linear: one
     pass, lists per sample), because running it on 1M lines takes hours here;
  2. the first, cache-building run at world 2 on the same slice, extrapolated linearly to N lines (tokenizing
     is linear too; hashing and joining are I/O);
  3. a cached start of N lines at world 2, measured, not extrapolated: the N-line file is the slice repeated
     N / SLICE times, and its cache is assembled from the slice's cache repeated (the bytes a build of that file
     writes, since tokenizing is deterministic per line) and placed under the key open_cache computes for the
     file. The timed run hashes the N-line file, verifies every checksum, maps the cache, cuts rows, builds the
     schedule and draws the first 20 steps, exactly as solver_train does.
Memory per rank is the growth of private resident memory (RssAnon) over the stage; file-backed growth (library
code paged in on first use, the mapped cache's pages, shared by every rank through the page cache) is reported
apart. The first run's time is the cached start of N lines plus the slice's tokenizing time (cold minus cached
start of the slice) scaled to N.

    python -m benchmarks.data [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "alpha beta gamma delta apple river stone cloud quick brown fox jumps over lazy dog seven eleven".split()


def rss_mb() -> dict:
    """Resident memory in MB: private (RssAnon: what this rank's data structures hold) and file-backed
    (RssFile: library code paged in on first use, and the memory-mapped cache, shared through the page cache)."""
    with open("/proc/self/status") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) / 1024.0 for line in f if line.startswith("Rss")}
    return {"anon": fields.get("RssAnon", 0.0), "file": fields.get("RssFile", 0.0)}


def write_chat_file(path: str, n: int, seed: int = 0) -> None:
    """n synthetic chat lines (~125 tokens each with SmolLM2's tokenizer, like the issue's 100k-line measure)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 70)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {q}?"},
                                             {"role": "assistant", "content": a}]}) + "\n")


def data_args(files, cache_dir) -> SimpleNamespace:
    return SimpleNamespace(train_file=files, train_file_weights=None, data_format="auto", use_chat_template=True,
                           system_prompt=None, max_seq_len=2048, packing=True, data_cache_dir=cache_dir,
                           save_dir=cache_dir, eval_file=None, max_batch_size=4, gradient_accumulation_steps=1,
                           seed=1234)


def worker(stage: str, model_dir: str, data: str, cache_dir: str) -> None:
    import torch.distributed as dist
    from llama_rlhf.tokenizer import load_tokenizer
    tok = load_tokenizer(model_dir)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    base = rss_mb()
    start = time.perf_counter()
    if stage == "old":
        from llama_rlhf.data import load_samples, pack
        samples, stats = load_samples(data, tok, True, None, 2048)
        rows = pack(samples, 2048, True)
        n = len(samples)
    else:
        from llama_rlhf.data import build_train_data
        ps = SimpleNamespace(rank=rank, dp_size=world, dp_rank=rank)
        out = build_train_data(data_args([data], cache_dir), tok, ps)
        for step in range(20):
            out.schedule.micro_batches(0, step, rank)
        n = len(out.cache)
    seconds = time.perf_counter() - start
    after = rss_mb()
    print("RESULT " + json.dumps({"rank": rank, "seconds": seconds, "samples": n,
                                  "rss_growth_mb": after["anon"] - base["anon"],
                                  "file_rss_growth_mb": after["file"] - base["file"], "baseline_mb": base}), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: str, world: int, model_dir: str, data: str, cache_dir: str) -> list[dict]:
    port, procs = str(_free_port()), []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=ROOT, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.data", "--worker", stage, "--model_dir",
                                       model_dir, "--data", data, "--cache_dir", cache_dir], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    records = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"data benchmark stage {stage} failed:\n{out[-2000:]}\n{err[-3000:]}")
        records += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return records


def assemble_repeated_cache(slice_folder: str, big_file: str, repeats: int, tok, cache_dir: str) -> None:
    """The cache of ``big_file`` (the slice repeated) from the slice's cache repeated, under big_file's key."""
    import numpy as np
    from llama_rlhf.data.cache import TokenCache, _join_parts, cache_key
    from llama_rlhf.data.samples import DatasetStats
    small = TokenCache(slice_folder)
    options = small.manifest["options"]
    key = cache_key([big_file], tok, options)
    tmp = os.path.join(cache_dir, key + ".building")
    os.makedirs(tmp)
    ids, mask, lengths = np.asarray(small.ids), np.asarray(small.mask), small.lengths()
    with open(os.path.join(tmp, "part-0-0.ids"), "wb") as fi, open(os.path.join(tmp, "part-0-0.mask"), "wb") as fm, \
            open(os.path.join(tmp, "part-0-0.len"), "wb") as fl:
        for _ in range(repeats):
            ids.tofile(fi)
            mask.tofile(fm)
            lengths.tofile(fl)
    stats = DatasetStats(**small.sources[0]["stats"])
    for k in ("samples", "truncated", "skipped_no_response", "tokens"):
        setattr(stats, k, getattr(stats, k) * repeats)
    stats.formats = {f: n * repeats for f, n in stats.formats.items()}
    _join_parts(tmp, 1, 1, [stats], [big_file], options)
    os.replace(tmp, os.path.join(cache_dir, key))


def run(quick: bool = False) -> list[dict]:
    sys.path.insert(0, ROOT)
    from tools.fetch_smollm2 import ensure_smollm2
    from llama_rlhf.tokenizer import load_tokenizer
    model_dir = ensure_smollm2()
    n, n_slice = (100_000, 2_000) if quick else (1_000_000, 20_000)
    work = tempfile.mkdtemp(prefix="bench_data_")
    try:
        small, big = os.path.join(work, "slice.jsonl"), os.path.join(work, "big.jsonl")
        write_chat_file(small, n_slice)
        with open(small) as f:
            text = f.read()
        with open(big, "w") as f:
            for _ in range(n // n_slice):
                f.write(text)
        old = launch("old", 1, model_dir, small, os.path.join(work, "unused"))[0]
        cold = launch("cached", 2, model_dir, small, os.path.join(work, "cache"))
        folders = [d for d in os.listdir(os.path.join(work, "cache")) if not d.endswith(".building")]
        assemble_repeated_cache(os.path.join(work, "cache", folders[0]), big, n // n_slice, load_tokenizer(model_dir),
                                os.path.join(work, "cache"))
        cached = launch("cached", 2, model_dir, big, os.path.join(work, "cache"))
        hit = launch("cached", 2, model_dir, small, os.path.join(work, "cache"))  # the slice, now cached
        scale = n / n_slice
        row = {"benchmark": "data", "samples": n, "world": 2, "slice": n_slice,
               "file_mb": round(os.path.getsize(big) / 2 ** 20, 1),
               "old_slice_s": old["seconds"], "old_slice_rss_mb": old["rss_growth_mb"],
               "old_s_per_rank_extrapolated": old["seconds"] * scale,
               "old_rss_mb_per_rank_extrapolated": old["rss_growth_mb"] * scale,
               "cold_slice_s": max(r["seconds"] for r in cold),
               "cached_slice_s": max(r["seconds"] for r in hit),
               "cached_s_per_rank": max(r["seconds"] for r in cached),
               "cached_rss_mb_per_rank": max(r["rss_growth_mb"] for r in cached),
               "cached_file_rss_mb_per_rank": max(r["file_rss_growth_mb"] for r in cached),
               "cached_samples": cached[0]["samples"],
               "method": f"old loader and cold build measured on {n_slice} lines and scaled x{scale:g}; cached start "
                         f"measured on {n} lines (a cache assembled from the slice's, see benchmarks/data.py)"}
        # first run = a cached start of N lines + the slice's tokenizing work (its cold minus its cached time) x scale
        row["cold_s_extrapolated"] = row["cached_s_per_rank"] + (row["cold_slice_s"] - row["cached_slice_s"]) * scale
        row["speedup_vs_old"] = row["old_s_per_rank_extrapolated"] / row["cached_s_per_rank"]
        return [row]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker")
    p.add_argument("--model_dir")
    p.add_argument("--data")
    p.add_argument("--cache_dir")
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.model_dir, a.data, a.cache_dir)
        return
    print(json.dumps(run(a.quick), indent=1))


if __name__ == "__main__":
    main()


def format_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines += [f"{r['samples']} synthetic chat samples ({r['file_mb']} MB of jsonl), world {r['world']}: "
                  f"{r['method']}",
                  f"  in-memory loader: {r['old_slice_s']:.1f} s and {r['old_slice_rss_mb']:.0f} MB on "
                  f"{r['slice']} lines"
                  f" -> {r['old_s_per_rank_extrapolated']:.0f} s and {r['old_rss_mb_per_rank_extrapolated']:.0f} MB "
                  f"per rank (extrapolated)",
                  f"  first run (builds the cache): {r['cold_slice_s']:.1f} s on {r['slice']} lines -> "
                  f"{r['cold_s_extrapolated']:.0f} s (extrapolated)",
                  f"  cached start: {r['cached_s_per_rank']:.2f} s/rank, +{r['cached_rss_mb_per_rank']:.1f} MB private "
                  f"memory per rank (+{r['cached_file_rss_mb_per_rank']:.0f} MB file-backed: library code, mapped "
                  f"cache pages); {r['cached_slice_s']:.2f} s for the {r['slice']}-line slice"]
    return "\n".join(lines)
