"""SMMF's per-element step through torch's fused Adam kernel, and the foreach ops it replaces.

The fused kernel is a private torch op used with an infinite step count (no bias correction):
these tests pin what the torch path relies on, so that a torch that changes it fails here, not
in a user's run. The eager ops stay for devices without the kernel and for SMMF without a first
moment; they meet the float64 references here with the fused path switched off.
"""

import pytest
import torch

import dist_memopt as dm
import dist_memopt.optim.smmf as smmf_module
from dist_memopt.bench.counting import StepCost
from dist_memopt.optim.fused_adam import eager_adam_step, fused_adam_available, fused_adam_step
from reference import SMMFReference
from test_fidelity import SMMF_CONFIGS, _compare

# lengths around the kernel's vector width (tails done in scalar code) and a few thousand
LENGTHS = [1, 7, 8, 17, 4099]


def _inputs(n: int, generator: torch.Generator) -> list[torch.Tensor]:
    weight, grad, first = (torch.randn(n, generator=generator) for _ in range(3))
    second = torch.rand(n, generator=generator) ** 4  # non-negative, spread over magnitudes
    return [weight, grad, first, second]


@pytest.mark.parametrize("beta1, beta2, weight_decay", [(0.9, 0.999, 0.0), (0.0, 0.0, 0.1), (0.5, 0.3, 0.0)])
def test_fused_step_is_adam_without_bias_correction(beta1, beta2, weight_decay):
    """Against the equations in float64, and against the eager ops, on every length at once."""
    generator = torch.Generator().manual_seed(0)
    cases = [_inputs(n, generator) for n in LENGTHS]
    fused = [[t.clone() for t in case] for case in cases]
    eager = [[t.clone() for t in case] for case in cases]
    hp = dict(lr=1e-2, beta1=beta1, beta2=beta2, eps=1e-8)
    fused_adam_step(*(list(ts) for ts in zip(*fused)), weight_decay=weight_decay, **hp)
    w, g, m, v = (list(ts) for ts in zip(*eager))
    decayed = [gi + weight_decay * wi for gi, wi in zip(g, w)]
    torch._foreach_mul_(v, beta2)  # the eager ops take β2·V
    eager_adam_step(w, decayed, m, v, [torch.empty_like(vi) for vi in v], **hp)
    for case, got_fused, got_eager in zip(cases, fused, eager):
        weight, grad, first, second = (t.double() for t in case)
        grad = grad + weight_decay * weight
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        weight = weight - 1e-2 * first / (second.sqrt() + 1e-8)
        fused_weight, fused_grad, fused_first, fused_second = got_fused
        eager_weight, _, eager_first, eager_second = got_eager
        for expected, a, b in zip((weight, first, second), (fused_weight, fused_first, fused_second), (eager_weight, eager_first, eager_second)):
            torch.testing.assert_close(a.double(), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert torch.equal(fused_grad, case[1]), "the gradient stays unchanged in memory"


def test_the_cpu_step_takes_the_fused_kernel():
    """One fused launch per chunk for SMMF with a first moment; the eager ops without one."""
    assert fused_adam_available(torch.device("cpu"))
    for beta, fused in ((0.9, True), (None, False)):
        weight = torch.nn.Parameter(torch.randn(30, 20))
        optimizer = dm.SMMF([weight], lr=1e-2, beta=beta, kernel="torch")
        weight.grad = torch.randn(30, 20)
        with StepCost() as cost:
            optimizer.step()
        assert (cost.ops["_fused_adam_"] == 1) == fused and (cost.ops["_foreach_addcdiv_"] == 0) == fused, cost.ops


@pytest.mark.parametrize("chunk_numel", [None, 40], ids=["whole", "chunked"])
@pytest.mark.parametrize("config", ["adamw-decay", "adam-decay", "transformer-schedule", "dense-vectors"])
def test_eager_ops_meet_the_reference_without_the_fused_kernel(config, chunk_numel, monkeypatch):
    monkeypatch.setattr(smmf_module, "fused_adam_available", lambda device: False)
    _compare(dm.SMMF, SMMFReference, SMMF_CONFIGS[config], chunk_numel)


def test_fused_step_refuses_strided_tensors():
    """The kernel walks raw pointers: a strided view would be stepped as if it were contiguous."""
    weight, grad, first, second = (torch.zeros(8, 2) for _ in range(4))
    with pytest.raises(ValueError, match="contiguous fp32"):
        fused_adam_step([weight[:, 0]], [grad[:, 0]], [first[:, 0]], [second[:, 0]], lr=1e-2, beta1=0.9, beta2=0.9, eps=1e-8)
