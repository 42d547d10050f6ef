"""The token cache: same rows as the in-memory loader, a hit on the second run, a miss on any change of data,
tokenizer, template or options, damaged caches rebuilt, world 2 builds the same bytes as world 1, bad data ends
every rank with one line; mid-epoch resume, mixture proportions, and per-rank memory flat in the dataset size."""
import copy
import json
import os
import shutil

import pytest

from llama_rlhf.data import StepBatches, load_samples, open_cache, pack
from llama_rlhf.data.cache import FILES, _join_parts, _PartWriter, cache_key
from llama_rlhf.data.packing import CachedRows, row_starts
from llama_rlhf.data.samples import DatasetStats
from llama_rlhf.data.train_data import mixture_order
from llama_rlhf.jsonl import DataError
from llama_rlhf.tokenizer import load_tokenizer
from tests.distributed import run_checks
from tests.launch import ROOT, launch_ranks

DATA = os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")
OPTS = {"format": "auto", "use_chat_template": True, "system_prompt": None, "max_len": 96}


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(DATA) as f:
        lines = f.readlines()[:60]
    long_chat = [{"from": "human", "value": "x " * 200}, {"from": "gpt", "value": "y"}]
    lines[5] = json.dumps({"conversations": long_chat}) + "\n"
    path.write_text("".join(lines))
    return str(path)


def all_rows(rows):
    return [(r.ids, r.labels, r.positions, r.segments) for r in (rows[i] for i in range(len(rows)))]


def build(data, tok, root, opts=OPTS):
    logs = []
    cache = open_cache([data], tok, opts, str(root), log=logs.append)
    return cache, logs


def test_cache_rows_equal_the_in_memory_loader_and_hit_the_second_time(data, tok, tmp_path):
    samples, stats = load_samples(data, tok, True, None, 96)
    cache, logs = build(data, tok, tmp_path)
    assert "building" in logs[0] and len(cache) == len(samples) == stats.samples
    assert cache.sources[0]["stats"]["truncated"] == stats.truncated >= 1
    for packing in (False, True):
        reference = pack(samples, 96, packing)
        rows = CachedRows(cache, row_starts(cache.lengths(), 96, packing))
        assert all_rows(rows) == all_rows(reference), f"packing={packing}"
        # the schedule (same seed) picks the same rows for every step and DP rank
        a, b = StepBatches(reference, 2, 2, 2, seed=5), StepBatches(rows, 2, 2, 2, seed=5)
        for step in range(a.steps_per_epoch):
            for dp in range(2):
                ma, ta = a.micro_batches(1, step, dp)
                mb, tb = b.micro_batches(1, step, dp)
                assert ta == tb and [[r and r.ids for r in m] for m in ma] == [[r and r.ids for r in m] for m in mb]
    again, logs = build(data, tok, tmp_path)
    assert logs == [f"data cache: {again.folder} (hit)"]
    assert all_rows(CachedRows(again, row_starts(again.lengths(), 96, True))) == all_rows(pack(samples, 96, True))
    # resume mid-epoch: a fresh schedule over a fresh map gives step 3 of epoch 1 exactly
    fresh = StepBatches(CachedRows(again, row_starts(again.lengths(), 96, False)), 2, 2, 1, seed=5)
    first = StepBatches(CachedRows(cache, row_starts(cache.lengths(), 96, False)), 2, 2, 1, seed=5)
    assert [r.ids for r in fresh.step_rows(1, 3)] == [r.ids for r in first.step_rows(1, 3)]


