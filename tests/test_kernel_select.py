"""``kernel="auto" | "torch" | "triton" | "cpu"``: validation, where each choice runs, clear refusals."""

from __future__ import annotations

import pytest
import torch

import dist_memopt as dm
from dist_memopt.kernels.select import use_triton


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_an_unknown_kernel_is_an_error_naming_the_argument(cls):
    with pytest.raises(ValueError, match=r"Invalid kernel: 'cuda' \(must be one of \('auto', 'torch', 'triton', 'cpu'\)\)"):
        cls([torch.nn.Parameter(torch.randn(3))], kernel="cuda")
    with pytest.raises(ValueError, match=r"Invalid kernel \(param group 1\): 'fused'"):
        cls([{"params": [torch.nn.Parameter(torch.randn(3))]}, {"params": [torch.nn.Parameter(torch.randn(2))], "kernel": "fused"}])


def test_auto_takes_triton_on_cuda_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_triton({"kernel": "auto"}, torch.device("cpu"))  # the interpreter only when asked for
    assert not use_triton({"kernel": "torch"}, torch.device("cpu"))
    assert not use_triton({"kernel": "auto"}, torch.device("cuda"), supported=False)


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_triton_on_cpu_without_the_interpreter_is_refused_before_any_change(cls, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    before = p.detach().clone()
    optimizer = cls([p], kernel="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        optimizer.step()
    assert torch.equal(p.detach(), before) and not optimizer.state


def test_a_kernel_without_triton_support_is_refused_or_skipped():
    with pytest.raises(RuntimeError, match="kernel='triton' is not implemented"):
        use_triton({"kernel": "triton"}, torch.device("cpu"), supported=False)
    assert not use_triton({"kernel": "auto"}, torch.device("cpu"), supported=False)


@pytest.mark.parametrize("name", ["SMMF", "Alada"])
def test_config_files_take_the_kernel_argument(name):
    """ds_config params and the Megatron factory build through the constructor's signature."""
    from dist_memopt.integrations.deepspeed.registry import build_optimizer

    optimizer = build_optimizer(name, [torch.nn.Parameter(torch.randn(3))], {"kernel": "torch"})
    assert optimizer.param_groups[0]["kernel"] == "torch"
    with pytest.raises(ValueError, match="Invalid kernel: 'gpu'"):
        build_optimizer(name, [torch.nn.Parameter(torch.randn(3))], {"kernel": "gpu"})


def test_an_untested_triton_release_is_refused_by_name_and_auto_takes_torch(monkeypatch):
    triton = pytest.importorskip("triton")
    from dist_memopt.kernels import select

    monkeypatch.setattr(triton, "__version__", "3.10.0")
    select.triton_problem.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"support triton 3\.6\.0, 3\.7\.1, 3\.8\.0, 3\.9\.0, found 3\.10\.0.*kernel='torch'"):
            use_triton({"kernel": "triton"}, torch.device("cpu"))
        with pytest.warns(RuntimeWarning, match="kernel='auto' takes the torch path"):
            assert not use_triton({"kernel": "auto"}, torch.device("cuda"))
        monkeypatch.setattr(triton, "__version__", "3.9.0+local")
        select.triton_problem.cache_clear()
        assert select.triton_problem() is None
    finally:
        select.triton_problem.cache_clear()
