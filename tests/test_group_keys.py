"""Param-group keys meant for another optimizer are errors naming the key; torch's own keys work."""

import pytest
import torch

import dist_memopt as dm


def _params(n: int = 2) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n)]


@pytest.mark.parametrize(
    "cls, key, value, hint",
    [
        (dm.SMMF, "betas", (0.9, 0.95), "write beta=betas\\[0\\]"),
        (dm.SMMF, "decoupled_weight_decay", True, "weight_decay_mode"),
        (dm.Alada, "beta", 0.9, "betas=\\(beta1, beta2\\)"),
        (dm.SMMF, "fused", True, "no fused kernel"),
        (dm.Alada, "fused", True, "no fused kernel"),
        (dm.Alada, "amsgrad", True, "AMSGrad"),
        (dm.SMMF, "maximize", True, "negate the loss"),
    ],
)
def test_ignored_key_is_refused_in_the_constructor_and_in_later_groups(cls, key, value, hint):
    first, second = _params()
    with pytest.raises(ValueError, match=f"{cls.__name__} ignores the param-group key '{key}' \\(param group 1\\).*{hint}"):
        cls([{"params": [first]}, {"params": [second], key: value}])
    optimizer = cls([first])
    with pytest.raises(ValueError, match=f"ignores the param-group key '{key}' \\(param group 1\\)"):
        optimizer.add_param_group({"params": [second], key: value})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_flags_that_are_off_and_param_names_are_accepted(cls):
    (p,) = _params(1)
    optimizer = cls([{"params": [p], "param_names": ["w"], "fused": False, "foreach": True, "amsgrad": False, "capturable": False}])
    p.grad = torch.randn_like(p)
    optimizer.step()
    assert optimizer.param_groups[0]["param_names"] == ["w"]


@pytest.mark.parametrize(
    "cls, scheduler",
    [
        (dm.SMMF, lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=5, cycle_momentum=False)),
        (dm.Alada, lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=5)),  # cycles betas[0]
        (dm.SMMF, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)),
        (dm.Alada, lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=3)),
    ],
)
def test_keys_added_by_lr_schedulers_keep_working(cls, scheduler):
    params = _params()
    optimizer = cls(params[:1], lr=1e-3)
    optimizer.add_param_group({"params": params[1:], "initial_lr": 1e-3, "max_lr": 1e-2, "min_lr": 0.0})
    sched = scheduler(optimizer)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        sched.step()
    assert "initial_lr" in optimizer.param_groups[0]
    optimizer.load_state_dict(optimizer.state_dict())
