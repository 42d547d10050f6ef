"""Runs that survive preemption, crashes, hangs and full disks (issue 17), on a tiny model, DP=2 on gloo.

Every interrupted run is compared with one uninterrupted run of the same command: the losses of every step and the
final weights must be equal bit for bit (fp32, same layout).
"""
import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from llama_rlhf.parallel.state import single_process_state
from llama_rlhf.training.checkpointing import checkpoint_problem
from tests.distributed import free_port
from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, _env, launch_ranks
from tests.test_train import expect_failure_on_every_rank

DATA = os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")
STEPS = 6  # 24 rows / (2 rows x DP 2) = 6 steps in the epoch


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(DATA) as f:
        path.write_text("".join(f.readlines()[:24]))
    return str(path)


def train_args(ckpt, data, save_dir, *extra):
    return ["--ckpt_dir", ckpt, "--train_file", data, "--save_dir", save_dir, "--use_chat_template", "true",
            "--max_seq_len", "128", "--max_batch_size", "2", "--lr", "3e-3", "--dtype", "float32",
            "--lr_scheduler", "constant", "--max_steps", str(STEPS), "--resume", "true", *extra]


def torchrun_cmd(args, *launcher):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), *launcher, os.path.join(ROOT, "solver_train.py"), *args]


def mpirun_cmd(args):
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return ["mpirun", "-np", "2", *root, "--oversubscribe", *shlex.split(os.environ.get("MPIRUN_ARGS", "")),
            sys.executable, os.path.join(ROOT, "solver_train.py"), *args]


def mpi_free_env():
    env = _env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def start(cmd, env=None, preexec_fn=None):
    return subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec_fn)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early: {(proc.communicate()[1] or '')[-3000:]}"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def metrics(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def steps_logged(save_dir):
    path = os.path.join(save_dir, "metrics.jsonl")
    return len(metrics(save_dir)) if os.path.isfile(path) else 0


