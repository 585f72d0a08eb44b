"""Which process this is, under torchrun, the deepspeed launcher, mpirun, or alone.

torchrun and the deepspeed launcher export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and the
rendezvous address. Under ``mpirun``/``mpiexec`` (MPICH, Open MPI, Intel MPI) rank and size come
from mpi4py; rank 0 picks the rendezvous port and broadcasts it. A process started alone is rank 0
of 1. :func:`discover` only reads; :func:`init_process_group` creates the default group.
"""

from __future__ import annotations

import glob
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "discover", "init_process_group", "free_port", "remove_deepspeed_shm_buffers"]

_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "deepspeed", "env" (RANK/WORLD_SIZE set otherwise), "mpi" or "single"

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover() -> DistEnv:
    """Rank, world size and local rank of this process (no process group is created)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed" if "CROSS_RANK" in env else "env"
        return DistEnv(rank, world, int(env.get("LOCAL_RANK", rank)), launcher)
    if any(v in env for v in _MPI_RANK_VARS):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        return DistEnv(comm.Get_rank(), comm.Get_size(), local, "mpi")
    return DistEnv(0, 1, 0, "single")


def _mpi_rendezvous(env: DistEnv) -> None:
    """Export MASTER_ADDR/PORT (chosen by rank 0) and RANK/WORLD_SIZE for torch.distributed."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    address = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0])
    port = os.environ.get("MASTER_PORT") or (str(free_port()) if env.rank == 0 else None)
    address, port = comm.bcast((address, port), root=0)
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(env.rank),
                      WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))


def init_process_group(env: DistEnv, timeout_s: int = 600) -> None:
    """The default process group: NCCL on GPUs, gloo on CPU (one rank works too)."""
    if dist.is_initialized():
        return
    if env.launcher == "mpi":
        _mpi_rendezvous(env)
    elif env.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s))


def remove_deepspeed_shm_buffers(port: Optional[int] = None, since: Optional[float] = None, addr: str = "127.0.0.1",
                                 directory: str = "/dev/shm") -> list[str]:
    """Delete the shared-memory buffers DeepSpeed's CPU all_reduce leaves behind; returns their paths.

    With the CPU accelerator, each rank creates ``deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}``
    (66 MiB) in ``/dev/shm`` and never unlinks it: memory held until reboot, one per rank and run.
    ``port``: only the files of that MASTER_PORT; ``since``: only files created at or after that time
    (seconds since the epoch), for launchers that pick the port themselves.
    """
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{'*' if port is None else port}_*"
    removed = []
    for path in glob.glob(os.path.join(directory, pattern)):
        try:
            if since is not None and os.stat(path).st_ctime < since:
                continue
            os.unlink(path)
            removed.append(path)
        except OSError:  # gone already, or another user's
            pass
    return removed
