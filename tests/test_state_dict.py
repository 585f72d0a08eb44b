"""state_dict / load_state_dict: bit-identical resume, conventional format, safe failures."""

import io

import pytest
import torch

import dist_memopt as dm
from models import AwkwardModel, loss_fn

OPTIMIZERS = {
    "smmf": lambda params: dm.SMMF(params, lr=1e-2, weight_decay=0.01),
    "smmf-dense": lambda params: dm.SMMF(params, lr=1e-2, vector_reshape=False, beta=0.8),
    "alada": lambda params: dm.Alada(params, lr=1e-2, weight_decay=0.01),
}


def _train(model, optimizer, steps):
    for step in steps:
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        optimizer.step()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_save_load_continue_is_bit_identical(make):
    torch.manual_seed(0)
    reference = AwkwardModel()
    resumed = AwkwardModel()
    resumed.load_state_dict(reference.state_dict())
    opt_ref = make(reference.parameters())
    _train(reference, opt_ref, range(0, 12))

    opt_first = make(resumed.parameters())
    _train(resumed, opt_first, range(0, 5))
    checkpoint = _roundtrip({"model": resumed.state_dict(), "optim": opt_first.state_dict()})

    fresh = AwkwardModel()
    fresh.load_state_dict(checkpoint["model"])
    opt_fresh = make(fresh.parameters())
    opt_fresh.load_state_dict(checkpoint["optim"])
    _train(fresh, opt_fresh, range(5, 12))
    for a, b in zip(reference.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_state_dict_is_conventional():
    torch.manual_seed(0)
    model = AwkwardModel()
    optimizer = dm.SMMF(model.parameters(), lr=1e-2)
    _train(model, optimizer, range(2))
    sd = optimizer.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sorted(sd["state"][2]) == ["col_m", "col_v", "row_m", "row_v", "sign", "step"]
    assert sd["state"][2]["sign"].dtype == torch.uint8
    assert sd["state"][2]["step"].item() == 2
    assert sd["param_groups"][0]["beta"] == 0.9


def test_bf16_parameters_keep_fp32_state_through_load():
    param = torch.nn.Parameter(torch.randn(23, 6, dtype=torch.bfloat16))
    optimizer = dm.Alada([param], lr=1e-2)
    param.grad = torch.randn_like(param)
    optimizer.step()
    saved = _roundtrip(optimizer.state_dict())
    other = dm.Alada([param], lr=1e-2)
    other.load_state_dict(saved)
    assert other.state[param]["exp_avg"].dtype == torch.float32
    assert other.state[param]["row"].dtype == torch.float64
    assert torch.equal(other.state[param]["exp_avg"], optimizer.state[param]["exp_avg"])


def _snapshot(optimizer):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}, [
        {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
    ]


def _assert_unchanged(optimizer, snapshot):
    state, groups = snapshot
    assert {id(p) for p in optimizer.state} == set(state)
    for p, s in optimizer.state.items():
        assert set(s) == set(state[id(p)])
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k])
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups


def test_loading_another_optimizer_type_fails_cleanly():
    torch.manual_seed(0)
    model = AwkwardModel()
    adamw = torch.optim.AdamW(model.parameters())
    smmf = dm.SMMF(model.parameters(), lr=1e-2)
    alada = dm.Alada(model.parameters(), lr=1e-2)
    _train(model, adamw, range(2))
    _train(model, smmf, range(2))
    _train(model, alada, range(2))
    before = _snapshot(smmf)
    with pytest.raises(ValueError, match="lacks \\['beta'"):
        smmf.load_state_dict(adamw.state_dict())
    with pytest.raises(ValueError, match="not saved by SMMF"):
        smmf.load_state_dict(alada.state_dict())
    _assert_unchanged(smmf, before)
    before = _snapshot(alada)
    with pytest.raises(ValueError, match="not saved by Alada"):
        alada.load_state_dict(smmf.state_dict())
    _assert_unchanged(alada, before)


def test_loading_state_for_another_shape_fails_cleanly():
    small = torch.nn.Parameter(torch.randn(23, 6))
    large = torch.nn.Parameter(torch.randn(24, 6))
    opt_small, opt_large = dm.SMMF([small]), dm.SMMF([large])
    small.grad, large.grad = torch.randn_like(small), torch.randn_like(large)
    opt_small.step()
    opt_large.step()
    before = _snapshot(opt_large)
    with pytest.raises(ValueError, match="another shape"):
        opt_large.load_state_dict(opt_small.state_dict())
    _assert_unchanged(opt_large, before)


def test_loading_state_with_missing_keys_fails_cleanly():
    param = torch.nn.Parameter(torch.randn(5, 5))
    optimizer = dm.SMMF([param])
    param.grad = torch.randn_like(param)
    optimizer.step()
    sd = optimizer.state_dict()
    del sd["state"][0]["sign"]
    before = _snapshot(optimizer)
    with pytest.raises(ValueError, match="keys"):
        optimizer.load_state_dict(sd)
    _assert_unchanged(optimizer, before)
