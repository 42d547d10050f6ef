"""Experiment logging and plots: the same record in metrics.jsonl, TensorBoard event files (read back with
tensorboard's own EventAccumulator) and an offline wandb run; rank 0 only; bad --report_to refused at start-up;
python -m llama_rlhf.plot writes a PNG for an SFT and a GRPO log."""
import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

import pytest

from llama_rlhf.parallel.state import single_process_state
from llama_rlhf.runtime import UsageError
from llama_rlhf.training import metrics as metrics_mod
from llama_rlhf.training.metrics import MetricsLog, parse_report_to
from tests.launch import ROOT, launch_ranks

RECORDS = [{"step": s, "loss": 2.0 / s, "lr": 1e-4 * s, "reward/accuracy": 0.25 * s, "skipped": False,
            "samples": [f"answer {s}", "second"]} for s in (1, 2, 3)]


def wandb_records(path):
    """The protobuf records of a .wandb transaction log (leveldb log format: 7-byte file header, 32 KiB blocks,
    7-byte record headers crc32/length/type; type 1 full, 2 first, 3 middle, 4 last), parsed with wandb's own
    message definitions."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, pos, part, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def test_parse_report_to(monkeypatch):
    assert parse_report_to(None) == ("jsonl",) and parse_report_to("jsonl") == ("jsonl",)
    assert parse_report_to("tensorboard, wandb,tensorboard") == ("jsonl", "tensorboard", "wandb")
    with pytest.raises(UsageError, match="--report_to 'mlflow' is not one of jsonl, tensorboard, wandb"):
        parse_report_to("tensorboard,mlflow")
    monkeypatch.setitem(metrics_mod.REPORT_TO, "wandb", "no_such_package_xyz")
    with pytest.raises(UsageError, match="--report_to wandb needs the no_such_package_xyz package"):
        parse_report_to("wandb")


def test_sinks_hold_the_jsonl_record(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_dir = str(tmp_path / "run")
    log = MetricsLog(log_dir, single_process_state(), report_to=("jsonl", "tensorboard", "wandb"),
                     config={"lr": 1e-4, "seed": 3})
    for record in RECORDS:
        log.write(dict(record))
    log.close()
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    memory = ("peak_memory_mb", "memory_before_model_mb")
    assert [{k: v for k, v in r.items() if k not in memory} for r in lines] == RECORDS
    assert all(r["peak_memory_mb"] > 0 for r in lines)

    events = glob.glob(os.path.join(log_dir, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(os.path.join(log_dir, "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "lr", "reward/accuracy", *memory}
    for key in ("loss", "lr", "reward/accuracy", "peak_memory_mb"):
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        want = [(r["step"], r[key]) for r in lines]
        assert [s for s, _ in got] == [s for s, _ in want], key
        for (_, a), (_, b) in zip(got, want):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (key, a, b)  # event files hold float32
    assert "samples/text_summary" in acc.Tags()["tensors"]
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples/text_summary")]
    assert texts == [f"answer {s}\n\nsecond" for s in (1, 2, 3)]

    runs = glob.glob(os.path.join(log_dir, "wandb", "offline-run-*"))
    assert len(runs) == 1, os.listdir(log_dir)
    files = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    assert len(files) == 1
    deadline = time.time() + 30  # wandb-core (its own process) may still be flushing the log after finish()
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(files[0])) and time.time() < deadline:
        time.sleep(0.5)
    records = wandb_records(files[0])
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    history = [{key(i): json.loads(i.value_json) for i in r.history.item if not key(i).startswith("_")}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert history == [{**{k: v for k, v in line.items() if k not in ("step", "skipped", "samples")},
                        "samples": "\n\n".join(line["samples"])} for line in lines]
    steps = [json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "history"
             for i in r.history.item if key(i) == "_step"]
    assert steps == [1, 2, 3]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["seed"] == 3 and config["lr"] == 1e-4
    print(f"\nTensorBoard scalars {sorted(acc.Tags()['scalars'])} at steps "
          f"{[e.step for e in acc.Scalars('loss')]}; wandb offline run {os.path.basename(runs[0])}")


def test_other_ranks_write_nothing(tmp_path):
    ps = dataclasses.replace(single_process_state(), rank=1)  # world_size 1: no collective, rank 1's view
    log = MetricsLog(str(tmp_path / "run"), ps, report_to=("jsonl", "tensorboard"))
    assert log.sinks == []
    log.write(dict(RECORDS[0]))
    assert not os.path.exists(tmp_path / "run")


def test_unknown_report_to_fails_every_rank_at_start_up(tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n')
    start = time.time()
    results = launch_ranks("solver_train.py", ["--ckpt_dir", str(tmp_path / "no_model"), "--train_file", str(train),
                                               "--save_dir", str(tmp_path / "out"), "--report_to", "tensorboard,tb"],
                           world=2, timeout=120)
    assert time.time() - start < 60
    for rank, r in enumerate(results):
        assert r.returncode != 0, f"rank {rank} exited 0"
        assert f"[rank {rank}] error: --report_to 'tb' is not one of jsonl, tensorboard, wandb" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


SFT = [{"step": s, "epoch": 0, "loss": 3.0 / s, "lr": 1e-4, "grad_norm": 1.0 / s, "tokens_per_s": 100.0 + s,
        **({"eval_loss": 2.5 / s} if s % 2 == 0 else {})} for s in range(1, 7)]
GRPO = ([{"step": 0, "eval/accuracy": 0.1, "eval/mean@4": 0.1, "eval/pass@1": 0.1, "eval/pass@4": 0.3}]
        + [{"step": s, "reward_mean": 0.2 * s, "reward/accuracy": 0.1 * s, "reward//x/r.py:fn": 0.1, "kl": 0.01 * s,
            "clip_low": 0.0, "clip_high": 0.01, "completion_len_mean": 20.0 - s, "completion_len_max": 32,
            "loss": 0.1, **({"eval/accuracy": 0.1 * s, "eval/mean@4": 0.1 * s, "eval/pass@1": 0.1 * s,
                            "eval/pass@4": 0.2 * s} if s % 2 == 0 else {})} for s in range(1, 5)])


@pytest.mark.parametrize("kind,records", [("sft", SFT), ("grpo", GRPO)])
def test_plot_writes_a_png(tmp_path, kind, records):
    import matplotlib.image

    from llama_rlhf.plot import panels
    log_dir = tmp_path / kind
    log_dir.mkdir()
    (log_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    got_kind, chosen = panels(records)
    assert got_kind == kind
    titles = dict(chosen)
    if kind == "sft":
        assert titles["loss"] == ["loss", "eval_loss"] and titles["gradient norm"] == ["grad_norm"]
    else:
        assert titles["reward"] == ["reward_mean", "reward/accuracy", "reward//x/r.py:fn"]
        assert titles["held-out accuracy"] == ["eval/mean@4", "eval/pass@1", "eval/pass@4"]
    out = tmp_path / f"{kind}.png"
    proc = subprocess.run([sys.executable, "-m", "llama_rlhf.plot", str(log_dir), "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(out))
    assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.01  # drawn, not blank


def test_plot_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llama_rlhf.plot", str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"data file not found: {tmp_path}/metrics.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr
