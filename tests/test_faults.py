"""Runs that survive preemption, crashes, hangs and full disks (issue 17), on a tiny model, DP=2 on gloo.

Every interrupted run is compared with one uninterrupted run of the same command: the losses of every step and the
final weights must be equal bit for bit (fp32, same layout).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

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
    return ["mpirun", "-np", "2", *root, "--oversubscribe", sys.executable, os.path.join(ROOT, "solver_train.py"),
            *args]


def mpi_free_env():
    env = _env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def start(cmd, env=None):
    return subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
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


def assert_same_run(save_dir, reference):
    losses, weights = reference
    got = [m["loss"] for m in metrics(save_dir)]
    assert [m["step"] for m in metrics(save_dir)] == list(range(1, STEPS + 1))
    assert got == losses, (got, losses)
    final = final_weights(save_dir)
    assert final.keys() == weights.keys()
    for key in weights:
        assert torch.equal(final[key], weights[key]), f"{key} differs from the uninterrupted run"


def interrupt_and_resume(cmd, save_dir, sig, env=None):
    """Start ``cmd``, send ``sig`` to the launcher after the first step, check the stop, then resume to the end."""
    proc = start(cmd, env)
    wait_for(lambda: steps_logged(save_dir) >= 1, proc)
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


def test_sigterm_under_torchrun_saves_and_resumes_exactly(tiny_model, small_data, reference, tmp_path):
    out = str(tmp_path / "run")
    interrupt_and_resume(torchrun_cmd(train_args(tiny_model, small_data, out)), out, signal.SIGTERM)
    assert_same_run(out, reference)


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
    worker = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[-1])
    os.kill(worker, signal.SIGKILL)
    code, out_text, err = finish(proc)
    assert code == 0, err[-3000:]
    assert "resumed from" in out_text and "lost a peer" in err
    assert_same_run(out, reference)  # the steps after checkpoint-2 that the first round logged were dropped
