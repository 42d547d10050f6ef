"""Multi-node launch on one machine: mpirun.sh + train-multi-node.sh (2 "nodes" x 2 processes) and the direct
start ``mpirun -np 2 python solver_{train,generate}.py`` must compute exactly what torchrun computes (same
losses, same greedy results file); bad input exits 2; shellcheck passes.

The two "nodes" are two OpenMPI slots on localhost (hostfile line ``localhost slots=2``): mpirun starts two
launcher processes, OMPI ranks 0 and 1, each running torchrun --nnodes 2 --node_rank R --nproc_per_node 2.
Extra mpirun options for unusual containers come from MPIRUN_ARGS (as for mpirun.sh).
"""
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from llama_rlhf.parallel.state import _master_address
from tests.distributed import free_port
from tests.hf_reference import write_tiny_chat_model
from tests.launch import ROOT, _env, torchrun

DATA = os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")
SHELL_SCRIPTS = ["mpirun.sh", "train-multi-node.sh", "scripts/setup.sh", ".ci/run",
                 *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "examples", "*.sh")))]


def mpi_env(**extra) -> dict:
    env = _env({"PYTHON": sys.executable, **extra})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in extra:
            env.pop(name, None)
    return env


def run(cmd, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env or mpi_env(), capture_output=True, text=True, timeout=timeout)


def direct_mpirun(script: str, args: list[str], np: int) -> subprocess.CompletedProcess:
    """``mpirun -np N python script args`` (no torchrun, no MASTER_ADDR: the ranks agree on it over MPI)."""
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    # --oversubscribe: CI machines may count fewer cores (OpenMPI's default slots) than ranks.
    cmd = ["mpirun", "-np", str(np), *root, "--oversubscribe", *shlex.split(os.environ.get("MPIRUN_ARGS", "")),
           sys.executable, os.path.join(ROOT, script), *args]
    return run(cmd)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    # weights large enough that greedy continuations differ between prompts
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")), smollm2_dir, seed=3,
                                 initializer_range=0.3)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(DATA) as f:
        path.write_text("".join(f.readlines()[:24]))
    return str(path)


def train_args(ckpt, data, save_dir, mp):
    return ["--model_parallel_size", str(mp), "--ckpt_dir", ckpt, "--train_file", data, "--save_dir", save_dir,
            "--use_chat_template", "true", "--max_seq_len", "128", "--max_batch_size", "2", "--lr", "3e-3",
            "--dtype", "float32", "--lr_scheduler", "constant", "--max_steps", "3", "--seed", "7"]


