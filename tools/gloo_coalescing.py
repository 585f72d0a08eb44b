"""Whether gloo's coalesced all-gather still corrupts the heap, for the Megatron CPU shim that avoids it.

Four gloo ranks run a loop of collectives shaped like a Megatron step (an all_reduce over the
tensor-parallel pair, a probe and statistics all_reduces over the data-parallel pair, then the
bucket all-gathers) with the all-gathers coalesced (``torch.distributed._coalescing_manager``, as
megatron-core's DDP issues them) or one by one (what ``shim_gloo_coalescing`` makes them), and
counts the runs in which a rank died::

    python tools/gloo_coalescing.py [--runs 10] [--iterations 3000]

With torch 2.13 on a 2-core machine, 6 of 37 coalesced runs lost a rank (``malloc(): unaligned
tcache chunk detected`` or SIGSEGV) and none of 27 uncoalesced runs. When a torch release loses
none here either way, the shim can go.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 4


def _loop(rank: int, port: int, iterations: int, coalesced: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    tensor_parallel = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    data_parallel = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    stats = torch.randn(300)
    buckets = [torch.randn(n) for n in (1000, 37, 512)]
    gathered = [torch.empty(2 * b.numel()) for b in buckets]
    for _ in range(iterations):
        dist.all_reduce(torch.randn(1), group=tensor_parallel)
        dist.all_reduce(torch.randn(3), op=dist.ReduceOp.MIN, group=data_parallel)
        dist.all_reduce(stats, group=data_parallel)
        with dist._coalescing_manager(group=data_parallel) if coalesced else contextlib.nullcontext():
            for bucket, out in zip(buckets, gathered):
                dist.all_gather_into_tensor(out, bucket, group=data_parallel)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _died(iterations: int, coalesced: bool) -> bool:
    try:
        mp.start_processes(_loop, args=(_free_port(), iterations, coalesced), nprocs=WORLD, start_method="fork")
    except mp.ProcessExitedException as error:
        print(f"  {error}", file=sys.stderr)
        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    for coalesced in (True, False):
        died = sum(_died(args.iterations, coalesced) for _ in range(args.runs))
        print(f"{'coalesced' if coalesced else 'one by one'}: a rank died in {died} of {args.runs} runs", flush=True)


if __name__ == "__main__":
    main()
