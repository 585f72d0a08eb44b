"""SMMF and Alada inside Megatron-core's real DDP + DistributedOptimizer, on CPU over gloo.

Megatron's own code builds everything: DDP's contiguous buffers and buckets, the distributed
optimizer's ``param_range_map`` shards (fp32 main parameters), its grad copies, clipping, loss
scaling, parameter all-gather and distributed checkpointing; :mod:`.cpu_shims` only redirects its
CUDA allocations to the CPU. The model (AwkwardModel) is split by a 700-element bucket size into
two buckets, so on 2 ranks a 4-D conv kernel and a 23x54 matrix straddle the shard boundary while
vectors, a 0-d scalar and a 2x23 matrix lie entirely on one rank and are empty on the other; on 3
ranks the splits differ. Every rank trains on the same batches, so after 10 steps the weights must
equal one process running the same optimizer with the same clipping (tolerance 1e-6 of the
parameter scale). Two processes: 2 ranks (exactness, layouts, checkpoint/resume, an expert-parallel
parameter), then 3 ranks (the 2-rank checkpoint resharded, bf16 with loss scaling and a skipped
step, the whole-parameter fp32 and bf16 optimizers, an expert parameter at expert tensor parallel
size 3).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("megatron.core")

import megatron_setup as ms  # noqa: E402
from harness import run_distributed  # noqa: E402

STEPS = 10
SAVE_AT = 5
NAN_STEP = 3
TOLERANCE = 1e-6
RESUMED = ("smmf-adamw", "alada")


def _build(name: str, dtype: torch.dtype = torch.float32, distributed: bool = True, expert_param: bool = False, **fields):
    from dist_memopt.integrations.megatron import get_megatron_optimizer

    ddp = ms.wrap_ddp(ms.megatron_model(dtype, expert_param=expert_param), distributed_optimizer=distributed)
    config = ms.optimizer_config(name, distributed, **fields)
    return ddp, get_megatron_optimizer(config, [ddp], **ms.OPTIMIZERS[name][1])


def _save(ddp, optimizer, path: str) -> None:
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    model_state = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state)}, path)


def _load(ddp, optimizer, path: str, with_optimizer: bool = True) -> None:
    from megatron.core import dist_checkpointing

    model_state = ddp.module.sharded_state_dict()
    wanted = {"model": model_state}
    if with_optimizer:
        wanted["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True)
    loaded = dist_checkpointing.load(wanted, path)
    ddp.module.load_state_dict(loaded["model"])
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])


def _layouts(optimizer) -> list[dict]:
    """Per tensor the DistributedOptimizer steps: our declared range and group, Megatron's range map."""
    from dist_memopt.shard.spec import layout_of

    rows = []
    for megatron_optimizer in optimizer.chained_optimizers:
        for entry in megatron_optimizer._state_entries():
            spec = layout_of(entry.tensor).segments[0].spec
            owned = entry.model_param in megatron_optimizer.model_param_gbuf_map
            megatron_range = megatron_optimizer._get_model_param_range_map(entry.model_param)["param"] if owned else None
            gbuf, _, bucket = megatron_optimizer.model_param_gbuf_map.get(entry.model_param, (None, None, None))
            rows.append(dict(
                name=megatron_optimizer._param_name(entry.model_param),
                shape=tuple(entry.model_param.shape),
                start=spec.start, end=spec.end, numel=entry.tensor.numel(),
                group_size=None if spec.group is None else spec.group.size(),
                megatron=None if megatron_range is None else (megatron_range.start, megatron_range.end),
                bucket=bucket,
                buckets=sum(len(b.buckets) for b in megatron_optimizer.buffers),
            ))
    return rows


def _inner(optimizer):
    return [o.optimizer for o in optimizer.chained_optimizers]


def _two_ranks(rank: int, world_size: int, root: str) -> dict:
    ms.init_parallel()
    results: dict = {"runs": {}}
    for name in ms.OPTIMIZERS:
        ddp, optimizer = _build(name)
        if name == "smmf-adamw":
            results["layouts"] = _layouts(optimizer)
        returned = ms.train_megatron(ddp, optimizer, range(SAVE_AT))
        _save(ddp, optimizer, f"{root}/{name}")
        returned += ms.train_megatron(ddp, optimizer, range(SAVE_AT, STEPS))
        run = results["runs"][name] = dict(weights=ms.model_weights(ddp), returned=returned)
        if name in RESUMED:
            ddp, optimizer = _build(name)
            _load(ddp, optimizer, f"{root}/{name}")
            ms.train_megatron(ddp, optimizer, range(SAVE_AT, STEPS))
            run["resumed"] = ms.model_weights(ddp)
        if name == "smmf-adamw":  # the same, without the optimizer state: must not match
            ddp, optimizer = _build(name)
            _load(ddp, optimizer, f"{root}/{name}", with_optimizer=False)
            ms.train_megatron(ddp, optimizer, range(SAVE_AT, STEPS))
            run["model_only"] = ms.model_weights(ddp)
    ddp, optimizer = _build("alada", expert_param=True)
    ms.train_megatron(ddp, optimizer, range(STEPS))
    results["expert"] = dict(
        weights=ms.model_weights(ddp),
        groups=[[g["is_expert_parallel"] for g in o.param_groups] for o in _inner(optimizer)],
    )
    return results


