"""torch.distributed.checkpoint: optimizer state saved on 2 ranks loads on 3 and continues exactly.

One 2-rank launch saves (DCP and FSDP1), then one 3-rank launch loads (harness.Launch, module-scoped
fixtures); each test reads its own cases.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import dist_memopt as dm
from harness import Launch
from models import AwkwardModel
from test_fsdp import CONFIGS, STEPS, TOLERANCE, _full, _single_process, _train, fsdp2_model

SAVED_AT = 4


NAMES = ["smmf-adamw", "alada"]


def _assert_matches(reference, full, label):
    for param, expected in reference.items():
        error = (full[param] - expected).abs().max().item()
        assert error <= TOLERANCE * max(1.0, expected.abs().max().item()), f"{label} {param}: off by {error:.3g}"


def _dcp_save(rank, world_size, path):
    saved = {}
    for name in NAMES:
        cls_name, config = CONFIGS[name]
        model = fsdp2_model()
        optimizer = getattr(dm, cls_name)(model.parameters(), **config)
        _train(model, optimizer, range(SAVED_AT))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{path}/{name}")
        saved[name] = {k: type(v).__name__ for k, v in optim_sd["state"]["proj.weight"].items()}
    return saved


def _dcp_load_and_continue(rank, world_size, path):
    results = {}
    for name in NAMES:
        cls_name, config = CONFIGS[name]
        model = fsdp2_model()
        optimizer = getattr(dm, cls_name)(model.parameters(), **config)
        model_sd, optim_sd = get_state_dict(model, optimizer)  # initializes state to load into
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{path}/{name}")
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        steps = {int(s["step"].item()) for s in optimizer.state.values()}
        _train(model, optimizer, range(SAVED_AT, STEPS))
        results[name] = (_full(model), steps)
    return results


def test_dcp_save_on_2_ranks_load_on_3_continues_exactly(two_ranks, three_ranks):
    saved = two_ranks.case("dcp save")[0]
    # per-element state is sharded like the parameter; factors are plain (replicated) tensors
    assert saved["smmf-adamw"]["sign"] == "DTensor" and saved["smmf-adamw"]["row_m"] == "Tensor"
    assert saved["alada"]["exp_avg"] == "DTensor" and saved["alada"]["row"] == "Tensor"
    for results in three_ranks.case("dcp load"):
        for name in NAMES:
            full, steps = results[name]
            assert steps == {SAVED_AT}
            _assert_matches(_single_process(name), full, name)


def _in_grad_fsdp2():
    model = fsdp2_model()
    return model, dm.Alada(model.parameters(), lr=1e-2, weight_decay=0.05, momentum_in_grad=True)


def _dcp_in_grad(rank, world_size, path):
    """Alada(momentum_in_grad=True) on FSDP2: STEPS steps, and the same saved with DCP after
    SAVED_AT, loaded into fresh objects (whose get_state_dict initializes the state) and continued."""
    model, optimizer = _in_grad_fsdp2()
    _train(model, optimizer, range(STEPS), in_grad=True)
    uninterrupted = _full(model)
    model, optimizer = _in_grad_fsdp2()
    _train(model, optimizer, range(SAVED_AT), in_grad=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    saved = type(optim_sd["state"]["proj.weight"]["exp_avg_in_grad"]).__name__
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{path}/alada-in-grad")
    model, optimizer = _in_grad_fsdp2()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{path}/alada-in-grad")
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    _train(model, optimizer, range(SAVED_AT, STEPS), in_grad=True)
    return uninterrupted, _full(model), saved


def test_dcp_resumes_momentum_in_grad_bit_identically(two_ranks):
    """The momentum FSDP2's .grad holds is saved sharded (a DTensor) and put back into .grad."""
    for uninterrupted, resumed, saved in two_ranks.case("dcp in grad"):
        assert saved == "DTensor"
        for name, expected in uninterrupted.items():
            assert torch.equal(resumed[name], expected), name