def final_weights(save_dir):
    return load_file(os.path.join(save_dir, f"checkpoint-{STEPS}", "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_model, small_data, tmp_path_factory):
    """The uninterrupted run: (losses per step, final weights)."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    code, _, err = finish(start(torchrun_cmd(train_args(tiny_model, small_data, out))))
    assert code == 0, err[-3000:]
    return [m["loss"] for m in metrics(out)], final_weights(out)


@pytest.fixture(scope="module", autouse=True)
def stopped_peer(tiny_model, small_data, tmp_path_factory):
    """A worker stopped with SIGSTOP under --distributed_timeout_minutes 0.5, started before the other tests and
    checked by the last one (the job spends its minute waiting, so the other tests run meanwhile)."""
    folder = tmp_path_factory.mktemp("stopped_peer")
    out = str(folder / "run")
    args = train_args(tiny_model, small_data, out, "--distributed_timeout_minutes", "0.5", "--epochs", "1000")
    args = args[:args.index("--max_steps")] + args[args.index("--max_steps") + 2:]  # would run for hours
    stderr = folder / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(torchrun_cmd(args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    wait_for(lambda: steps_logged(out) >= 1, proc)
    workers = workers_of(proc)
    os.kill(workers[-1], signal.SIGSTOP)
    state = {"proc": proc, "workers": workers, "stderr": stderr, "stopped_at": time.time()}

    def wait():
        proc.wait()
        state["ended_at"] = time.time()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    state["waiter"] = waiter
    yield state
    if proc.poll() is None:  # the checking test did not run (-k): end the job
        for pid in [proc.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def assert_same_run(save_dir, reference):
    losses, weights = reference
    got = [m["loss"] for m in metrics(save_dir)]
    assert [m["step"] for m in metrics(save_dir)] == list(range(1, STEPS + 1))
    assert got == losses, (got, losses)
    final = final_weights(save_dir)
    assert final.keys() == weights.keys()
    for key in weights:
        assert torch.equal(final[key], weights[key]), f"{key} differs from the uninterrupted run"


def workers_of(proc) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                           text=True).stdout.split()]


def interrupt_and_resume(cmd, save_dir, sig, env=None, one_worker=False):
    """Start ``cmd``, send ``sig`` to the launcher (or to its last worker only) after the first step, check the
    stop, then resume to the end."""
    proc = start(cmd, env)
    wait_for(lambda: steps_logged(save_dir) >= 1, proc)
    if one_worker:
        os.kill(workers_of(proc)[-1], sig)
    else:
        proc.send_signal(sig)
    t0 = time.time()
    code, out, err = finish(proc)
    stopped_in = time.time() - t0
    assert code != 0, "a stopped run must exit non-zero"
    saved = [n for n in os.listdir(save_dir) if n.startswith("checkpoint-")]
    assert len(saved) == 1, saved
    step = int(saved[0].split("-")[1])
    assert 1 <= step < STEPS and steps_logged(save_dir) == step
    name = signal.Signals(sig).name
    assert (f"stopped by {name} after step {step}/{STEPS}: saved {os.path.join(save_dir, saved[0])}; to "
            f"continue, run the same command with --resume true") in err, err[-3000:]
    assert not [n for n in os.listdir(save_dir) if n.endswith(".tmp")]
    code, out, err = finish(start(cmd, env))
    assert code == 0, err[-3000:]
    assert f"resumed from {os.path.join(save_dir, saved[0])} at step {step}" in out
    print(f"{name}: stopped after step {step} in {stopped_in:.1f}s, resumed to step {STEPS}")


def test_sigterm_to_one_worker_under_torchrun_stops_every_rank_and_resumes_exactly(tiny_model, small_data,
                                                                                   reference, tmp_path):
    """Only rank 1 gets the signal (as when it reaches one node): rank 0 learns of it from the per-step
    all-reduce, both save the same step (a complete checkpoint needs both), and rank 0 says where."""
    out = str(tmp_path / "run")
    interrupt_and_resume(torchrun_cmd(train_args(tiny_model, small_data, out)), out, signal.SIGTERM,
                         one_worker=True)
    assert_same_run(out, reference)


def test_second_signal_exits_at_once(monkeypatch):
    from llama_rlhf.training import preemption
    exits, now = [], [100.0]
    monkeypatch.setattr(preemption.os, "_exit", exits.append)
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    stop = preemption.StopRequests()
    stop._on_signal(signal.SIGTERM, None)
    assert stop.signum == signal.SIGTERM and not exits
    now[0] += 0.5  # a launcher forwarding the same request: still one request
    stop._on_signal(signal.SIGTERM, None)
    assert not exits
    now[0] += 2.0
    stop._on_signal(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


def test_sigusr1_under_direct_mpirun_saves_and_resumes_exactly(tiny_model, small_data, reference, tmp_path):
    """mpirun forwards SIGUSR1 to every rank and waits for them (its SIGTERM kills the ranks within a second)."""
    out = str(tmp_path / "run")
    interrupt_and_resume(mpirun_cmd(train_args(tiny_model, small_data, out)), out, signal.SIGUSR1, mpi_free_env())
    assert_same_run(out, reference)


def test_worker_killed_under_max_restarts_completes_like_an_uninterrupted_run(tiny_model, small_data, reference,
                                                                             tmp_path):
    """torchrun's default rendezvous: the second round used to fail in gloo's connectFullMesh."""
    out = str(tmp_path / "run")
    proc = start(torchrun_cmd(train_args(tiny_model, small_data, out, "--save_steps", "2"), "--max_restarts", "1"))
    wait_for(lambda: steps_logged(out) >= 3, proc)
    os.kill(workers_of(proc)[-1], signal.SIGKILL)
    code, out_text, err = finish(proc)
    assert code == 0, err[-3000:]
    assert "resumed from" in out_text and "lost a peer" in err
    assert_same_run(out, reference)  # the steps after checkpoint-2 that the first round logged were dropped


def checkpoints_in(save_dir):
    """Checkpoints and temporary checkpoint folders in ``save_dir``."""
    return sorted(n for n in os.listdir(save_dir) if n.startswith(("checkpoint-", ".checkpoint-")))


def free_space_run(tiny_model, small_data, save_dir, steps, **env):
    args = train_args(tiny_model, small_data, save_dir, "--save_steps", "2")
    args[args.index("--max_steps") + 1] = str(steps)
    return launch_ranks_env("solver_train.py", args, env)


def launch_ranks_env(script, args, env):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return launch_ranks(script, args, world=2, timeout=180)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_full_disk_and_failed_writes_leave_earlier_checkpoints_intact(tiny_model, small_data, tmp_path):
    out = str(tmp_path / "run")
    results = free_space_run(tiny_model, small_data, out, 2)
    assert all(r.returncode == 0 for r in results), results[0].stderr[-3000:]
    good = os.path.join(out, "checkpoint-2")
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(good) for f in fs)

    # the free-space check: nothing written, both numbers on every rank
    results = free_space_run(tiny_model, small_data, out, 4, LLAMA_RLHF_FREE_BYTES="1000000")
    expect_failure_on_every_rank(results, "checkpoint-4 needs about", f"but {out} has 1.0 MiB (1,000,000 bytes) free",
                                 "--save_total_limit")
    needed = int(results[0].stderr.split("needs about ")[1].split("(")[1].split(" bytes")[0].replace(",", ""))
    assert abs(needed - on_disk) <= 0.01 * on_disk, (needed, on_disk)  # the estimate is within 1% of a real save
    assert checkpoints_in(out) == ["checkpoint-2"]

    # a write that fails anyway (a 20 MB file-size limit: EFBIG): the path, the bytes, the OS error
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))

    proc = start(torchrun_cmd(train_args(tiny_model, small_data, out, "--save_steps", "2")),
                 preexec_fn=limit_file_size)
    code, _, err = finish(proc)
    assert code != 0
    lines = {rank: next((line for line in err.splitlines()
                         if line.startswith(f"[rank {rank}] error: could not write ")), None) for rank in (0, 1)}
    # rank 0 always reports; its peer's line is checked when present: torchrun stops the peer as soon as rank 0
    # exits non-zero, and one loaded full-suite run had no rank-1 line (the cause was not pinned down further)
    assert lines[0] is not None, err[-3000:]
    for line in filter(None, lines.values()):
        assert "/.checkpoint-4.tmp/" in line and " bytes): " in line and "File too large" in line, line
        assert "checkpoint-4 not saved (removed" in line and "earlier checkpoints are intact" in line, line
    assert "Traceback" not in err.split("[rank")[1]
    assert checkpoints_in(out) == ["checkpoint-2"]
    assert checkpoint_problem(good, single_process_state()) is None
    print(f"disk: estimate {needed:,} bytes vs {on_disk:,} on disk")


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_model, small_data, reference, tmp_path):
    out = str(tmp_path / "run")
    results = free_space_run(tiny_model, small_data, out, 4)
    assert all(r.returncode == 0 for r in results), results[0].stderr[-3000:]
    ps = single_process_state()
    damaged = os.path.join(out, "checkpoint-4", "training_state", "optim-00001.pt")
    size = os.path.getsize(damaged)
    with open(damaged, "r+b") as f:
        f.truncate(size // 2)
    assert checkpoint_problem(os.path.join(out, "checkpoint-4"), ps) == \
        f"training_state/optim-00001.pt: {size // 2:,} bytes, the manifest says {size:,}"
    # a flipped byte keeps the size: the checksum finds it
    copy = str(tmp_path / "copy")
    shutil.copytree(os.path.join(out, "checkpoint-2"), copy)
    with open(os.path.join(copy, "model.safetensors"), "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert checkpoint_problem(copy, ps) == "model.safetensors: its CRC-32 differs from the manifest's"

    code, out_text, err = finish(start(torchrun_cmd(train_args(tiny_model, small_data, out))))
    assert code == 0, err[-3000:]
    assert (f"warning: {out}/checkpoint-4 is damaged (training_state/optim-00001.pt: {size // 2:,} bytes, the "
            f"manifest says {size:,}); resuming from {out}/checkpoint-2 instead") in out_text, out_text[-3000:]
    assert f"resumed from {out}/checkpoint-2 at step 2" in out_text
    assert_same_run(out, reference)


def broken_json_copy(src, dst, name):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, name), "w") as f:
        f.write('{"model_type": "llama",\n  "oops"\n')
    return dst


PARSE_ERRORS = [
    ("solver_train", ["--lr", "-1"], "--lr -1.0 is not valid: it must be >= 0"),
    ("solver_train", ["--adam_beta1", "1"], "--adam_beta1 1.0 is not valid: it must be in [0, 1)"),
    ("solver_train", ["--adam_beta2", "-0.5"], "--adam_beta2 -0.5 is not valid: it must be in [0, 1)"),
    ("solver_train", ["--weight_decay", "nan"], "--weight_decay nan is not valid: it must be >= 0"),
    ("solver_train", ["--max_grad_norm", "-1"], "--max_grad_norm -1.0 is not valid: it must be >= 0 (0: no clipping)"),
    ("solver_train", ["--distributed_timeout_minutes", "0"], "--distributed_timeout_minutes 0.0 is not valid"),
    ("solver_grpo", ["--epsilon", "-0.2"], "--epsilon -0.2 is not valid: it must be >= 0"),
    ("solver_grpo", ["--top_p", "1.5"], "--top_p 1.5 is not valid: it must be in (0, 1] (1: off)"),
    ("solver_grpo", ["--lr", "inf"], "--lr inf is not valid"),
    ("solver_generate", ["--top_k", "-2"], "--top_k -2 is not valid: it must be >= 0 (0: off)"),
    ("solver_generate", ["--temperature", "-1"], "--temperature -1.0 is not valid: it must be >= 0 (0: greedy)"),
    ("solver_generate", ["--max_new_tokens", "0"], "--max_new_tokens 0 is not valid: it must be >= 1"),
]


def test_invalid_numbers_are_refused_when_parsed():
    import importlib

    from llama_rlhf.runtime import UsageError
    required = {"solver_train": ["--ckpt_dir", "c", "--train_file", "t", "--save_dir", "s"],
                "solver_grpo": ["--ckpt_dir", "c", "--train_file", "t", "--save_dir", "s"],
                "solver_generate": ["--ckpt_dir", "c", "--label_file", "t", "--log_dir", "s"]}
    for solver, flags, message in PARSE_ERRORS:
        with pytest.raises(UsageError) as info:
            importlib.import_module(solver).parse_args(required[solver] + flags)
        assert str(info.value) == message or str(info.value).startswith(message), (flags, str(info.value))
    for solver, flags in required.items():  # the defaults pass, fractions of a minute too
        importlib.import_module(solver).parse_args(flags + ["--distributed_timeout_minutes", "0.5"])


@pytest.mark.parametrize("solver, extra, fragments", [
    ("solver_grpo.py", ["--num_samples_per_prompt", "1"], ["--num_samples_per_prompt 1: GRPO compares",
                                                          "--num_samples_per_prompt 2 or more"]),
    ("solver_train.py", ["config.json"], ["config.json: not valid JSON", "line 3 column 1"]),
    ("solver_train.py", ["tokenizer_config.json"], ["tokenizer_config.json: not valid JSON", "line 3 column 1"]),
], ids=["grpo_group_of_one", "config_json", "tokenizer_config_json"])
def test_bad_input_is_one_line_on_every_rank(solver, extra, fragments, tiny_model, small_data, tmp_path):
    ckpt = tiny_model
    if extra[0].endswith(".json"):
        ckpt, extra = broken_json_copy(tiny_model, str(tmp_path / "ckpt"), extra[0]), []
    out = str(tmp_path / "out")
    t0 = time.time()
    results = launch_ranks(solver, ["--ckpt_dir", ckpt, "--model_type", "llama-hf", "--train_file", small_data,
                                    "--save_dir", out, *extra], world=2, timeout=60)
    expect_failure_on_every_rank(results, *fragments)
    for r in results:
        assert "Traceback" not in r.stderr and len([x for x in r.stderr.splitlines() if "error" in x]) == 1, r.stderr
    assert time.time() - t0 < 60


def test_generation_in_chunks_changes_no_result(tiny_model, tmp_path, monkeypatch):
    """solver_generate's replicas meet after every chunk of prompts (so no collective waits for the rest of a long
    job); sampled results are keyed by prompt, so one chunk per prompt writes the same file as one chunk in all."""
    import solver_generate
    from llama_rlhf.inference import batch_generate
    from llama_rlhf.models.pretrained import load_pretrained
    from llama_rlhf.tokenizer import load_tokenizer
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 3}."}) + "\n" for i in range(5)))
    ps = single_process_state()
    model = load_pretrained(tiny_model, "llama-hf", ps).eval()
    tok = load_tokenizer(tiny_model)
    written = []
    for batches in (batch_generate.SYNC_CHUNK_BATCHES, 1):
        monkeypatch.setattr(batch_generate, "SYNC_CHUNK_BATCHES", batches)
        args = solver_generate.parse_args(["--ckpt_dir", tiny_model, "--label_file", str(prompts), "--log_dir",
                                           str(tmp_path / f"chunks{batches}"), "--max_batch_size", "1",
                                           "--temperature", "1.0", "--num_samples_per_prompt", "2",
                                           "--max_new_tokens", "6", "--max_seq_len", "64", "--dtype", "float32"])
        with open(batch_generate.run_generation(args, model, tok, ps, torch.float32)) as f:
            written.append(f.read())
    assert written[0] == written[1] and len(written[0].splitlines()) == 5


def test_stopped_peer_ends_the_job_within_the_timeout(stopped_peer):
    """(Last in the file: the job started before the first test.) Rank 0's collective times out after 0.5 minutes
    and names the flag; torchrun then ends the stopped worker (SIGKILL after its 30 s shutdown wait)."""
    stopped_peer["waiter"].join(timeout=max(1.0, 150 - (time.time() - stopped_peer["stopped_at"])))
    proc = stopped_peer["proc"]
    assert proc.poll() is not None, "the job still holds on, 150 s after a worker was stopped"
    gone_in = stopped_peer["ended_at"] - stopped_peer["stopped_at"]
    assert proc.returncode != 0
    assert gone_in <= 90, f"the job held on for {gone_in:.0f}s"
    for pid in stopped_peer["workers"]:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid
    err = stopped_peer["stderr"].read_text()
    lines = [line for line in err.splitlines() if "timed out after --distributed_timeout_minutes 0.5" in line]
    assert lines and lines[0].startswith("[rank 0] error: a collective ("), err[-3000:]
    print(f"SIGSTOP: every process gone {gone_in:.0f}s after the stop; {lines[0]}")
