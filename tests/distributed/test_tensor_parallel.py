"""2-D parallelism: SMMF and Alada on tensor-parallel DTensor shards equal one process.

The model (tp_cases.TPModel) is parallelized the torchtitan way — ``parallelize_module`` with
``ColwiseParallel`` / ``RowwiseParallel`` on the tp mesh dimension, then ``fully_shard`` on the
data-parallel one — and holds: a row-wise weight whose column blocks cut across SMMF's
square-matricized rows, one whose runs are whole view rows, column-wise rows that split unevenly
over dp after tp, a weight with fewer rows than ranks, embeddings sharded on dim 0 and on dim 1
(the dim-0 one gets its gradient Replicate(), as RowwiseParallel on an embedding leaves it), a norm
replicated over tp, a zero gradient row, and hand-placed DTensors sharded on a middle dim (a 4-D
conv kernel over dp × tp, a 3-D tensor with 7 entries over 2 tp ranks, a matrix on a mesh without
dimension names, reduced over a chain of groups) and a replicated scalar.
After 12 steps on identical injected gradients, the full parameters equal a single process.

All cases run in two launches (harness.Launch, module-scoped fixtures): one on 4 ranks, then one on
2 ranks that also loads the 4-rank launch's checkpoint; each test reads its own case.
"""

from __future__ import annotations

import os

import pytest
import torch

import dist_memopt as dm
from harness import Launch
from tp_cases import CONFIGS, MESHES, STEPS, TOLERANCE, build, full_values, inject, max_errors, named_params, single_process


def _train_all_configs(rank, world_size, mesh_name, configs=tuple(CONFIGS), kernel="torch"):
    errors, placements = {}, {}
    for config in configs:
        cls_name, kwargs = CONFIGS[config]
        model, extra, initial = build(mesh_name)
        named = named_params(model, extra)
        optimizer = getattr(dm, cls_name)([p for _, p in named], kernel=kernel, **kwargs)
        for step in range(STEPS):
            inject(named, step, replicated_grads=("embed_rows.weight",))
            optimizer.step()
        errors[config] = max_errors(single_process(config, initial), full_values(named))
        placements = {n: str(getattr(p, "placements", None)) for n, p in named}
    return errors, placements


@pytest.mark.parametrize("mesh_name", ["tp2", "dp2-tp2", "dp2-tp1", "hsdp2-tp2"])
def test_tensor_parallel_equals_single_process(mesh_name, request):
    results = _launch(request, MESHES[mesh_name][0]).case(("equal", mesh_name))
    errors, placements = results[0]
    if mesh_name == "dp2-tp2":  # the layouts this test is about were really produced
        assert "_StridedShard" in placements["up.weight"] and "Shard(dim=1)" in placements["down.weight"]
    for rank_errors, _ in results:
        for config, per_param in rank_errors.items():
            worst = max(per_param, key=per_param.get)
            assert per_param[worst] <= TOLERANCE, f"{mesh_name} {config}: {worst} off by {per_param[worst]:.3g}"


TRITON_CONFIGS = ("smmf-adamw", "alada")


def _train_with_kernels(rank, world_size, mesh_name):
    """The fused kernels (Triton's interpreter) on the same shards, and which index math their
    batches took: the strided one must be among them (the column-wise and row-wise blocks)."""
    from dist_memopt.kernels import alada_triton, smmf_triton

    modes = []
    for module in (smmf_triton, alada_triton):
        def noted(geometries, columns, _original=module.index_math):
            index = _original(list(geometries), columns)
            modes.append(index["RUNS"])
            return index
        module.index_math = noted
    errors, placements = _train_all_configs(rank, world_size, mesh_name, TRITON_CONFIGS, kernel="triton")
    return errors, placements, sorted(set(modes))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU ranks need Triton's interpreter")
def test_fused_kernels_on_tensor_parallel_shards_equal_single_process(four_ranks):
    """dp2-tp2 with kernel="triton": _StridedShard and Shard(1) blocks through the kernels' strided
    index math, equal to one process on the torch path."""
    from dist_memopt.kernels.tiles import CONTIGUOUS, STRIDED

    for errors, placements, modes in four_ranks.case(("triton", "dp2-tp2")):
        assert "_StridedShard" in placements["up.weight"] and "Shard(dim=1)" in placements["down.weight"]
        assert CONTIGUOUS in modes and STRIDED in modes, modes
        for config, per_param in errors.items():
            worst = max(per_param, key=per_param.get)
            assert per_param[worst] <= TOLERANCE, f"dp2-tp2 triton {config}: {worst} off by {per_param[worst]:.3g}"


def _count_all_reduces(optimizer, named, step):
    import torch.distributed as dist

    calls, real = [0], dist.all_reduce

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    inject(named, step)
    dist.all_reduce = counted
    try:
        optimizer.step()
    finally:
        dist.all_reduce = real
    return calls[0]


