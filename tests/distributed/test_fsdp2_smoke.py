"""FSDP2 smoke: fully_shard a model, step SMMF/Alada, full parameters equal a single process."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import dist_memopt as dm
from harness import run_distributed
from models import AwkwardModel, loss_fn


def _fsdp2_run(rank, world_size, cls_name, config, steps):
    torch.manual_seed(0)
    model = AwkwardModel()
    for module in (model.conv, model.proj, model.head):
        fully_shard(module)
    fully_shard(model, ignored_params={model.scale})  # FSDP2 rejects 0-d parameters
    optimizer = getattr(dm, cls_name)(model.parameters(), **config)
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        optimizer.step()
    optimizer.synchronize()
    return {n: (p.full_tensor() if hasattr(p, 'full_tensor') else p).detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls_name, config", [("SMMF", dict(lr=1e-2, weight_decay=0.1)), ("Alada", dict(lr=1e-2))])
def test_fsdp2_matches_single_process(cls_name, config):
    steps = 10
    sharded = run_distributed(_fsdp2_run, 3, cls_name, config, steps)
    torch.manual_seed(0)
    model = AwkwardModel()
    optimizer = getattr(dm, cls_name)(model.parameters(), **config)
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        for result in sharded:
            scale = max(1.0, p.abs().max().item())
            assert (result[name] - p.detach()).abs().max().item() <= 1e-6 * scale, name
