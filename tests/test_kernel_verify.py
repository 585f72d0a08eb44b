"""A Triton kernel's first use on a device is checked against the torch path (kernels/verify.py).

``kernel="auto"`` picks the kernels on CUDA only; the optimizers' ``triton_devices`` seam adds
"cpu" here, so the check runs through Triton's interpreter. A deliberately broken kernel (its lr
argument doubled at launch) must be caught: ``"auto"`` warns once and steps on the torch path,
``"triton"`` raises.
"""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch

import dist_memopt as dm
from dist_memopt.kernels import verify

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it unless the environment says otherwise
    pytest.skip("TRITON_INTERPRET is not 1 in this environment", allow_module_level=True)


class InterpretedSMMF(dm.SMMF):
    triton_devices = ("cuda", "cpu")


class InterpretedAlada(dm.Alada):
    triton_devices = ("cuda", "cpu")


#: class -> (kernel module, the launched kernel that updates the weights, position of its lr argument)
UPDATE_KERNELS = {
    InterpretedSMMF: ("smmf_triton", "_tile_kernel", 10),
    InterpretedAlada: ("alada_triton", "_update_kernel", 7),
}
CLASSES = list(UPDATE_KERNELS)


class _DoubledLr:
    """A launched kernel whose lr argument is doubled: wrong by the size of the update."""

    def __init__(self, kernel, position: int) -> None:
        self.kernel, self.position = kernel, position

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def launch_wrong(*args, **kwargs):
            args = list(args)
            args[self.position] *= 2.0
            return run(*args, **kwargs)

        return launch_wrong


@pytest.fixture(autouse=True)
def _fresh_probes():
    verify._forget()
    yield
    verify._forget()


def _break(monkeypatch, cls) -> None:
    module_name, name, position = UPDATE_KERNELS[cls]
    module = importlib.import_module(f"dist_memopt.kernels.{module_name}")
    monkeypatch.setattr(module, name, _DoubledLr(getattr(module, name), position))


def _run(cls, kernel: str, launches: list | None = None) -> torch.Tensor:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(12, 20))
    optimizer = cls([param], lr=1e-2, kernel=kernel)
    if launches is not None:
        optimizer.kernel_observer = _Launches(launches)
    for step in range(2):
        optimizer.zero_grad()
        param.grad = torch.randn(12, 20, generator=torch.Generator().manual_seed(step))
        optimizer.step()
    return param.detach()


class _Launches:
    """A kernel observer (:mod:`dist_memopt.kernels.launch`) listing the launches' names."""

    execute = True

    def __init__(self, names: list) -> None:
        self.names = names

    def record(self, name: str, bytes_read: int, bytes_written: int) -> None:
        self.names.append(name)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.kernel_family)
def test_a_kernel_that_matches_is_probed_once_and_used(cls, monkeypatch):
    probes = []
    original = verify.probe_difference
    monkeypatch.setattr(verify, "probe_difference", lambda *args: probes.append(args) or original(*args))
    launches: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = _run(cls, "auto", launches)
        _run(cls, "auto")  # the same family, device, dtypes and setting: not probed again
    assert len(probes) == 1 and launches  # the user's steps ran the kernels
    assert torch.equal(auto, _run(cls, "triton"))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.kernel_family)
def test_a_broken_kernel_is_caught_auto_takes_the_torch_path_and_triton_raises(cls, monkeypatch):
    _break(monkeypatch, cls)
    with pytest.warns(RuntimeWarning, match=rf"{cls.kernel_family} Triton kernel for torch.float32 weights .* does not match "
                      r"the torch path on a probe: a weight differs by .* \(tolerance .*\); kernel='auto' uses the torch path"):
        auto = _run(cls, "auto")
    assert torch.equal(auto, _run(cls, "torch"))
    launches: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per setting and process
        assert torch.equal(_run(cls, "auto", launches), auto)
    assert not launches  # the torch path: no kernel launched
    with pytest.raises(RuntimeError, match="does not match the torch path.*use kernel='auto' or kernel='torch'"):
        _run(cls, "triton")


def test_the_probe_is_keyed_by_setting_and_dtype():
    group = dm.SMMF([torch.zeros(2)], weight_decay=0.1, beta=None).param_groups[0]
    other = dm.SMMF([torch.zeros(2)], weight_decay=0.0, lr=0.5).param_groups[0]
    assert dict(verify.setting(group))["weight_decay"] == "nonzero" and dict(verify.setting(group))["beta"] is None
    assert verify.setting(group) != verify.setting(other)
    assert verify.setting(other) == verify.setting(dm.SMMF([torch.zeros(2)], lr=0.7).param_groups[0])  # lr is not a setting
