"""The multi-process harness itself: results, failures and hangs are reported, not swallowed."""

import pytest
import torch
import torch.distributed as dist

from harness import Launch, run_distributed


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def _hang(rank, world_size):
    if rank == 0:
        dist.barrier()  # rank 1 never joins
    else:
        import time

        time.sleep(60)


def test_results_come_back_per_rank():
    assert run_distributed(_sum_ranks, 3) == [3.0, 3.0, 3.0]


def test_a_failing_rank_is_reported():
    with pytest.raises(AssertionError, match="(?s)rank 1 of 2 failed.*boom on rank 1"):
        run_distributed(_fail_on_one, 2)


def _crash_on_two(rank, world_size):
    """Rank 2 dies mid-collective; its peers fail in the all_reduce with gloo's 'connection closed'."""
    import os

    if rank == 2:
        os._exit(7)
    t = torch.ones(1)
    dist.all_reduce(t)
    return rank


def test_a_crashed_rank_is_named_beside_the_failures_it_caused():
    """The peers' 'connection closed' alone hides the cause: the crashed rank's exit is reported."""
    with pytest.raises(AssertionError, match="rank 2 of 3 exited \\(code 7\\) without a result"):
        run_distributed(_crash_on_two, 3, timeout=60)


def _abort_on_one(rank, world_size):
    """What glibc does on heap corruption: SIGABRT, no Python traceback."""
    import os

    if rank == 1:
        os.abort()
    return _sum_ranks(rank, world_size)


def test_a_native_crash_reports_its_signal_case_and_python_stack():
    """A rank killed by a signal is named with the signal, the case it was in, and where it was."""
    cases = {"fine": (_sum_ranks, ()), "crash": (_abort_on_one, ())}
    with pytest.raises(AssertionError) as failure:
        Launch(cases, 2, timeout=60)
    report = str(failure.value)
    assert "rank 1 of 2 exited (killed by SIGABRT; its crash log:" in report
    crash_log = report.split("its crash log:", 1)[1]
    assert "case 'fine': _sum_ranks" in crash_log and "case 'crash': _abort_on_one" in crash_log
    assert "Fatal Python error: Aborted" in crash_log
    assert "in _abort_on_one" in crash_log  # the crashing rank's own stack, innermost frame first


def test_a_hang_becomes_a_timeout_that_says_where_each_rank_waits():
    with pytest.raises(TimeoutError, match="did not finish") as timeout:
        run_distributed(_hang, 2, timeout=8)
    report = str(timeout.value)
    # both ranks' threads, the innermost frame first: rank 0 in the barrier, rank 1 asleep
    rank0, rank1 = report.split("rank 0's crash log and threads:", 1)[1].split("rank 1's crash log and threads:", 1)
    assert "in barrier" in rank0 and "in _hang" in rank0
    assert "in _hang" in rank1 and "in barrier" not in rank1


def _fail_on_case_b(rank, world_size, tag):
    if tag == "b":
        raise ValueError(f"boom in b on rank {rank}")
    return _sum_ranks(rank, world_size) + len(tag)


def test_cases_in_one_launch_are_reported_one_by_one():
    launch = Launch({"a": (_fail_on_case_b, ("a",)), "b": (_fail_on_case_b, ("b",)), "c": (_fail_on_case_b, ("cc",))}, 2)
    assert launch.case("a") == [2.0, 2.0]
    with pytest.raises(pytest.fail.Exception, match="(?s)rank 0 of 2, case 'b'.*boom in b on rank 0"):
        launch.case("b")
    with pytest.raises(pytest.fail.Exception, match="(?s)case 'c'.*not run: case 'b' failed before it"):
        launch.case("c")
