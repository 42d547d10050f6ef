"""Device choice under torchrun, mpirun, srun and one-GPU-per-process launches (fake device counts), the
process-group backend on CUDA, and no NCCL communicator for one-rank groups."""
import pytest
import torch
import torch.distributed as dist

from llama_rlhf.parallel import state
from llama_rlhf.parallel.state import LayoutError, ParallelState, cuda_index, launch_env, pick_device

LAUNCHERS = {  # environment -> (rank, world, local rank)
    "torchrun": ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, (5, 8, 1)),
    "mpirun": ({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2"},
               (6, 8, 2)),
    "torchrun under mpirun.sh": ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "OMPI_COMM_WORLD_RANK": "0",
                                  "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, (3, 8, 3)),
    "srun with RANK/WORLD_SIZE exported": ({"RANK": "7", "WORLD_SIZE": "8", "SLURM_LOCALID": "3",
                                            "SLURM_PROCID": "7"}, (7, 8, 3)),
    "RANK/WORLD_SIZE only": ({"RANK": "6", "WORLD_SIZE": "8"}, (6, 8, None)),
    "plain python": ({}, (0, 1, 0)),
}


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "SLURM_PROCID",
                 "MPI_LOCALRANKID", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launch_env(clean_env, launcher):
    env, expected = LAUNCHERS[launcher]
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert launch_env() == expected


def fake_cuda(monkeypatch, count):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("launcher,visible,index", [
    ("torchrun", 4, 1), ("mpirun", 4, 2), ("srun with RANK/WORLD_SIZE exported", 4, 3),
    ("RANK/WORLD_SIZE only", 4, 2),  # global rank 6 on 4-GPU nodes: GPU 2, not every rank on GPU 0
    ("torchrun", 1, 0), ("mpirun", 1, 0), ("srun with RANK/WORLD_SIZE exported", 1, 0),  # one GPU per process
])
def test_pick_device_on_fake_gpus(clean_env, launcher, visible, index):
    env, _ = LAUNCHERS[launcher]
    for k, v in env.items():
        clean_env.setenv(k, v)
    chosen = fake_cuda(clean_env, visible)
    rank, _, local_rank = launch_env()
    assert pick_device(local_rank, rank) == torch.device("cuda", index)
    assert chosen == [index]


def test_more_ranks_than_gpus_is_one_line(clean_env):
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(LayoutError, match=r"local rank 3 has no GPU: this process sees 2 GPUs .*--nproc_per_node 2"):
        cuda_index(3, 3, 2)


def test_cuda_process_group_has_gloo_for_host_objects(clean_env):
    fake_cuda(clean_env, 2)
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    seen = {}

    class Started(Exception):
        pass

    def init_process_group(backend, **kwargs):
        seen.update(backend=backend, **kwargs)
        raise Started

    clean_env.setattr(dist, "is_initialized", lambda: False)
    clean_env.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(Started):
        state.init_parallel(1, 1)
    assert seen["backend"] == "cpu:gloo,cuda:nccl" and seen["device_id"] == torch.device("cuda", 1)
    assert seen["rank"] == 1 and seen["world_size"] == 2


def test_one_rank_groups_get_no_nccl_communicator(monkeypatch):
    made = []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "new_group", lambda ranks, backend=None, **_: made.append((tuple(ranks), backend)) or
                        object())
    ParallelState.build(mp=2, sp=2)  # DP = 1: the DP groups have one rank each
    assert {b for r, b in made if len(r) == 1} == {"gloo"} and len([r for r, _ in made if len(r) == 1]) == 4
    assert {b for r, b in made if len(r) > 1} == {None}  # the default (cpu:gloo,cuda:nccl on GPU)


@pytest.mark.parametrize("torch_sees,nproc", [("3", "3"), ("0", "1")])
def test_train_multi_node_counts_the_gpus_torch_sees(tmp_path, torch_sees, nproc):
    """The default --nproc_per_node is torch.cuda.device_count() (CUDA_VISIBLE_DEVICES respected), 1 without GPUs."""
    import os
    import subprocess
    fake = tmp_path / "python"  # answers the device-count question, then echoes the torchrun command
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then echo {torch_sees}; else echo "$@"; fi\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "NPROC_PER_NODE"}
    env.update(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", PYTHON=str(fake))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(["bash", os.path.join(root, "train-multi-node.sh"), "--x", "y z"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"--nproc_per_node {nproc} " in proc.stdout and proc.stdout.rstrip().endswith("--x y z"), proc.stdout
