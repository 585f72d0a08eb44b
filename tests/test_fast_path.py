"""The fast path (small tensors of one view stepped as a stack) against the per-tensor path.

The per-tensor path (``foreach=False``) and the fast path both meet the float64 references in
test_fidelity.py, where every tensor has its own 2-D view. Here several tensors share a view, so
batches hold more than one; sizes that are not multiples of 8 put padding bits in SMMF's packed
signs, and one tensor is too large for the fast path. Both paths must reach the same parameters
and state.
"""

import pytest
import torch

import dist_memopt as dm
import dist_memopt.optim.alada as alada_module
import dist_memopt.optim.smmf as smmf_module

STEPS = 12
# same-view tensors: three (24,) biases with a (6, 4) matrix, two (7,) vectors, two scalars, two conv kernels
SHAPES = [(24,), (24,), (24,), (7,), (7,), (), (), (4, 3, 3, 3), (4, 3, 3, 3), (13,), (40, 30), (6, 4)]
LARGE = (40, 30)  # 1200 elements: over the batch_numel set below, so it takes the per-tensor path
# the function that steps each stack of segments (a stack of one is the per-tensor path)
BATCH_FUNCTION = {dm.SMMF: (smmf_module, "_factored_step"), dm.Alada: (alada_module, "_refit_and_update")}
CASES = {
    "smmf-adamw-decay": (dm.SMMF, dict(weight_decay=0.1)),
    "smmf-adam-decay": (dm.SMMF, dict(weight_decay=0.1, weight_decay_mode="adam")),
    "smmf-no-first-moment": (dm.SMMF, dict(beta=None)),
    "smmf-dense-vectors": (dm.SMMF, dict(vector_reshape=False, weight_decay=0.05)),
    "alada": (dm.Alada, dict()),
    "alada-decay-betas": (dm.Alada, dict(weight_decay=0.1, betas=(0.8, 0.95))),
    "alada-momentum-in-grad": (dm.Alada, dict(momentum_in_grad=True)),
}


def _run(cls, foreach, config, monkeypatch, dtype=torch.float32):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    optimizer = cls(params, lr=1e-2, foreach=foreach, kernel="torch", **config)
    optimizer.batch_numel = 1000
    batched = []
    module, function = BATCH_FUNCTION[cls]
    original = getattr(module, function)

    def counting(stack, *rest):
        batched.append(sorted(tuple(work.item.param.shape) for work in stack.works))
        original(stack, *rest)

    generator = torch.Generator().manual_seed(1)
    in_grad = config.get("momentum_in_grad", False)
    with monkeypatch.context() as patch:  # this run's stacks only
        patch.setattr(module, function, counting)
        for _ in range(STEPS):
            optimizer.zero_grad()  # momentum_in_grad: M ← β1·M in .grad
            for p in params:
                grad = torch.randn(p.shape, generator=generator).to(dtype)
                if in_grad:
                    p.grad.add_(grad, alpha=1 - optimizer.defaults["betas"][0])
                else:
                    p.grad = grad
            optimizer.step()
    return params, optimizer, batched


@pytest.mark.parametrize("cls, config", CASES.values(), ids=CASES.keys())
def test_fast_path_equals_per_tensor_path(cls, config, monkeypatch):
    fast, fast_opt, batched = _run(cls, None, config, monkeypatch)
    plain, plain_opt, plain_batched = _run(cls, False, config, monkeypatch)
    assert plain_batched and all(len(stack) == 1 for stack in plain_batched)
    # every factored tensor was stepped once per step, the small ones of one view together
    per_step = batched[: len(batched) // STEPS]
    vectors_factored = config.get("vector_reshape", True)
    factored = [s for s in SHAPES if vectors_factored or sum(d != 1 for d in s) > 1]
    assert sorted(s for b in per_step for s in b) == sorted(factored)
    assert [LARGE] in per_step
    if vectors_factored and cls is dm.SMMF:  # square matricization: (24,) is viewed as (6, 4)
        assert [(6, 4), (24,), (24,), (24,)] in per_step and [(), ()] in per_step
    if cls is dm.Alada:  # eq. (12) splits (6, 4) as it is and (24,) by square matricization
        assert [(6, 4), (24,), (24,), (24,)] in per_step
    assert [(4, 3, 3, 3), (4, 3, 3, 3)] in per_step
    for a, b in zip(fast, plain):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= 1e-6 * scale
    for a, b in zip(fast, plain):
        sa, sb = fast_opt.state[a], plain_opt.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if key == "sign":
                # a sign can only differ where M is within rounding of 0: allow a stray bit or two
                assert (sa[key] ^ sb[key]).count_nonzero().item() <= 2, f"{key} of {tuple(a.shape)}"
            elif key != "step":
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_fast_path_keeps_bf16_parameters_and_fp32_state(cls, monkeypatch):
    fast, fast_opt, batched = _run(cls, None, {}, monkeypatch, dtype=torch.bfloat16)
    plain, _, _ = _run(cls, False, {}, monkeypatch, dtype=torch.bfloat16)
    assert any(len(stack) > 1 for stack in batched)
    for a, b in zip(fast, plain):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)  # within one bf16 rounding of the weight
        assert fast_opt.state[a]["row_v" if cls is dm.SMMF else "exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_batches_are_cut_to_the_chunk_size(cls, monkeypatch):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24)) for _ in range(10)]
    optimizer = cls(params, lr=1e-2, kernel="torch")
    optimizer.chunk_numel = 48  # two (24,) tensors per batch
    sizes = []
    module, function = BATCH_FUNCTION[cls]
    original = getattr(module, function)
    monkeypatch.setattr(module, function, lambda stack, *rest: (sizes.append(stack.count), original(stack, *rest)))
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert sizes == [2] * 5