def test_any_change_misses(data, tok, tmp_path):
    base = cache_key([data], tok, OPTS)
    changed = tmp_path / "changed.jsonl"
    changed.write_text(open(data).read() + '{"text": "one more"}\n')
    other_tok = copy.copy(tok)
    other_tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    tok_file = tmp_path / "tokenizer.json"
    tok_file.write_text(open(tok.source_file).read() + "\n")
    edited_tok = copy.copy(tok)
    edited_tok.source_file = str(tok_file)
    keys = {"file": cache_key([str(changed)], tok, OPTS), "template": cache_key([data], other_tok, OPTS),
            "tokenizer file": cache_key([data], edited_tok, OPTS)}
    for name, value in [("max_len", 97), ("format", "messages"), ("system_prompt", "S"), ("use_chat_template", False)]:
        keys[name] = cache_key([data], tok, {**OPTS, name: value})
    assert base == cache_key([data], tok, dict(OPTS)) and base not in keys.values()
    assert len(set(keys.values())) == len(keys), keys
    _, logs = build(data, tok, tmp_path / "c")
    _, logs2 = build(str(changed), tok, tmp_path / "c")
    assert "building" in logs2[0] and len(os.listdir(tmp_path / "c")) == 2


def test_damaged_cache_is_rebuilt_never_used(data, tok, tmp_path):
    good, _ = build(data, tok, tmp_path)
    reference = all_rows(CachedRows(good, row_starts(good.lengths(), 96, False)))
    folder = good.folder
    snapshot = {n: open(os.path.join(folder, n), "rb").read() for n in FILES}
    damages = {"ids.bin has the wrong size": lambda: open(os.path.join(folder, "ids.bin"), "r+b").truncate(40),
               "mask.bin block 0 fails its checksum": lambda: _flip(os.path.join(folder, "mask.bin"), 17),
               "no readable manifest": lambda: os.remove(os.path.join(folder, "manifest.json"))}
    for why, damage in damages.items():
        damage()
        cache, logs = build(data, tok, tmp_path)
        assert logs[0] == f"data cache: building {folder} (the old one: {why})", logs
        assert all_rows(CachedRows(cache, row_starts(cache.lengths(), 96, False))) == reference
        assert {n: open(os.path.join(folder, n), "rb").read() for n in FILES} == snapshot


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def check_two_rank_build(smollm2_dir, data, root, reference_folder, bad):
    import torch.distributed as dist
    tok = load_tokenizer(smollm2_dir)
    cache = open_cache([data], tok, OPTS, root, log=lambda m: None)
    assert os.path.basename(cache.folder) == os.path.basename(reference_folder)
    for name in FILES:
        assert open(os.path.join(cache.folder, name), "rb").read() == \
            open(os.path.join(reference_folder, name), "rb").read(), name
    ref = json.load(open(os.path.join(reference_folder, "manifest.json")))
    assert cache.manifest["sources"][0]["stats"] == ref["sources"][0]["stats"]
    # a bad line in rank 1's share: every rank raises the same one-line error naming file and line
    with pytest.raises(DataError) as info:
        open_cache([bad], tok, OPTS, root, log=lambda m: None)
    assert str(info.value) == f"{bad}:50: not valid JSON (Expecting value at column 1)"
    dist.barrier()


def test_two_ranks_build_the_bytes_one_rank_builds_and_share_errors(data, tok, smollm2_dir, tmp_path):
    reference, _ = build(data, tok, tmp_path / "one")
    bad = tmp_path / "bad.jsonl"
    lines = open(data).read().splitlines(keepends=True)
    bad.write_text("".join(lines[:49]) + "nonsense\n" + "".join(lines[50:]))
    results = run_checks(2, [check_two_rank_build], smollm2_dir, data, str(tmp_path / "two"), reference.folder,
                         str(bad))
    assert all(v is None for v in results.values()), results


def test_bad_data_ends_every_rank_with_one_line(smollm2_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"instruction": "a", "output": "b"}\n' * 30 + b'{"instruction": "\xfe", "output": "b"}\n')
    out = launch_ranks("solver_train.py", ["--ckpt_dir", smollm2_dir, "--train_file", str(bad), "--save_dir",
                                           str(tmp_path / "out"), "--use_chat_template"], world=2, timeout=120)
    for r in out:
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert f"{bad}:31: not valid UTF-8 (byte {36 * 30 + 17} of the file" in r.stderr, r.stderr


