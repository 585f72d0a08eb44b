"""The kernel observer (dist_memopt.kernels.launch): passed in explicitly, it sees every fused
launch and changes nothing else; a dry run launches nothing."""

from __future__ import annotations

import pytest
import torch

import dist_memopt as dm

pytest.importorskip("triton")


class Recorder:
    """The smallest observer: the API any kernel runner reports to."""

    def __init__(self, execute: bool = True) -> None:
        self.execute = execute
        self.launches: list[tuple[str, int, int]] = []

    def record(self, name: str, bytes_read: int, bytes_written: int) -> None:
        self.launches.append((name, bytes_read, bytes_written))


def _stepped(cls: type, observer: Recorder | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24, 40)), torch.nn.Parameter(torch.randn(40))]
    optimizer = cls(params, kernel="triton", lr=1e-2)
    optimizer.kernel_observer = observer
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    if hasattr(optimizer, "synchronize"):
        optimizer.synchronize()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_an_observer_sees_every_launch_and_changes_no_result(cls):
    from dist_memopt.kernels.launch import KernelObserver

    observer = Recorder()
    assert isinstance(observer, KernelObserver)
    observed, plain = _stepped(cls, observer), _stepped(cls, None)
    assert all(torch.equal(a, b) for a, b in zip(observed, plain))
    names = {name for name, _, _ in observer.launches}
    assert all(name.startswith("triton.") for name in names) and len(names) >= 3, names
    assert all(r >= 0 and w >= 0 for _, r, w in observer.launches)


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_a_dry_run_reports_the_same_launches_and_runs_none(cls):
    executed, dry = Recorder(), Recorder(execute=False)
    _stepped(cls, executed)
    torch.manual_seed(0)
    untouched = [torch.randn(24, 40)]  # the first parameter's initial values, as _stepped draws them
    weights = _stepped(cls, dry)
    assert dry.launches == executed.launches
    assert torch.equal(weights[0], untouched[0])  # no kernel ran: the fused weights kept their values


def test_kernel_triton_on_cpu_needs_the_interpreter_whatever_observes_it(monkeypatch):
    """Whether a parameter takes the fused kernels is decided the same way with a dry-run observer."""
    from dist_memopt.kernels import select

    monkeypatch.setattr(select, "_interpreting", lambda: False)
    param = torch.nn.Parameter(torch.randn(8, 8))
    param.grad = torch.randn_like(param)
    optimizer = dm.SMMF([param], kernel="triton")
    optimizer.kernel_observer = Recorder(execute=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        optimizer.step()


def test_bench_kernels_counts_triton_rows_on_cpu_from_a_plain_environment(tmp_path):
    """The CLI chooses Triton's interpreter itself before Triton is imported, then counts without
    running (the dry run): no TRITON_INTERPRET needed in the caller's environment."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    out = tmp_path / "kernels.json"
    command = [sys.executable, "-m", "dist_memopt.bench", "kernels", "--models", "tiny", "--optimizers", "SMMF-triton",
               "--count-steps", "1", "--kernel-world-sizes", "", "--json", str(out)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())["benchmarks"]["kernels"]
    assert "SMMF-triton" in json.dumps(rows)
