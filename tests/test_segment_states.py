"""FactoredOptimizer.segment_states: per-segment views that tile the concatenated state exactly."""

import pytest
import torch

import dist_memopt as dm
from dist_memopt.optim.state_layout import STATE_KINDS
from dist_memopt.shard.spec import Segment, ShardSpec, layout_of, set_layout

OPTIMIZERS = {
    "smmf": lambda params: dm.SMMF(params, lr=1e-2),
    "smmf-dense": lambda params: dm.SMMF(params, lr=1e-2, vector_reshape=False),
    "alada": lambda params: dm.Alada(params, lr=1e-2),
}


def _flat_holding_three_parameters():
    """One tensor holding a (3, 5) matrix, a 7-vector and a scalar back to back, 2 padding
    elements after the matrix: the shape of a ZeRO partition."""
    flat = torch.nn.Parameter(torch.randn(15 + 2 + 7 + 1))
    set_layout(
        flat,
        [
            Segment(0, ShardSpec((3, 5), 0, 15), "matrix"),
            Segment(17, ShardSpec((7,), 0, 7), "vector"),
            Segment(24, ShardSpec((), 0, 1), "scalar"),
        ],
    )
    return flat


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_views_tile_every_state_tensor(make):
    flat = _flat_holding_three_parameters()
    optimizer = make([flat])
    flat.grad = torch.randn_like(flat)
    optimizer.step()
    state = optimizer.state[flat]
    pieces = optimizer.segment_states(optimizer.param_groups[0], layout_of(flat), state)
    assert [seg.name for seg, _ in pieces] == ["matrix", "vector", "scalar"]
    assert set(optimizer.state_kinds.values()) <= set(STATE_KINDS)
    for key, value in state.items():
        if key == "step":
            continue
        covered = torch.zeros(value.numel(), dtype=torch.int64)
        for _, views in pieces:
            if key in views:
                view = views[key]
                assert view.untyped_storage().data_ptr() == value.untyped_storage().data_ptr(), key
                start = (view.data_ptr() - value.data_ptr()) // value.element_size()
                covered[start : start + view.numel()] += 1
        assert torch.equal(covered, torch.ones_like(covered)), f"{key} is not tiled exactly once"


def test_view_sizes_follow_each_kind():
    flat = _flat_holding_three_parameters()
    optimizer = dm.Alada([flat], lr=1e-2)
    flat.grad = torch.randn_like(flat)
    optimizer.step()
    pieces = dict((seg.name, views) for seg, views in optimizer.segment_states(optimizer.param_groups[0], layout_of(flat), optimizer.state[flat]))
    assert pieces["matrix"]["exp_avg"].numel() == 15  # per element of the range
    assert (pieces["matrix"]["row"].numel(), pieces["matrix"]["col"].numel()) == (3, 5)  # eq. (12)
    assert pieces["vector"]["row"].numel() * pieces["vector"]["col"].numel() == 7
    assert pieces["scalar"]["v0"].numel() == 1
    assert torch.equal(pieces["matrix"]["exp_avg"], optimizer.state[flat]["exp_avg"][:15])


def test_no_state_yet_gives_no_views():
    flat = _flat_holding_three_parameters()
    optimizer = dm.SMMF([flat], lr=1e-2)
    pieces = optimizer.segment_states(optimizer.param_groups[0], layout_of(flat), {})
    assert [views for _, views in pieces] == [{}, {}, {}]


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_new_state_has_the_shape_of_a_stepped_one(make):
    flat = _flat_holding_three_parameters()
    optimizer = make([flat])
    fresh = optimizer.new_state(optimizer.param_groups[0], layout_of(flat), flat.device)
    flat.grad = torch.randn_like(flat)
    optimizer.step()
    stepped = optimizer.state[flat]
    assert fresh.keys() == stepped.keys()
    for key in fresh:
        assert fresh[key].shape == stepped[key].shape and fresh[key].dtype == stepped[key].dtype, key