def losses(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_mpirun_sh_two_nodes_equals_one_torchrun(tiny_model, small_data, tmp_path):
    """2 nodes x 2 processes (MP=2, DP=2) through mpirun.sh == torchrun --nproc_per_node 4, exactly (fp32)."""
    ref, multi = str(tmp_path / "torchrun4"), str(tmp_path / "multi")
    proc = torchrun("solver_train.py", train_args(tiny_model, small_data, ref, 2), nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two 'nodes' on this machine: two launcher slots on localhost\nlocalhost slots=2\n")
    env = mpi_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    proc = run(["bash", "mpirun.sh", str(hostfile), "train-multi-node.sh",
                *train_args(tiny_model, small_data, multi, 2)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for node in (0, 1):  # two launchers, each one torchrun with 2 workers
        assert f"node {node}/2 on " in proc.stderr and f"--nnodes 2 --node_rank {node} --nproc_per_node 2" \
            in proc.stderr, proc.stderr[-3000:]
    assert "layout MP=2 SP=1 DP=2" in proc.stdout
    assert len(losses(ref)) == 3
    assert losses(multi) == losses(ref), (losses(multi), losses(ref))


def test_direct_mpirun_train_equals_torchrun(tiny_model, small_data, tmp_path):
    ref, direct = str(tmp_path / "torchrun2"), str(tmp_path / "direct")
    proc = torchrun("solver_train.py", train_args(tiny_model, small_data, ref, 2), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = direct_mpirun("solver_train.py", train_args(tiny_model, small_data, direct, 2), np=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout MP=2 SP=1 DP=1" in proc.stdout
    assert len(losses(ref)) == 3
    assert losses(direct) == losses(ref), (losses(direct), losses(ref))


def test_direct_mpirun_generate_equals_torchrun(tiny_model, tmp_path):
    """Greedy sampling at MP=2: ``mpirun -np 2 python solver_generate.py`` writes torchrun's results file."""
    prompts = tmp_path / "prompts.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "prompts.jsonl")) as f:
        prompts.write_text("".join(f.readlines()[:3]))

    def gen_args(log_dir):
        return ["--model_parallel_size", "2", "--ckpt_dir", tiny_model, "--label_file", str(prompts),
                "--log_dir", log_dir, "--use_chat_template", "true", "--temperature", "0", "--max_new_tokens", "8",
                "--max_seq_len", "128", "--dtype", "float32"]

    ref, direct = tmp_path / "torchrun2", tmp_path / "direct"
    proc = torchrun("solver_generate.py", gen_args(str(ref)), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = direct_mpirun("solver_generate.py", gen_args(str(direct)), np=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MP=2" in proc.stdout
    want = (ref / "results.jsonl").read_text()
    assert (direct / "results.jsonl").read_text() == want
    outputs = [json.loads(line)["output"][0] for line in want.splitlines()]
    assert len(outputs) == 3 and len(set(outputs)) == 3 and all(outputs), outputs


PROBE = """#!/usr/bin/env bash
echo "rank=$OMPI_COMM_WORLD_RANK size=$OMPI_COMM_WORLD_SIZE master=$MASTER_ADDR:$MASTER_PORT pwd=$PWD"
printf 'arg=%s\\n' "$@"
if [ "$OMPI_COMM_WORLD_RANK" = 1 ] && [ -n "${PROBE_FAIL:-}" ]; then exit "$PROBE_FAIL"; fi
"""


@pytest.fixture()
def probe(tmp_path):
    path = tmp_path / "probe.sh"
    path.write_text(PROBE)
    return str(path)


def test_mpirun_sh_passes_ranks_master_args_and_exit_status(probe, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("\n# comment\n  localhost slots=2   # two launchers here\n")
    proc = run(["bash", "mpirun.sh", str(hostfile), probe, "a b", "--flag", ""], env=mpi_env(MASTER_PORT="1234"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for rank in (0, 1):
        assert f"rank={rank} size=2 master=localhost:1234 pwd={ROOT}" in lines, proc.stdout
    assert lines.count("arg=a b") == 2 and lines.count("arg=--flag") == 2 and lines.count("arg=") == 2

    # the repo's own hostfile: one node, this machine, default port
    proc = run(["bash", "mpirun.sh", "hostfile", probe])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"rank=0 size=1 master=localhost:29500 pwd={ROOT}"

    # the exit status is the script's
    proc = run(["bash", "mpirun.sh", str(hostfile), probe], env=mpi_env(PROBE_FAIL="3"))
    assert proc.returncode == 3, (proc.returncode, proc.stderr)


def test_mpirun_sh_builds_the_mpirun_command(probe, tmp_path):
    """Hosts, slots, root flag, interface, ssh port, forwarded variables and extra options, via a fake mpirun."""
    fake = tmp_path / "fake-mpirun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1 # master\n10.0.0.2\n# node-c slots=1\n10.0.0.3 slots=1\n")
    env = mpi_env(MPIRUN=str(fake), NET_IFACE="ib0", SSH_PORT="2222", EXPORT_VARS="MY_VAR OTHER",
                  MY_VAR="x", NCCL_DEBUG="INFO", MPIRUN_ARGS="--oversubscribe --mca btl ^openib")
    proc = run(["bash", "mpirun.sh", str(hostfile), probe, "x y"], env=env)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()

    def option(name, *values):
        for i in range(len(argv) - len(values)):
            if argv[i:i + 1 + len(values)] == [name, *values]:
                return True
        return False

    assert option("-np", "3") and option("--hostfile", str(hostfile)) and option("--bind-to", "none")
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0)
    assert option("--mca", "btl_tcp_if_include", "ib0") and option("--mca", "oob_tcp_if_include", "ib0")
    assert option("--mca", "plm_rsh_args", "-p 2222")
    for name in ("MASTER_ADDR", "MASTER_PORT", "PATH", "PYTHONPATH", "MY_VAR", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
                 "GLOO_SOCKET_IFNAME"):
        assert option("-x", name), name
    assert not option("-x", "OTHER")  # named in EXPORT_VARS but not set
    assert option("--oversubscribe", "--mca", "btl", "^openib")
    assert argv[-3:] == ["bash", probe, "x y"]
    assert "master node-a:29500" in proc.stderr


@pytest.mark.parametrize("case", ["no-args", "missing-hostfile", "missing-script", "empty-hostfile", "bad-slots"])
def test_mpirun_sh_bad_input(case, probe, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n\n")
    bad = tmp_path / "bad"
    bad.write_text("localhost slots=two\n")
    args, expected = {
        "no-args": ([], "need a HOSTFILE and a SCRIPT"),
        "missing-hostfile": ([str(tmp_path / "nope"), probe], f"hostfile not found: {tmp_path / 'nope'}"),
        "missing-script": (["hostfile", str(tmp_path / "nope.sh")], f"script not found: {tmp_path / 'nope.sh'}"),
        "empty-hostfile": ([str(empty), probe], f"hostfile lists no hosts: {empty}"),
        "bad-slots": ([str(bad), probe], "bad slot count for localhost: 'two'"),
    }[case]
    proc = run(["bash", "mpirun.sh", *args])
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "usage: bash mpirun.sh HOSTFILE SCRIPT" in proc.stderr and expected in proc.stderr, proc.stderr


def test_train_multi_node_needs_the_launcher():
    proc = run(["bash", "train-multi-node.sh"])
    assert proc.returncode != 0 and "OMPI_COMM_WORLD_RANK" in proc.stderr and "mpirun.sh" in proc.stderr


def test_master_address_choice():
    assert _master_address(["a", "a", "a"]) == "127.0.0.1"  # one host: loopback
    try:
        addr = _master_address(["a", "b"])
    except RuntimeError as exc:  # a machine without a routable address must say what to export
        assert "MASTER_ADDR" in str(exc)
    else:
        parts = addr.split(".")
        assert len(parts) == 4 and all(p.isdigit() for p in parts) and parts[0] != "127", addr


def test_shellcheck():
    assert shutil.which("shellcheck"), "shellcheck missing: bash scripts/setup.sh --dev installs it"
    proc = run(["shellcheck", *SHELL_SCRIPTS])
    assert proc.returncode == 0, proc.stdout + proc.stderr