def _fsdp1(use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    inner = AwkwardModel()
    return FSDP(inner, device_id=torch.device("cpu"), use_orig_params=use_orig_params, ignored_states=[inner.scale])


def _fsdp1_state_dict_type(model, full):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        ShardedOptimStateDictConfig,
        ShardedStateDictConfig,
        StateDictType,
    )

    if full:
        FSDP.set_state_dict_type(
            model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False), FullOptimStateDictConfig(rank0_only=False)
        )
    else:
        FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(), ShardedOptimStateDictConfig())


def _fsdp1_resume(model, optimizer, model_sd, optim_sd, full):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    _fsdp1_state_dict_type(model, full)
    model.load_state_dict(model_sd)
    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, optim_sd))
    _train(model, optimizer, range(SAVED_AT, STEPS))
    with FSDP.summon_full_params(model):
        return _full(model)


def _fsdp1_save(rank, world_size, path):
    """Sharded optim_state_dict: resume in memory. Full: also write it for another world size."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    results = {}
    for name, use_orig_params in [(name, orig) for name in NAMES for orig in (False, True)]:
        cls_name, config = CONFIGS[name]
        for full in (False, True):
            model = _fsdp1(use_orig_params)
            optimizer = getattr(dm, cls_name)(model.parameters(), **config)
            _train(model, optimizer, range(SAVED_AT))
            _fsdp1_state_dict_type(model, full)
            model_sd, optim_sd = model.state_dict(), FSDP.optim_state_dict(model, optimizer)
            if full and rank == 0:
                torch.save({"model": model_sd, "optim": optim_sd}, f"{path}/{name}-{use_orig_params}.pt")
            fresh = _fsdp1(use_orig_params)
            fresh_optimizer = getattr(dm, cls_name)(fresh.parameters(), **config)
            results[name, use_orig_params, full] = _fsdp1_resume(fresh, fresh_optimizer, model_sd, optim_sd, full)
    return results


def _fsdp1_load_full(rank, world_size, path):
    results = {}
    for name, use_orig_params in [(name, orig) for name in NAMES for orig in (False, True)]:
        cls_name, config = CONFIGS[name]
        checkpoint = torch.load(f"{path}/{name}-{use_orig_params}.pt", weights_only=True)
        model = _fsdp1(use_orig_params)
        optimizer = getattr(dm, cls_name)(model.parameters(), **config)
        results[name, use_orig_params] = _fsdp1_resume(model, optimizer, checkpoint["model"], checkpoint["optim"], True)
    return results


def test_fsdp1_optim_state_dict_full_and_sharded(two_ranks, three_ranks):
    """FSDP1's optim_state_dict / optim_state_dict_to_load, flat and orig-params, full and sharded
    (each resumed in memory on 2 ranks); the full ones also written on 2 ranks, loaded on 3."""
    references = {name: _single_process(name) for name in NAMES}
    for rank_results in two_ranks.case("fsdp1 save"):
        for (name, orig, full), params in rank_results.items():
            _assert_matches(references[name], params, f"2 ranks {name} orig={orig} full={full}")
    for rank_results in three_ranks.case("fsdp1 load"):
        for (name, orig), params in rank_results.items():
            _assert_matches(references[name], params, f"3 ranks {name} orig={orig}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fsdp-checkpoints"))


@pytest.fixture(scope="module")
def two_ranks(checkpoints):
    return Launch({"dcp save": (_dcp_save, (checkpoints,)), "fsdp1 save": (_fsdp1_save, (checkpoints,)),
                   "dcp in grad": (_dcp_in_grad, (checkpoints,))}, 2)


@pytest.fixture(scope="module")
def three_ranks(checkpoints, two_ranks):  # loads what the 2-rank launch saved
    return Launch({"dcp load": (_dcp_load_and_continue, (checkpoints,)), "fsdp1 load": (_fsdp1_load_full, (checkpoints,))}, 3)
