"""Bad input gets a clear error naming the argument or parameter, and changes no state."""

import math

import pytest
import torch

import dist_memopt as dm
from dist_memopt import NonFiniteGradientError
from dist_memopt.optim.base import first_nonfinite
from dist_memopt.shard.probe import kept_upload
from models import AwkwardModel, loss_fn


def _param():
    return torch.nn.Parameter(torch.randn(4, 3))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(lr="fast"), "lr"),
        (dict(beta=1.0), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(decay_rate=0.5), "decay_rate"),
        (dict(decay_rate=0.0), "decay_rate"),
        (dict(growth_rate=1.5), "growth_rate"),
        (dict(growth_rate=math.inf), "growth_rate"),
        (dict(vector_reshape="yes"), "vector_reshape"),
        (dict(weight_decay_mode="l2"), "weight_decay_mode"),
        (dict(foreach="auto"), "foreach"),
    ],
)
def test_smmf_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}.*{kwargs[name]!r}"[:40].replace("(", "\\(").replace("[", "\\[")):
        dm.SMMF([_param()], **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), "betas\\[0\\]"),
        (dict(betas=(0.9, -0.5)), "betas\\[1\\]"),
        (dict(betas=0.9), "betas"),
        (dict(eps=-1.0), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(momentum_in_grad=1), "momentum_in_grad"),
        (dict(foreach=1), "foreach"),
    ],
)
def test_alada_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        dm.Alada([_param()], **kwargs)


def test_invalid_group_override_names_the_group():
    with pytest.raises(ValueError, match="Invalid lr \\(param group 1\\): -0.5"):
        dm.SMMF([{"params": [_param()]}, {"params": [_param()], "lr": -0.5}])


def test_hyperparameter_changed_after_construction_is_caught_before_stepping():
    p = _param()
    optimizer = dm.SMMF([p])
    optimizer.param_groups[0]["beta"] = 2.0
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="Invalid beta"):
        optimizer.step()
    assert torch.equal(p.detach(), before) and not optimizer.state


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_complex_parameters_are_rejected(cls):
    with pytest.raises(ValueError, match="complex parameters.*view_as_real"):
        cls([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_sparse_gradients_are_rejected(cls):
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    optimizer = cls(embedding.named_parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients \\(parameter 'weight'\\)"):
        optimizer.step()
    assert not optimizer.state


@pytest.mark.parametrize("steps_before", [0, 2], ids=["first-step", "third-step"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_non_finite_gradient_names_the_parameter_and_changes_nothing(cls, bad, steps_before):
    """Also where the step's bookkeeping ran while the gradients were scanned: no state created
    (first step), no step count or factor changed (later steps)."""
    torch.manual_seed(0)
    model = AwkwardModel()
    optimizer = cls(model.named_parameters(), lr=1e-2)
    for step in range(steps_before):
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        optimizer.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    optimizer.zero_grad()
    loss_fn(model, 2).backward()
    model.proj.weight.grad[3, 7] = bad
    with pytest.raises(NonFiniteGradientError, match="parameter 'proj.weight' of shape \\(23, 54\\)"):
        optimizer.step()
    for before, p in zip(params, model.parameters()):
        assert torch.equal(before, p.detach())
    assert len(optimizer.state) == len(state)
    for p, s in optimizer.state.items():
        assert s.keys() == state[id(p)].keys()
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("numel", [1, 7, 8, 33, 4099])
def test_first_nonfinite_finds_a_bad_element_anywhere(numel, bad):
    for position in sorted({0, numel // 2, numel - 1}):
        tensors = [torch.randn(5), torch.tensor(0.5), torch.randn(numel), torch.randn(3, 3)]
        tensors[2][position] = bad
        assert first_nonfinite(tensors) == 2, position
    scalar = torch.tensor(bad)
    assert first_nonfinite([torch.randn(3), scalar]) == 1


def test_first_nonfinite_is_exact_when_squares_overflow():
    huge = torch.full((1000,), 3e38)  # finite, but its squares overflow float32
    assert first_nonfinite([huge, -huge, torch.randn(4)]) is None
    with_nan = torch.randn(4)
    with_nan[1] = math.nan
    assert first_nonfinite([huge, torch.randn(4), with_nan]) == 2
    assert first_nonfinite([]) is None
    p = _param()
    p.grad = torch.full_like(p, 1e30)
    dm.SMMF([p]).step()  # finite, so no NonFiniteGradientError


def test_non_finite_check_can_be_switched_off():
    p = _param()
    optimizer = dm.SMMF([p], check_finite=False)
    p.grad = torch.full_like(p, math.nan)
    optimizer.step()  # no error: the user asked for speed over the check
    assert torch.isnan(p).all()


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_the_checked_parameters_are_named_right_after_they_change(cls):
    """The torch path keeps the checked parameters' indices on the device between steps; a group
    that stops checking changes them, and the error must still name the bad parameter."""
    a, b, c = _param(), _param(), _param()
    optimizer = cls([{"params": [a]}, {"params": [b]}, {"params": [c]}], kernel="torch")
    for _ in range(2):
        for p in (a, b, c):
            p.grad = torch.randn_like(p)
        optimizer.step()
    optimizer.param_groups[0]["check_finite"] = False
    a.grad, b.grad, c.grad = torch.full_like(a, math.nan), torch.randn_like(b), torch.full_like(c, math.inf)
    with pytest.raises(NonFiniteGradientError, match="param_groups\\[2\\]\\['params'\\]\\[0\\]"):
        optimizer.step()


def test_kept_uploads_are_made_again_when_their_values_change():
    kept: dict = {}
    first = kept_upload(kept, "slot", (1.0, 2.0), torch.device("cpu"))
    assert kept_upload(kept, "slot", (1.0, 2.0), torch.device("cpu")) is first
    assert kept_upload(kept, "other", (1.0, 2.0), torch.device("cpu")) is not first
    again = kept_upload(kept, "slot", (1.0, 3.0), torch.device("cpu"))
    assert again is not first and again.tolist() == [1.0, 3.0]
    assert kept_upload(None, "slot", (1.0, 3.0), torch.device("cpu")) is not again


def test_unnamed_parameters_are_located_by_group_and_index():
    a, b = _param(), _param()
    optimizer = dm.SMMF([{"params": [a]}, {"params": [b]}])
    a.grad, b.grad = torch.randn_like(a), torch.full_like(b, math.inf)
    with pytest.raises(NonFiniteGradientError, match="param_groups\\[1\\]\\['params'\\]\\[0\\]"):
        optimizer.step()


def test_scale_loss_needs_a_single_beta1():
    a, b = _param(), _param()
    optimizer = dm.Alada(
        [{"params": [a], "betas": (0.8, 0.9)}, {"params": [b], "betas": (0.9, 0.9)}], momentum_in_grad=True
    )
    with pytest.raises(ValueError, match="one beta1"):
        optimizer.scale_loss(torch.tensor(1.0))
