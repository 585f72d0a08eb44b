"""The fused Triton kernels (SMMF and Alada) on real shards (gloo, CPU ranks, Triton's interpreter).

FSDP2 on 3 ranks (uneven rows, an empty shard of a 2-row weight) and FSDP1 flat parameters on 2
ranks (several segments per tensor, ranges cutting rows): after a few steps with
``kernel="triton"`` the full parameters equal a single-process torch-path run, as the torch path's
own sharded runs do (test_fsdp.py). Ranks inherit ``TRITON_INTERPRET=1`` from tests/conftest.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

import dist_memopt as dm
from harness import run_distributed
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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU ranks need Triton's interpreter")
@pytest.mark.parametrize(
    "run, world_size, cls_name",
    [(_fsdp2, 3, "SMMF"), (_fsdp2, 3, "Alada"), (_fsdp1_flat, 2, "SMMF")],
    ids=["fsdp2-3-ranks-smmf", "fsdp2-3-ranks-alada", "fsdp1-flat-2-ranks-smmf"],
)
def test_triton_kernels_on_shards_equal_one_process(run, world_size, cls_name):
    expected = _single_process(cls_name)
    for params in run_distributed(run, world_size, cls_name):
        for name, value in expected.items():
            scale = max(1.0, value.abs().max().item())
            assert (params[name] - value).abs().max().item() <= TOLERANCE * scale, name