def _three_ranks(rank: int, world_size: int, root: str) -> dict:
    from megatron.core import parallel_state

    ms.init_parallel()
    results: dict = {"resharded": {}}
    for name in RESUMED:  # written by 2 ranks at step 5
        ddp, optimizer = _build(name)
        _load(ddp, optimizer, f"{root}/{name}")
        ms.train_megatron(ddp, optimizer, range(SAVE_AT, STEPS))
        results["resharded"][name] = ms.model_weights(ddp)

    results["bf16"] = {}
    for name in ("smmf-adamw", "alada"):
        ddp, optimizer = _build(name, torch.bfloat16, bf16=True, loss_scale=1024.0)
        returned = ms.train_megatron(ddp, optimizer, range(STEPS), torch.bfloat16, nan_step=NAN_STEP)
        steps = {int(s["step"]) for o in _inner(optimizer) for s in o.state.values()}
        results["bf16"][name] = dict(
            main=ms.main_weights(ddp, optimizer), model=ms.model_weights(ddp), returned=returned, steps=steps,
        )

    # without the distributed optimizer: whole parameters (Megatron's FP32Optimizer over DDP's all-reduce)
    ddp, optimizer = _build("smmf-adamw", distributed=False)
    ms.train_megatron(ddp, optimizer, range(SAVE_AT))
    _save(ddp, optimizer, f"{root}/whole")
    ms.train_megatron(ddp, optimizer, range(SAVE_AT, STEPS))
    results["whole"] = dict(weights=ms.model_weights(ddp), wrapper=type(optimizer.chained_optimizers[0]).__name__)
    ddp, optimizer = _build("smmf-adamw")  # its checkpoint, into the distributed optimizer
    _load(ddp, optimizer, f"{root}/whole")
    ms.train_megatron(ddp, optimizer, range(SAVE_AT, STEPS))
    results["whole_into_distributed"] = ms.model_weights(ddp)
    # bf16 without the distributed optimizer: Megatron's Float16OptimizerWithFloat16Params
    ddp, optimizer = _build("alada", torch.bfloat16, distributed=False, bf16=True)
    ms.train_megatron(ddp, optimizer, range(STEPS), torch.bfloat16)
    wrapper = optimizer.chained_optimizers[0]
    names = {id(p): n for n, p in ms.model_weights_named(ddp)}
    results["whole_bf16"] = dict(
        wrapper=type(wrapper).__name__,
        main={
            names[id(model)]: main.detach().clone()
            for models, mains in zip(wrapper.float16_groups, wrapper.fp32_from_float16_groups)
            for model, main in zip(models, mains)
        },
    )

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(3, 1)  # expert tensor parallelism follows TP: 3
    ddp, optimizer = _build("smmf-adamw", expert_param=True)  # a model that splits nothing: replicated over TP
    ms.train_megatron(ddp, optimizer, range(STEPS))
    results["expert_tensor_parallel"] = ms.model_weights(ddp)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("megatron-checkpoints"))
    two = run_distributed(_two_ranks, 2, root, timeout=400, daemon=False)
    three = run_distributed(_three_ranks, 3, root, timeout=400, daemon=False)
    return two, three


def _assert_close(got: dict, expected: dict, label: str) -> None:
    for param, value in expected.items():
        error = (got[param] - value).abs().max().item()
        assert error <= TOLERANCE * max(1.0, value.abs().max().item()), f"{label}, {param}: off by {error:.3g}"


def test_layouts_are_megatrons_range_maps(runs):
    """Each shard's declared range is Megatron's param_range_map; ranks tile every parameter exactly."""
    two, _ = runs
    per_rank = [result["layouts"] for result in two]
    names = [row["name"] for row in per_rank[0]]
    assert [[row["name"] for row in rows] for rows in per_rank] == [names] * 2  # same order everywhere
    for rows in per_rank:
        for row in rows:
            assert row["numel"] == row["end"] - row["start"] and row["group_size"] == 2
            if row["megatron"] is None:
                assert row["numel"] == 0, row
            else:
                assert (row["start"], row["end"]) == row["megatron"], row
    kinds = {"split": 0, "one rank": 0}
    for index, name in enumerate(names):
        pieces = sorted((rows[index]["start"], rows[index]["end"]) for rows in per_rank if rows[index]["numel"])
        numel = math.prod(per_rank[0][index]["shape"])
        assert pieces[0][0] == 0 and pieces[-1][1] == numel, (name, pieces)
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:])), (name, pieces)
        kinds["split" if len(pieces) > 1 else "one rank"] += 1
    shapes = {row["name"]: row["shape"] for row in per_rank[0]}
    split = {n for i, n in enumerate(names) if all(rows[i]["numel"] for rows in per_rank)}
    assert any(len(shapes[n]) == 4 for n in split) and kinds["one rank"] >= 4, (split, kinds)
    assert per_rank[0][0]["buckets"] == 2 and {row["bucket"] for row in per_rank[0] if row["bucket"] is not None} == {0, 1}


