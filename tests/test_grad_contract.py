"""Alada(momentum_in_grad=True) refuses a step after its .grad (the momentum) was cleared or replaced."""

import pytest
import torch

import dist_memopt as dm
from models import AwkwardModel, loss_fn


def _setup():
    torch.manual_seed(0)
    model = AwkwardModel()
    return model, dm.Alada(model.named_parameters(), lr=1e-2, momentum_in_grad=True)


def _snapshot(model, optimizer):
    return [p.detach().clone() for p in model.parameters()], {
        id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()
    }


def _assert_unchanged(model, optimizer, snapshot):
    params, state = snapshot
    assert all(torch.equal(a, p.detach()) for a, p in zip(params, model.parameters()))
    assert {id(p) for p in optimizer.state} == set(state)
    for p, s in optimizer.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())


def _good_step(model, optimizer, step):
    optimizer.zero_grad()
    optimizer.scale_loss(loss_fn(model, step)).backward()
    optimizer.step()


@pytest.mark.parametrize(
    "misuse, message",
    [
        (lambda m, o: m.zero_grad(), "step\\(\\) without optimizer.zero_grad\\(\\) since the last step"),
        (lambda m, o: m.zero_grad(set_to_none=False), "without optimizer.zero_grad"),
        (lambda m, o: (o.zero_grad(), m.zero_grad()), "the .grad of parameter 'prime' is not the tensor"),
        (lambda m, o: (o.zero_grad(), setattr(m.proj.weight, "grad", m.proj.weight.grad.clone())),
         "the .grad of parameter 'proj.weight' is not the tensor"),
    ],
    ids=["model-zero-grad", "model-zero-grad-in-place", "cleared-after-zero-grad", "replaced"],
)
def test_broken_loop_contract_raises_before_any_change(misuse, message):
    model, optimizer = _setup()
    for step in range(2):
        _good_step(model, optimizer, step)
    snapshot = _snapshot(model, optimizer)
    misuse(model, optimizer)
    loss_fn(model, 2).backward()
    with pytest.raises(RuntimeError, match=message + ".*momentum_in_grad=False"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)
    _good_step(model, optimizer, 3)  # the right loop recovers


def test_first_step_without_optimizer_zero_grad_raises():
    model, optimizer = _setup()
    loss_fn(model, 0).backward()
    with pytest.raises(RuntimeError, match="without optimizer.zero_grad\\(\\) since the start"):
        optimizer.step()
    assert not optimizer.state


def test_contract_holds_with_gradient_accumulation_and_closures():
    model, optimizer = _setup()
    for step in range(3):
        optimizer.zero_grad()
        for micro in range(2):
            optimizer.scale_loss(loss_fn(model, 2 * step + micro) / 2).backward()
        optimizer.step()

    def closure():  # Lightning's order: zero_grad, forward and backward inside step(closure)
        optimizer.zero_grad()
        loss = loss_fn(model, 9)
        optimizer.scale_loss(loss).backward()
        return loss

    optimizer.step(closure)
    assert all(s["step"].item() == 4 for s in optimizer.state.values())


def test_state_momentum_needs_no_contract():
    torch.manual_seed(0)
    model = AwkwardModel()
    optimizer = dm.Alada(model.parameters())
    for step in range(2):
        model.zero_grad()
        loss_fn(model, step).backward()
        optimizer.step()
