"""Sharded segments stepped as stacks (FSDP2, 3 gloo ranks) against the per-segment path and one process.

Several parameters of each shape give each rank segments with the same view and the same range in
it: partial first and last rows of the (7, 5) view, a prime-sized vector, a conv kernel, and a
2-element vector whose third shard is empty. With ``foreach=None`` they step in stacks whose sums
are scattered into the reducer's slots; ``foreach=False`` steps each alone. Both must reach the
single-process optimizer's parameters on the same gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dist_memopt as dm
import dist_memopt.optim.alada as alada_module
import dist_memopt.optim.smmf as smmf_module

from harness import run_distributed

SHAPES = [(5, 7)] * 3 + [(13,)] * 3 + [(4, 3, 3, 3)] * 2 + [(2,)] * 2 + [(11, 6)]
STEPS = 10
CASES = {
    "smmf": (dm.SMMF, dict(weight_decay=0.1)),
    "smmf-adam-no-first-moment": (dm.SMMF, dict(beta=None, weight_decay=0.1, weight_decay_mode="adam")),
    "alada": (dm.Alada, dict(weight_decay=0.1)),
}
STEP_FUNCTION = {dm.SMMF: (smmf_module, "_factored_step"), dm.Alada: (alada_module, "_refit_and_update")}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.weights = nn.ParameterList([nn.Parameter(torch.randn(shape)) for shape in SHAPES])
    return model


def _gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _train(cls, config, foreach, sharded: bool, stacks: list) -> list[torch.Tensor]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = _model()
    if sharded:
        fully_shard(model)
    optimizer = cls(model.parameters(), lr=1e-2, foreach=foreach, kernel="torch", **config)  # the torch path stacks
    module, name = STEP_FUNCTION[cls]
    original = getattr(module, name)

    def recording(stack, *rest):
        stacks.append((stack.count, stack.reduced))
        original(stack, *rest)

    setattr(module, name, recording)
    try:
        for step in range(STEPS):
            for p, grad in zip(model.parameters(), _gradients(step)):
                p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if sharded else grad
            optimizer.step()
        optimizer.synchronize()
    finally:
        setattr(module, name, original)
    return [(p.full_tensor() if sharded else p).detach().clone() for p in model.parameters()]


def _all_cases(rank, world_size):
    results = {}
    for case, (cls, config) in CASES.items():
        stacked_log, plain_log, single_log = [], [], []
        stacked = _train(cls, config, None, True, stacked_log)
        plain = _train(cls, config, False, True, plain_log)
        single = _train(cls, config, None, False, single_log)
        results[case] = dict(stacked=stacked, plain=plain, single=single, stacked_log=stacked_log, plain_log=plain_log)
    return results


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_cases, 3)


@pytest.mark.parametrize("case", CASES)
def test_stacked_sharded_segments_match_the_per_segment_path_and_one_process(results, case):
    for rank_results in results:
        run = rank_results[case]
        # sharded stacks of several segments were formed, and their sums were reduced
        assert any(count > 1 and reduced for count, reduced in run["stacked_log"])
        assert all(count == 1 for count, _ in run["plain_log"])
        for stacked, plain, single in zip(run["stacked"], run["plain"], run["single"]):
            scale = max(1.0, single.abs().max().item())
            assert (stacked - single).abs().max().item() <= 1e-6 * scale
            assert (plain - single).abs().max().item() <= 1e-6 * scale
