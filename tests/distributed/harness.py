"""Run a function on N real gloo ranks (separate processes) and collect what each returns.

Failures come back as the failing rank's traceback; a run that outlives its timeout is killed and
reported, so a hang in the code under test fails the test instead of the CI job.

Ranks are forked from a forkserver that has imported torch, dist_memopt and this module once (with
Triton and tests/interpreter_guard.py's bounds checks when kernels are interpreted; nothing else:
no thread pool, no process group), so a rank starts in a fraction of a second instead of
re-importing torch (several CPU seconds per rank, the larger part of a small launch on 2 cores).
Everything a test configures (environment, process group, threads) still happens in the rank.

A rank killed by a signal (a native crash: heap corruption, a segfault) leaves no traceback, so each
rank keeps a crash log: ``faulthandler`` writes every thread's Python stack there on a fatal signal,
and the cases it started are marked in it. The report of a rank that exited without a result ends
with that log. A run that times out asks every rank still running for its threads' stacks
(SIGUSR1, which ``faulthandler`` answers in the crash log) before killing it, and reports them.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import queue
import signal
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_memopt.train.distributed import remove_deepspeed_shm_buffers

PRELOADED = ("torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp", "dist_memopt", "harness")

if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_guard  # tests/: the ranks' interpreted kernels are bounds-checked like the parent's

    interpreter_guard.install()


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOADED))  # read when the forkserver starts (the first launch)
    return ctx


#: after a rank fails, how long the others may take to report theirs
FAILURE_GRACE_S = 10.0


#: the rank's crash log (set in each rank by ``_worker``)
_crash_log: Any = None


def _mark(line: str) -> None:
    """Note in the crash log what the rank is about to do (flushed: a crash may follow)."""
    if _crash_log is not None:
        _crash_log.write(line + "\n")
        _crash_log.flush()


def _log_tail(log_path: str) -> str:
    """The end of a rank's crash log ("" where it has none)."""
    try:
        with open(log_path, errors="replace") as f:
            return f.read()[-6000:]
    except OSError:
        return ""


def _exit_description(code: int, log_path: str) -> str:
    """``code N``, or the signal that killed the rank, and the end of its crash log."""
    text = f"code {code}"
    if code < 0:
        try:
            text = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            text = f"killed by signal {-code}"
    log = _log_tail(log_path)
    return f"{text}; its crash log:\n{log}" if log.strip() else text


#: how long a rank asked for its stacks has to write them
STACKS_WAIT_S = 2.0


def _stacks_of_waiting_ranks(procs: list, outcomes: dict, log_paths: list[str]) -> str:
    """Each rank still running: where its threads are (faulthandler answers SIGUSR1 in its crash
    log), so a hang says where it hangs."""
    waiting = [r for r, p in enumerate(procs) if r not in outcomes and p.is_alive()]
    for r in waiting:
        try:
            os.kill(procs[r].pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    if waiting:
        time.sleep(STACKS_WAIT_S)
    return "".join(f"\nrank {r}'s crash log and threads:\n{_log_tail(log_paths[r])}" for r in waiting)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any, env: dict, backend: str, log_path: str
) -> None:
    global _crash_log
    os.setpgrp()  # the rank and any process it starts form one group, killed together
    _crash_log = open(log_path, "w")
    faulthandler.enable(file=_crash_log, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=_crash_log, all_threads=True)  # asked on a timeout
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        **env,
    )
    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        value = fn(rank, world_size, *args)
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _kill_group(process: Any) -> None:
    """Kill a rank and what it started (Megatron's checkpoint writers would outlive a killed rank)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.join(timeout=5)


def run_distributed(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout: float = 300,
    env: dict | None = None,
    daemon: bool = True,
    backend: str = "gloo",
) -> list:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own process.

    ``fn`` must be importable (a module-level function); its return value must pickle. Ranks that
    start processes of their own (Megatron's checkpoint writers) need ``daemon=False``; they are
    killed like the others when the run fails or times out. With ``backend="nccl"`` rank r uses
    CUDA device r (modulo the device count).
    """
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        log_paths = [os.path.join(logs, f"rank{rank}.log") for rank in range(world_size)]
        return _run_ranks(fn, world_size, args, timeout, env or {}, daemon, backend, log_paths)