def _mesh_checks(rank, world_size):
    """On (dp=2, tp=2): collectives per step, a real forward/backward, and the errors."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from tp_cases import make_mesh

    out = {}
    for cls_name in ("SMMF", "Alada"):
        counts = []
        for extra_layers in (0, 3):
            model, extra, _ = build("dp2-tp2", extra_layers)
            named = named_params(model, extra)
            optimizer = getattr(dm, cls_name)([p for _, p in named], lr=1e-2)
            counts.append([_count_all_reduces(optimizer, named, step) for step in range(3)])
        out["collectives", cls_name] = counts
    # a real forward/backward trains the wrapped model
    model, _, _ = build("dp2-tp2")
    optimizer = dm.SMMF(model.parameters(), lr=3e-2)
    tokens = torch.arange(24).view(4, 6) % 11
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(tokens).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    out["losses"] = losses
    mesh = make_mesh("dp2-tp2")
    errors = {}
    # a Partial parameter: refused on every rank, naming it, before any state changes
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 3), mesh, [Replicate(), Partial()]))
    partial.grad = DTensor.from_local(torch.ones(4, 3), mesh, [Replicate(), Partial()])
    try:
        dm.SMMF([{"params": [partial], "param_names": ["attn.partial"]}]).step()
    except ValueError as error:
        errors["partial"] = str(error)
    # holders of a parameter that disagree on its placements: an error, not mixed-up sums
    tp_rank = mesh["tp"].get_local_rank()
    placements = [Replicate(), Shard(0) if tp_rank == 0 else Shard(1)]
    local = torch.ones(2, 8) if tp_rank == 0 else torch.ones(4, 4)
    skewed = torch.nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False, shape=(4, 8), stride=(8, 1)))
    skewed.grad = torch.ones_like(skewed)
    before = skewed.detach().to_local().clone()
    try:
        dm.SMMF([skewed]).step()
    except RuntimeError as error:
        errors["skewed"] = str(error)
    errors["skewed unchanged"] = torch.equal(before, skewed.detach().to_local())
    out["errors"] = errors
    return out


def test_mesh_collectives_training_and_errors(four_ranks):
    for out in four_ranks.case("mesh checks"):
        for cls_name in ("SMMF", "Alada"):
            small, large = out["collectives", cls_name]
            # per step, a probe on each group, then one all_reduce per buffer: over the flattened
            # dp x tp group (every weight split by both), over dp (norms, row-parallel biases),
            # over tp (the cube, replicated over dp); and for the plane, on a mesh without
            # dimension names, its chain: a probe on each of its 2 groups and 2 all_reduces
            assert small == large == [3 + 3 + 2 + 2] * 3, (cls_name, small, large)
        assert out["losses"][-1] < 0.5 * out["losses"][0], out["losses"]
        assert "parameter 'attn.partial'" in out["errors"]["partial"] and "Partial" in out["errors"]["partial"]
        assert "placements" in out["errors"]["skewed"] and out["errors"]["skewed unchanged"]


SAVED_AT = 5
DCP_CONFIGS = ("smmf-adamw", "alada")


def _dcp_train(mesh_name, config, path, save: bool):
    """Steps 0..SAVED_AT then save (``save``), or load and continue to STEPS; model parameters only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    cls_name, kwargs = CONFIGS[config]
    model, _, initial = build(mesh_name)
    named = list(model.named_parameters())
    optimizer = getattr(dm, cls_name)(model.parameters(), **kwargs)
    if save:
        for step in range(SAVED_AT):
            inject(named, step)
            optimizer.step()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{path}/{config}")
        return None
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{path}/{config}")
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    assert {int(s["step"]) for s in optimizer.state.values()} == {SAVED_AT}
    for step in range(SAVED_AT, STEPS):
        inject(named, step)
        optimizer.step()
    reference = single_process(config, {n: initial[n] for n, _ in named})
    return max_errors(reference, full_values(named))


def _dcp_save_then_load(rank, world_size, path, save_mesh, load_mesh):
    results = {}
    for config in DCP_CONFIGS:
        if save_mesh:
            _dcp_train(save_mesh, config, path, save=True)
        results[config] = _dcp_train(load_mesh, config, path, save=False)
    return results


@pytest.mark.parametrize("load_mesh", ["dp4-tp1", "dp1-tp2"])
def test_dcp_reshards_between_2d_meshes(load_mesh, request):
    """Saved on (dp=2, tp=2), loaded on (dp=4, tp=1) and on (dp=1, tp=2): equal to uninterrupted."""
    for rank_results in _launch(request, MESHES[load_mesh][0]).case(("dcp", load_mesh)):
        for config, per_param in rank_results.items():
            worst = max(per_param, key=per_param.get)
            assert per_param[worst] <= TOLERANCE, f"{load_mesh} {config}: {worst} off by {per_param[worst]:.3g}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp-dcp"))


@pytest.fixture(scope="module")
def four_ranks(checkpoints):
    cases = {("equal", mesh): (_train_all_configs, (mesh,)) for mesh in ("dp2-tp2", "hsdp2-tp2")}
    cases["mesh checks"] = (_mesh_checks, ())
    cases["triton", "dp2-tp2"] = (_train_with_kernels, ("dp2-tp2",))
    cases["dcp", "dp4-tp1"] = (_dcp_save_then_load, (checkpoints, "dp2-tp2", "dp4-tp1"))  # saves what 2 ranks load
    return Launch(cases, 4, timeout=900)


@pytest.fixture(scope="module")
def two_ranks(checkpoints, four_ranks):
    cases = {("equal", mesh): (_train_all_configs, (mesh,)) for mesh in ("tp2", "dp2-tp1")}
    cases["dcp", "dp1-tp2"] = (_dcp_save_then_load, (checkpoints, None, "dp1-tp2"))
    return Launch(cases, 2, timeout=600)


def _launch(request, world_size: int) -> Launch:
    return request.getfixturevalue({4: "four_ranks", 2: "two_ranks"}[world_size])
