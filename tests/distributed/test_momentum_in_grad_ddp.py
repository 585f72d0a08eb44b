"""Alada's in-gradient momentum under DDP: its loop-contract check accepts the bucket views DDP swaps
in for .grad (gradient_as_bucket_view=True), and both modes equal one process."""

import torch

import dist_memopt as dm
from harness import run_distributed
from models import AwkwardModel, loss_fn

STEPS = 4


def _train(model, optimizer):
    for step in range(STEPS):
        optimizer.zero_grad()
        optimizer.scale_loss(loss_fn(model, step)).backward()
        optimizer.step()


def _ddp(rank, world_size):
    results = {}
    for as_view in (False, True):
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(AwkwardModel(), gradient_as_bucket_view=as_view)
        _train(model, dm.Alada(model.parameters(), lr=1e-2, momentum_in_grad=True))
        results[as_view] = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return results


def test_ddp_keeps_the_momentum_in_grad():
    torch.manual_seed(0)
    single = AwkwardModel()
    _train(single, dm.Alada(single.parameters(), lr=1e-2, momentum_in_grad=True))
    for per_mode in run_distributed(_ddp, 2):  # every rank sees the same batches: DDP averages equal grads
        for got in per_mode.values():
            for name, expected in single.named_parameters():
                torch.testing.assert_close(got[name], expected.detach(), atol=1e-6, rtol=0)