def _run_ranks(
    fn: Callable, world_size: int, args: tuple, timeout: float, env: dict, daemon: bool, backend: str, log_paths: list[str]
) -> list:
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results, env, backend, log_paths[rank]), daemon=daemon)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    exited: dict[int, int] = {}  # ranks gone without a result, before any is killed here
    failing = False  # a rank has reported a failure
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outcomes and p.exitcode is not None]
                if dead and not failing:
                    raise AssertionError(
                        f"rank {dead[0]} of {world_size} exited "
                        f"({_exit_description(procs[dead[0]].exitcode, log_paths[dead[0]])}) without a result"
                    ) from None
                if time.monotonic() > deadline or (dead and len(outcomes) + len(dead) == world_size):
                    if failing:
                        break  # a failure, and the other ranks have said (or shown) all they will
                    raise TimeoutError(
                        f"distributed run of {fn.__name__} on {world_size} ranks did not finish within "
                        f"{timeout}s; ranks done: {sorted(outcomes)}" + _stacks_of_waiting_ranks(procs, outcomes, log_paths)
                    ) from None
                continue
            outcomes[rank] = (ok, payload)
            if not ok and not failing:  # the others' failures too, briefly: a rank's crash reaches its peers as theirs
                failing, deadline = True, min(deadline, time.monotonic() + FAILURE_GRACE_S)
        exited.update((r, p.exitcode) for r, p in enumerate(procs) if r not in outcomes and p.exitcode is not None)
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcomes) == world_size else 0.1)
            if p.is_alive() or not daemon:
                _kill_group(p)
        remove_deepspeed_shm_buffers(port=port)  # DeepSpeed's CPU all_reduce would leave them in /dev/shm
    failures = {r: tb for r, (ok, tb) in outcomes.items() if not ok}
    if failures:
        silent = [
            f"rank {r} of {world_size} exited ({_exit_description(code, log_paths[r])}) without a result"
            for r, code in sorted(exited.items())
        ]
        reports = [f"rank {r} of {world_size} failed:\n{tb}" for r, tb in sorted(failures.items())]
        raise AssertionError("\n".join(silent + reports))
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]


def _run_cases(rank: int, world_size: int, cases: dict) -> dict:
    """Each case's ``(True, result)`` or ``(False, traceback)``; after a failure the rest are not run
    (the ranks' collectives would no longer match)."""
    out, failed = {}, None
    for key, (fn, args) in cases.items():
        if failed is not None:
            out[key] = (False, f"not run: case {failed!r} failed before it on this rank")
            continue
        _mark(f"case {key!r}: {getattr(fn, '__name__', fn)}")
        try:
            out[key] = (True, fn(rank, world_size, *args))
        except Exception:  # noqa: BLE001 - reported by the case's own test
            out[key], failed = (False, traceback.format_exc()), key
    return out


class Launch:
    """Several cases run one after another in one launch of ``world_size`` ranks (one process group,
    one start-up), each reported on its own: ``case(key)`` gives every rank's result of that case, or
    fails with the first failing rank's traceback. A module-scoped fixture holds the launch and one
    test per case reads it, so cases still pass and fail separately."""

    def __init__(self, cases: dict, world_size: int, timeout: float = 300, env: dict | None = None) -> None:
        """``cases``: key -> ``(fn, args)``, run in order as ``fn(rank, world_size, *args)``."""
        self.world_size = world_size
        self.results = run_distributed(_run_cases, world_size, cases, timeout=timeout, env=env)

    def case(self, key: Any) -> list:
        for rank, per_case in enumerate(self.results):
            ok, value = per_case[key]
            if not ok:
                import pytest

                pytest.fail(f"rank {rank} of {self.world_size}, case {key!r}:\n{value}", pytrace=False)
        return [per_case[key][1] for per_case in self.results]
