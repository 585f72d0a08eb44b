"""2-D parallelism: SMMF and Alada on tensor-parallel DTensor shards equal one process.

The model (tp_cases.TPModel) is parallelized the torchtitan way — ``parallelize_module`` with
``ColwiseParallel`` / ``RowwiseParallel`` on the tp mesh dimension, then ``fully_shard`` on the
data-parallel one — and holds: a row-wise weight whose column blocks cut across SMMF's
square-matricized rows, one whose runs are whole view rows, column-wise rows that split unevenly
over dp after tp, a weight with fewer rows than ranks, embeddings sharded on dim 0 and on dim 1
(the dim-0 one gets its gradient Replicate(), as RowwiseParallel on an embedding leaves it), a norm
replicated over tp, a zero gradient row, and hand-placed DTensors sharded on a middle dim (a 4-D
conv kernel over dp × tp, a 3-D tensor with 7 entries over 2 tp ranks) and a replicated scalar.
After 12 steps on identical injected gradients, the full parameters equal a single process.
"""

from __future__ import annotations

import pytest
import torch

import dist_memopt as dm
from harness import run_distributed
from tp_cases import CONFIGS, MESHES, STEPS, TOLERANCE, build, full_values, inject, max_errors, named_params, single_process


def _train_all_configs(rank, world_size, mesh_name):
    errors, placements = {}, {}
    for config, (cls_name, kwargs) in CONFIGS.items():
        model, extra, initial = build(mesh_name)
        named = named_params(model, extra)
        optimizer = getattr(dm, cls_name)([p for _, p in named], **kwargs)
        for step in range(STEPS):
            inject(named, step, replicated_grads=("embed_rows.weight",))
            optimizer.step()
        errors[config] = max_errors(single_process(config, initial), full_values(named))
        placements = {n: str(getattr(p, "placements", None)) for n, p in named}
    return errors, placements


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_tensor_parallel_equals_single_process(mesh_name):
    world_size = MESHES[mesh_name][0]
    results = run_distributed(_train_all_configs, world_size, mesh_name, timeout=420)
    errors, placements = results[0]
    if mesh_name == "dp2-tp2":  # the layouts this test is about were really produced
        assert "_StridedShard" in placements["up.weight"] and "Shard(dim=1)" in placements["down.weight"]
    for rank_errors, _ in results:
        for config, per_param in rank_errors.items():
            worst = max(per_param, key=per_param.get)
            assert per_param[worst] <= TOLERANCE, f"{mesh_name} {config}: {worst} off by {per_param[worst]:.3g}"
