"""The fused Triton kernels (SMMF and Alada) on real shards (gloo, CPU ranks, Triton's interpreter).

FSDP2 on 3 ranks (uneven rows, an empty shard of a 2-row weight) and FSDP1 flat parameters on 2
ranks (several segments per tensor, ranges cutting rows): after a few steps with
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


def _single_process(cls_name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = AwkwardModel()
    _train(model, getattr(dm, cls_name)(model.parameters(), kernel="torch", **CONFIG), range(STEPS))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _fsdp2(rank, world_size, cls_name):
    model = fsdp2_model()
    _train(model, getattr(dm, cls_name)(model.parameters(), kernel="triton", **CONFIG), range(STEPS))
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
    expected = _single_process(cls_name)
    for params in launches(world_size).case(key):
        for name, value in expected.items():
            scale = max(1.0, value.abs().max().item())
            assert (params[name] - value).abs().max().item() <= TOLERANCE * scale, name