def test_mixture_proportions_follow_the_weights():
    ranges, weights = [(0, 100), (100, 130), (130, 400)], [0.5, 0.3, 0.2]
    order = mixture_order(ranges, weights, seed=3)
    for epoch in range(2):
        rows = order(epoch)
        assert len(rows) == 400
        counts = [int(((rows >= a) & (rows < b)).sum()) for a, b in ranges]
        assert counts == [200, 120, 80], counts
        # the down-sampled source's rows are distinct; the up-sampled one's cover all its rows
        part = rows[(rows >= 130)]
        assert len(set(part.tolist())) == 80 and len(set(rows[rows < 100].tolist())) == 100
    assert not (order(0) == order(1)).all() and (order(1) == mixture_order(ranges, weights, seed=3)(1)).all()


def synthetic_cache(root, n):
    """A cache of n tiny samples written by the cache's own writer (tokenizing 200k lines here takes minutes)."""
    tmp = os.path.join(root, f"c{n}")
    os.makedirs(tmp)
    writer = _PartWriter(os.path.join(tmp, "part-0-0"))
    for i in range(n):
        writer.add([i % 1000, 1, 2, 3, 4, 5, 6, 7], [-100, -100, -100, 4, 5, 6, 7, -100])
    writer.close()
    stats = DatasetStats(samples=n, tokens=8 * n)
    _join_parts(tmp, 1, 1, [stats], ["synthetic"], {})
    return tmp


def test_per_rank_memory_is_flat_in_the_dataset_size(tmp_path):
    import gc

    import psutil
    proc = psutil.Process()

    from llama_rlhf.data import TokenCache
    folders = {n: synthetic_cache(str(tmp_path), n) for n in (2_000, 200_000)}

    def growth(n):
        gc.collect()
        before = proc.memory_info().rss
        cache = TokenCache(folders[n])
        rows = CachedRows(cache, row_starts(cache.lengths(), 64, True))
        schedule = StepBatches(rows, 4, 2, 2, seed=1)
        for step in range(20):
            schedule.micro_batches(0, step, 1)
        return (proc.memory_info().rss - before) / 2 ** 20, len(rows)

    growth(2_000)  # warm-up: first-use allocations of numpy/torch
    small, _ = growth(2_000)
    large, n_rows = growth(200_000)
    print(f"\nRSS growth per rank: {small:.1f} MB at 2k samples, {large:.1f} MB at 200k samples ({n_rows} packed rows)")
    assert large < 16 and large - small < 12, (small, large)


def test_stream_packing_cuts_the_whole_token_stream_into_full_rows(tok, tmp_path):
    from llama_rlhf.data.packing import StreamRows
    texts = [" ".join(f"w{i}_{k}" for k in range(n)) for i, n in enumerate([3, 40, 7, 90, 1, 25])]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cache, _ = build(str(path), tok, tmp_path / "c", {**OPTS, "format": "text", "max_len": None})
    docs = [tok.encode(t, add_bos=tok.adds_bos) + [tok.eos_id] for t in texts]
    assert max(map(len, docs)) > 64, "one document must be longer than a row (not truncated)"
    stream = [t for d in docs for t in d]
    doc_of = [k for k, d in enumerate(docs) for _ in d]
    start_of = [sum(map(len, docs[:k])) for k in range(len(docs))]
    rows = StreamRows(cache, 64)
    assert len(rows) == -(-len(stream) // 64)
    for r in range(len(rows)):
        span = range(r * 64, min(r * 64 + 64, len(stream)))
        row = rows[r]
        assert row.ids == [stream[t] for t in span]
        assert row.labels == [stream[t + 1] if t + 1 < len(stream) and doc_of[t + 1] == doc_of[t] else -100
                              for t in span]
        assert row.positions == [t - max(span[0], start_of[doc_of[t]]) for t in span]
        assert row.segments == [doc_of[t] - doc_of[span[0]] for t in span]
