"""The fused Triton kernels (SMMF and Alada) on real shards (gloo, CPU ranks, Triton's interpreter).

FSDP2 on 3 ranks (uneven rows, an empty shard of a 2-row weight; also in bf16, on injected
gradients) and FSDP1 flat parameters on 2 ranks (several segments per tensor, ranges cutting
rows): after a few steps with
``kernel="triton"`` the full parameters equal a single-process torch-path run, as the torch path's
own sharded runs do (test_fsdp.py). Ranks inherit ``TRITON_INTERPRET=1`` from tests/conftest.py.
One launch per world size runs its cases (harness.Launch, a module-scoped fixture).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

import dist_memopt as dm
from harness import Launch
from models import AwkwardModel
from test_fsdp import TOLERANCE, _full, _train, fsdp2_model

pytest.importorskip("triton")
STEPS = 5
CONFIG = dict(lr=1e-2, weight_decay=0.1)


def _single_process(cls_name: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = AwkwardModel()
    if dtype != torch.float32:  # injected gradients: the same on every layout
        model.to(dtype)
        _inject_and_step(model, getattr(dm, cls_name)(model.parameters(), kernel="torch", **CONFIG), dtype)
    else:
        _train(model, getattr(dm, cls_name)(model.parameters(), kernel="torch", **CONFIG), range(STEPS))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _inject_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    """STEPS steps on seeded full gradients, handed to each parameter in its own layout."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in model.parameters():
            full = torch.randn(p.shape, generator=generator).to(dtype)
            p.grad = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full
        optimizer.step()


def _fsdp2(rank, world_size, cls_name):
    model = fsdp2_model()
    _train(model, getattr(dm, cls_name)(model.parameters(), kernel="triton", **CONFIG), range(STEPS))
    return _full(model)


def _fsdp2_mixed(rank, world_size, cls_name):
    """Rank 0 on the torch path, the others on the kernels: the statistics each posts to the
    all_reduce mean the same thing whichever path computed them."""
    model = fsdp2_model()
    kernel = "torch" if rank == 0 else "triton"
    _train(model, getattr(dm, cls_name)(model.parameters(), kernel=kernel, **CONFIG), range(STEPS))
    return _full(model)


def _fsdp2_bf16(rank, world_size, cls_name):
    """bf16 shards: the kernels load and store the DTensors' local bf16 tensors themselves."""
    model = fsdp2_model()
    model.to(torch.bfloat16)
    _inject_and_step(model, getattr(dm, cls_name)(model.parameters(), kernel="triton", **CONFIG), torch.bfloat16)
    return _full(model)


def _fsdp1_flat(rank, world_size, cls_name):
    torch.manual_seed(0)
    inner = AwkwardModel()
    model = FSDP(inner, device_id=torch.device("cpu"), use_orig_params=False, ignored_states=[inner.scale])
    _train(model, getattr(dm, cls_name)(model.parameters(), kernel="triton", **CONFIG), range(STEPS))
    with FSDP.summon_full_params(model):
        return _full(model)


CASES = {  # key -> (run, world size, optimizer)
    "fsdp2-3-ranks-smmf": (_fsdp2, 3, "SMMF"),
    "fsdp2-3-ranks-alada": (_fsdp2, 3, "Alada"),
    "fsdp1-flat-2-ranks-smmf": (_fsdp1_flat, 2, "SMMF"),
    "fsdp2-3-ranks-smmf-bf16": (_fsdp2_bf16, 3, "SMMF"),
    "fsdp2-3-ranks-smmf-torch-and-triton": (_fsdp2_mixed, 3, "SMMF"),
    "fsdp2-3-ranks-alada-torch-and-triton": (_fsdp2_mixed, 3, "Alada"),
    "fsdp2-3-ranks-alada-bf16": (_fsdp2_bf16, 3, "Alada"),
}


@pytest.fixture(scope="module")
def launches():
    """world size -> its launch of every case on that many ranks, started on first use."""
    started = {}

    def launch(world_size: int) -> Launch:
        if world_size not in started:
            cases = {key: (run, (cls_name,)) for key, (run, world, cls_name) in CASES.items() if world == world_size}
            started[world_size] = Launch(cases, world_size)
        return started[world_size]

    return launch


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU ranks need Triton's interpreter")
@pytest.mark.parametrize("key", CASES)
def test_triton_kernels_on_shards_equal_one_process(key, launches):
    _, world_size, cls_name = CASES[key]
    dtype = torch.bfloat16 if key.endswith("bf16") else torch.float32
    expected = _single_process(cls_name, dtype)
    for params in launches(world_size).case(key):
        for name, value in expected.items():
            assert params[name].dtype == dtype, name
            scale = max(1.0, value.abs().max().item())
            # bf16: equal in the last run; the sums' reduction order differs from one process, so
            # allow one bf16 rounding
            tolerance = TOLERANCE if dtype == torch.float32 else 2.0 ** -7
            assert (params[name].float() - value.float()).abs().max().item() <= tolerance * scale, name
