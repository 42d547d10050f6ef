"""ParallelState: the rank grid, its process groups, and process-group start-up.

Ranks are laid out as ``arange(world).view(DP, SP, MP)``: model-parallel (MP) peers are neighbouring
ranks (fastest links), then sequence-parallel (SP) peers, then data-parallel (DP) replicas.
Every group is created on every rank in the same order, and the state is passed explicitly.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .layout import LayoutError, check_layout  # noqa: F401 (LayoutError: re-exported)


def rank_grid(world_size: int, mp: int, sp: int) -> torch.Tensor:
    """The [DP, SP, MP] grid of global ranks."""
    dp = check_layout(world_size, mp, sp)
    return torch.arange(world_size).view(dp, sp, mp)


@dataclass
class ParallelState:
    """Where this rank sits in the (DP, SP, MP) grid, and the groups it talks over."""

    world_size: int
    rank: int
    mp_size: int
    sp_size: int
    dp_size: int
    mp_rank: int
    sp_rank: int
    dp_rank: int
    device: torch.device
    mp_group: object = None
    sp_group: object = None
    dp_group: object = None
    dpsp_group: object = None  # gradients are reduced over DP x SP (all hold the same weights)
    mp_ranks: list = field(default_factory=list)  # global ranks of my MP group, by mp_rank
    sp_ranks: list = field(default_factory=list)  # global ranks of my SP ring, by sp_rank
    _subgroups: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, mp: int, sp: int, device: torch.device | None = None,
              timeout: datetime.timedelta | None = None) -> "ParallelState":
        """Create every group of the grid (on every rank, same order) and return this rank's state.
        ``timeout`` bounds every collective on the groups (new_group does not inherit the default group's)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        grid = rank_grid(world, mp, sp)
        dp = grid.shape[0]
        d, s, m = (int(i) for i in (grid == rank).nonzero()[0])
        state = cls(world, rank, mp, sp, dp, m, s, d, device or torch.device("cpu"))

        def make(groups):
            mine = None
            for ranks in groups:
                ranks = [int(r) for r in ranks]
                # a group of one rank never communicates (every primitive checks its size): gloo, so NCCL builds
                # no communicator for it
                group = (dist.group.WORLD if len(ranks) == world else
                         dist.new_group(ranks, timeout=timeout, backend="gloo" if len(ranks) == 1 else None))
                if rank in ranks:
                    mine = (group, ranks)
            return mine

        state.mp_group, state.mp_ranks = make(grid[i, j, :] for i in range(dp) for j in range(sp))
        state.sp_group, state.sp_ranks = make(grid[i, :, k] for i in range(dp) for k in range(mp))
        state.dp_group, _ = make(grid[:, j, k] for j in range(sp) for k in range(mp))
        state.dpsp_group, _ = make(grid[:, :, k].flatten() for k in range(mp))
        for size in range(2, mp):  # every possible replicated-KV subgroup, made now while all ranks are here
            if mp % size == 0:
                state._subgroups[size], _ = make(grid.reshape(-1, size))
        return state

    @property
    def mp_src(self) -> int:
        """Global rank of MP rank 0 in my MP group (the rank whose sampled tokens everyone takes)."""
        return self.mp_ranks[0]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mp_subgroup(self, size: int):
        """Group of ``size`` consecutive MP ranks containing me (e.g. the ranks sharing a replicated KV head)."""
        if size == 1 or size == self.mp_size:
            return None if size == 1 else self.mp_group
        if size not in self._subgroups:
            raise ValueError(f"no MP subgroup of size {size}: it must divide --model_parallel_size {self.mp_size}")
        return self._subgroups[size]


def single_process_state(device: torch.device | None = None) -> ParallelState:
    """A 1x1x1 state for code paths that run without torch.distributed (tests, tools)."""
    return ParallelState(1, 0, 1, 1, 1, 0, 0, 0, device or torch.device("cpu"), mp_ranks=[0], sp_ranks=[0])


LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID")


def local_rank_from_env(env) -> int | None:
    """This process's rank on its node as torchrun, OpenMPI, SLURM's srun or MPICH set it; None if none did."""
    for name in LOCAL_RANK_VARIABLES:
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return None


def launch_env() -> tuple[int, int, int | None]:
    """(rank, world_size, local_rank) from torchrun's or OpenMPI's environment; (0, 1, 0) when neither is set.

    torchrun's variables win: under mpirun.sh every torchrun worker also inherits its launcher's OMPI_* values.
    The local rank is None when a launcher set RANK/WORLD_SIZE but no local rank (see ``cuda_index``).
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), local_rank_from_env(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    return 0, 1, 0


def started_by_mpirun() -> bool:
    """True for a direct start (``mpirun -np N python solver.py``): OpenMPI's rank variables, no torchrun ones."""
    env = os.environ
    return "OMPI_COMM_WORLD_RANK" in env and not ("RANK" in env and "WORLD_SIZE" in env)


def cuda_index(local_rank: int | None, rank: int, visible: int) -> int:
    """Which of the ``visible`` GPUs this process takes: the only one when each process sees one (``srun
    --gpus-per-task=1``, CUDA_VISIBLE_DEVICES per rank), else its local rank (the global rank modulo the count
    when no launcher variable names a local rank)."""
    if visible == 1:
        return 0
    index = rank % visible if local_rank is None else local_rank
    if index >= visible:
        raise LayoutError(f"local rank {index} has no GPU: this process sees {visible} GPUs "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                          f"{visible} ranks per node (torchrun --nproc_per_node {visible})")
    return index


def pick_device(local_rank: int | None, rank: int = 0) -> torch.device:
    """A CUDA device (see ``cuda_index``) when a GPU is present, else the CPU; decided once at start-up.

    On the CPU the cores are shared out among this node's ranks (torchrun's default is one thread each);
    LLAMA_RLHF_NUM_THREADS overrides.
    """
    if torch.cuda.is_available():
        index = cuda_index(local_rank, rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = int(os.environ.get("LLAMA_RLHF_NUM_THREADS", 0)) or max(1, cores // local_world)
    torch.set_num_threads(threads)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _master_address(hostnames: list[str]) -> str:
    """An address of this host (rank 0) that every rank can reach: loopback when all ranks share this host."""
    if all(h == hostnames[0] for h in hostnames):
        return "127.0.0.1"
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = "127.0.0.1"
    if not addr.startswith("127."):
        return addr
    # The hostname maps to loopback (Debian's 127.0.1.1): take the source address of the default route
    # (a UDP connect sends nothing).
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError as exc:
        raise RuntimeError(
            f"ranks run on several hosts ({', '.join(sorted(set(hostnames)))}) but {hostnames[0]} (rank 0) has no "
            "routable address to offer them: export MASTER_ADDR (rank 0's address) and MASTER_PORT"
        ) from exc


def _agree_master_over_mpi(rank: int) -> None:
    """Started by mpirun without MASTER_ADDR/MASTER_PORT: rank 0 picks its address and a free port, and
    broadcasts them over MPI (mpi4py) so every rank rendezvouses at the same place."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise RuntimeError(
            "started under OpenMPI without MASTER_ADDR/MASTER_PORT: install mpi4py (pip install 'llama_rlhf[mpi]') "
            "so the ranks can agree on a master address, or export MASTER_ADDR and MASTER_PORT"
        ) from exc
    comm = MPI.COMM_WORLD
    hostnames = comm.allgather(socket.gethostname())
    addr_port = None
    if rank == 0:
        addr_port = (os.environ.get("MASTER_ADDR") or _master_address(hostnames),
                     os.environ.get("MASTER_PORT") or str(_free_port()))
    addr, port = comm.bcast(addr_port, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = str(addr), str(port)


def _restart_round_store(world: int, timeout: datetime.timedelta):
    """Under torchrun: the agent's store, with keys private to this restart round, or None (env:// as usual).

    With torchrun's default (static) rendezvous the agent keeps one store for every round, and a restarted round
    would read the previous round's gloo addresses from it (``connectFullMesh ... Connection refused``)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in env:
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"llama_rlhf/round_{env['TORCHELASTIC_RESTART_COUNT']}", store)


def init_parallel(mp: int = 1, sp: int = 1, timeout_minutes: float = 30.0) -> ParallelState:
    """Start torch.distributed from torchrun's or OpenMPI's environment and build the grid.

    Direct start under OpenMPI (``mpirun -np N python solver.py``): rank, world and local rank come from
    OMPI_COMM_WORLD_*; MASTER_ADDR/MASTER_PORT are agreed over MPI when not exported.

    The layout is checked before any rendezvous, so an impossible layout fails on every rank at once.
    On CUDA one process group with two backends (``cpu:gloo,cuda:nccl``): GPU tensors go over NCCL, host-side
    objects (results, metrics gathered as Python objects) over gloo. On the CPU, gloo. ``timeout_minutes``
    (--distributed_timeout_minutes) bounds the rendezvous and every collective of every group.
    """
    rank, world, local_rank = launch_env()
    check_layout(world, mp, sp)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    direct_mpi = started_by_mpirun() and not dist.is_initialized()
    if direct_mpi:  # look like torchrun's workers to everything downstream
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                          LOCAL_WORLD_SIZE=os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))
    device = pick_device(local_rank, rank)
    if not dist.is_initialized():
        if direct_mpi and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
            _agree_master_over_mpi(rank)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                store=_restart_round_store(world, timeout),
                                **({"device_id": device} if device.type == "cuda" else {}))
    state = ParallelState.build(mp, sp, device, timeout)
    # Every rank leaves start-up together: rank 0 hosts the rendezvous store, and a rank that fails right after
    # start-up must not vanish while a peer still waits on that store.
    dist.barrier()
    return state
