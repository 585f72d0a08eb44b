"""torch.distributed.checkpoint: optimizer state saved on 2 ranks loads on 3 and continues exactly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import dist_memopt as dm
from harness import run_distributed
from test_fsdp import CONFIGS, STEPS, TOLERANCE, _full, _single_process, _train, fsdp2_model

SAVED_AT = 4


def _save(rank, world_size, name, path):
    cls_name, config = CONFIGS[name]
    model = fsdp2_model()
    optimizer = getattr(dm, cls_name)(model.parameters(), **config)
    _train(model, optimizer, range(SAVED_AT))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    return sorted(optim_sd["state"]["proj.weight"])


def _load_and_continue(rank, world_size, name, path):
    cls_name, config = CONFIGS[name]
    model = fsdp2_model()
    optimizer = getattr(dm, cls_name)(model.parameters(), **config)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # initializes state to load into
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    steps = {int(s["step"].item()) for s in optimizer.state.values()}
    _train(model, optimizer, range(SAVED_AT, STEPS))
    return _full(model), steps


@pytest.mark.parametrize("name", ["smmf-adamw", "alada"])
def test_dcp_save_on_2_ranks_load_on_3_continues_exactly(name, tmp_path):
    keys = run_distributed(_save, 2, name, str(tmp_path))[0]
    assert ("sign" in keys) if name.startswith("smmf") else ("exp_avg" in keys)
    reference = _single_process(name)
    for full, steps in run_distributed(_load_and_continue, 3, name, str(tmp_path)):
        assert steps == {SAVED_AT}
        for param, expected in reference.items():
            error = (full[param] - expected).abs().max().item()
            assert error <= TOLERANCE * max(1.0, expected.abs().max().item()), f"{param}: off by {error:.3g}"
