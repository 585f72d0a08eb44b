"""Host syncs per step: at most one (the non-finite verdict), none with check_finite=False.

On CPU nothing waits, so the test counts the calls that would make a GPU's host wait
(``.item()``/``float()``/``bool()`` of a tensor, ``.tolist()``, ``nonzero``, and tensors made
from host data, each a blocking copy to a GPU; see :class:`~dist_memopt.bench.counting.StepCost`)
during steady-state steps.
"""

from __future__ import annotations

import pytest

import dist_memopt as dm
from dist_memopt.bench.counting import StepCost
from models import AwkwardModel, loss_fn

CASES = {
    "smmf": (dm.SMMF, dict(weight_decay=0.1)),
    "smmf-per-tensor": (dm.SMMF, dict(foreach=False, beta=None)),
    "alada": (dm.Alada, dict(weight_decay=0.1)),
    "alada-in-grad": (dm.Alada, dict(momentum_in_grad=True, foreach=False)),
    "smmf-torch-path": (dm.SMMF, dict(kernel="torch")),
    "alada-torch-path": (dm.Alada, dict(kernel="torch")),
}


def _syncs_per_step(cls, config, check_finite: bool, steps: int = 5) -> tuple[list[int], list[int]]:
    """Syncs and uploads of each step after the first (which creates the state)."""
    model = AwkwardModel()
    optimizer = cls(model.parameters(), lr=1e-2, check_finite=check_finite, **config)
    optimizer.chunk_numel = 40  # the chunked path too
    syncs, uploads = [], []
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        with StepCost() as cost:
            optimizer.step()
        syncs.append(cost.sync_count)
        uploads.append(cost.uploads)
    return syncs[1:], uploads[1:]


@pytest.mark.parametrize("check_finite, expected", [(True, 1), (False, 0)])
@pytest.mark.parametrize("cls, config", CASES.values(), ids=CASES.keys())
def test_a_step_syncs_at_most_once(cls, config, check_finite, expected):
    syncs, uploads = _syncs_per_step(cls, config, check_finite)
    assert syncs == [expected] * 5
    # the CPU kernels' host tables are built at the first steps of each of Alada's two phases, then kept
    assert uploads[2:] == [0, 0, 0]


def test_a_loaded_state_is_read_once_then_counted_on_the_host():
    model = AwkwardModel()
    optimizer = dm.SMMF(model.parameters(), lr=1e-2, check_finite=False)
    for step in range(2):
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        optimizer.step()
    saved = optimizer.state_dict()
    optimizer.load_state_dict(saved)
    params = list(model.parameters())
    with StepCost() as cost:
        optimizer.step()
    assert cost.sync_count == len(params)  # one read per step counter after a load
    with StepCost() as cost:
        optimizer.step()
    assert cost.sync_count == 0
    optimizer.state[params[0]]["step"].fill_(10.0)  # changed in place: read again, not guessed
    optimizer.step()
    assert optimizer.state[params[0]]["step"].item() == 11.0
    assert optimizer.state[params[1]]["step"].item() == 5.0