@pytest.mark.parametrize("name", list(ms.OPTIMIZERS))
def test_distributed_optimizer_equals_single_process(runs, name):
    two, _ = runs
    reference, norms = ms.train_reference(name, STEPS)
    for rank, result in enumerate(two):
        run = result["runs"][name]
        _assert_close(run["weights"], reference, f"{name}, rank {rank}")
        # step() returns (success, grad norm before clipping, zeros in grads) as with Adam
        assert all(ok is True and zeros in (0, None) for ok, _, zeros in run["returned"])
        for (_, norm, _), expected in zip(run["returned"], norms):
            assert norm == pytest.approx(expected, rel=1e-5)
    assert max(norms[:3]) > ms.CLIP  # clipping was active


@pytest.mark.parametrize("name", RESUMED)
def test_checkpoint_resumes_exactly(runs, name):
    two, _ = runs
    for result in two:
        run = result["runs"][name]
        for param, value in run["weights"].items():
            assert torch.equal(run["resumed"][param], value), f"{name}, {param}"
    model_only = two[0]["runs"]["smmf-adamw"]["model_only"]
    assert any(not torch.equal(model_only[p], v) for p, v in two[0]["runs"]["smmf-adamw"]["weights"].items())


def test_expert_parallel_parameter_uses_its_own_group(runs):
    two, _ = runs
    reference, _ = ms.train_reference("alada", STEPS)
    for result in two:
        assert result["expert"]["groups"] == [[False, False], [True]]
        _assert_close(result["expert"]["weights"], reference, "alada with an expert-parallel parameter")


@pytest.mark.parametrize("name", RESUMED)
def test_checkpoint_of_2_ranks_loads_on_3(runs, name):
    _, three = runs
    reference, _ = ms.train_reference(name, STEPS)
    for rank, result in enumerate(three):
        _assert_close(result["resharded"][name], reference, f"{name} resumed on 3 ranks, rank {rank}")


@pytest.mark.parametrize("name", ["smmf-adamw", "alada"])
def test_bf16_with_loss_scaling_and_a_skipped_step(runs, name):
    """bf16 parameters, fp32 main shards, constant loss scale; a NaN loss makes Megatron skip the step."""
    _, three = runs
    reference, _ = ms.train_reference(name, STEPS, torch.bfloat16, nan_step=NAN_STEP)
    for rank, result in enumerate(three):
        run = result["bf16"][name]
        _assert_close(run["main"], reference, f"{name} bf16, rank {rank}")
        for param, main in run["main"].items():
            assert torch.equal(run["model"][param], main.to(torch.bfloat16).float())
        assert run["returned"][NAN_STEP] == (False, None, None)
        assert all(r[0] is True for i, r in enumerate(run["returned"]) if i != NAN_STEP)
        assert run["steps"] == {STEPS - 1}


def test_without_distributed_optimizer(runs):
    _, three = runs
    reference, _ = ms.train_reference("smmf-adamw", STEPS)
    for result in three:
        assert result["whole"]["wrapper"] == "FactoredFP32Optimizer"
        _assert_close(result["whole"]["weights"], reference, "FP32Optimizer")
        _assert_close(result["whole_into_distributed"], reference, "FP32Optimizer checkpoint in DistributedOptimizer")


def test_bf16_without_distributed_optimizer(runs):
    _, three = runs
    reference, _ = ms.train_reference("alada", STEPS, torch.bfloat16)
    for result in three:
        assert result["whole_bf16"]["wrapper"] == "FactoredFloat16Optimizer"
        _assert_close(result["whole_bf16"]["main"], reference, "Float16OptimizerWithFloat16Params")


def test_expert_parameter_at_expert_tensor_parallel_size_3(runs):
    """Expert tensor parallelism (split experts: test_megatron_expert_tensor_parallel.py) on a model
    whose expert parameter is replicated over the expert-TP ranks: stepped like one process."""
    _, three = runs
    reference, _ = ms.train_reference("smmf-adamw", STEPS)
    for rank, result in enumerate(three):
        _assert_close(result["expert_tensor_parallel"], reference, f"expert parameter at TP=3, rank {rank}")
