"""Checkpoint forms: compact state expanded into each registered style and compacted back.

One parameter holding a factored segment and a dense one (SMMF, ``vector_reshape=False``), after
real steps; each style must round-trip every state key bit for bit, and the expanded forms must
hold one entry per local element (signs as the style's dtype, never packed).
"""

from __future__ import annotations

import pytest
import torch

import dist_memopt.integrations.megatron  # noqa: F401  (registers the "megatron" style)
from dist_memopt import SMMF, Alada, Segment, ShardSpec, set_layout
from dist_memopt.optim.checkpoint import compact_state, expand_state, per_element_keys


def _stepped(cls, **kwargs):
    param = torch.nn.Parameter(torch.randn(24))
    set_layout(param, [Segment(0, ShardSpec((3, 5), 0, 15), "matrix"), Segment(16, ShardSpec((8,), 0, 8), "vector")])
    optimizer = cls([param], lr=1e-2, **kwargs)
    for seed in range(3):
        param.grad = torch.randn(24, generator=torch.Generator().manual_seed(seed))
        optimizer.step()
    optimizer.synchronize() if hasattr(optimizer, "synchronize") else None
    group = optimizer.param_groups[0]
    return optimizer, param, optimizer._plan(group, param), optimizer.state[param]


@pytest.mark.parametrize("cls,kwargs", [(SMMF, dict(vector_reshape=False)), (SMMF, dict(beta=None)), (Alada, {})])
@pytest.mark.parametrize("style", ["compact", "megatron", "fsdp1"])
def test_expand_then_compact_round_trips(cls, kwargs, style):
    optimizer, param, plan, state = _stepped(cls, **kwargs)
    expanded = expand_state(plan, param, state, optimizer.state_kinds, style)
    per_element = per_element_keys(optimizer.state_kinds)
    if style != "compact":
        for key in per_element:
            if key in state:
                assert expanded[key].numel() == param.numel(), key
                assert expanded[key].dtype != torch.uint8, key
    if style == "fsdp1":
        assert isinstance(expanded["factors"], bytes) and not any(k in expanded for k in ("row_v", "row", "col"))
    restored = compact_state(plan, param, expanded, optimizer.state_kinds)
    assert set(restored) == set(state)
    for key, value in state.items():
        assert torch.equal(restored[key], value), key


def test_unknown_style_names_the_registered_ones():
    optimizer, param, plan, state = _stepped(SMMF)
    with pytest.raises(ValueError, match="unknown checkpoint style 'orbax'.*fsdp1"):
        expand_state(plan, param, state, optimizer.state_kinds, "orbax")
