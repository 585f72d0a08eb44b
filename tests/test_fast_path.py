"""SMMF's fast path (small whole tensors stepped as a batch) against its per-tensor path.

The per-tensor path (``foreach=False``) is the one the float64 references check in
test_fidelity.py; here the fast path must reach the same parameters and state on a model where
several tensors share a 2-D view (so batches hold more than one), sizes are not multiples of 8
(padding bits in the packed signs), and one tensor is too large for the fast path.
"""

import pytest
import torch

import dist_memopt as dm
import dist_memopt.optim.smmf as smmf_module

STEPS = 12
# same-view tensors: three (24,) biases, two (7,) vectors, two scalars, two conv kernels
SHAPES = [(24,), (24,), (24,), (7,), (7,), (), (), (4, 3, 3, 3), (4, 3, 3, 3), (13,), (40, 30), (6, 4)]
LARGE = (40, 30)  # 1200 elements: over the batch_numel set below, so it takes the per-tensor path
CONFIGS = {
    "adamw-decay": dict(weight_decay=0.1),
    "adam-decay": dict(weight_decay=0.1, weight_decay_mode="adam"),
    "no-first-moment": dict(beta=None),
    "dense-vectors": dict(vector_reshape=False, weight_decay=0.05),
}


def _run(foreach, config, monkeypatch, dtype=torch.float32):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    optimizer = dm.SMMF(params, lr=1e-2, foreach=foreach, **config)
    optimizer.batch_numel = 1000
    batched = []
    original = smmf_module._factored_batch_step

    def counting(batch, hp):
        batched.append(sorted(tuple(item.param.shape) for item, _ in batch))
        original(batch, hp)

    monkeypatch.setattr(smmf_module, "_factored_batch_step", counting)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(dtype)
        optimizer.step()
    return params, optimizer, batched


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_fast_path_equals_per_tensor_path(config, monkeypatch):
    fast, fast_opt, batched = _run(None, config, monkeypatch)
    plain, plain_opt, plain_batched = _run(False, config, monkeypatch)
    assert plain_batched == []
    # every factored tensor but the large one went through a batch, same views together
    per_step = batched[: len(batched) // STEPS]
    vectors_factored = config.get("vector_reshape", True)
    factored = [s for s in SHAPES if s != LARGE and (vectors_factored or sum(d != 1 for d in s) > 1)]
    assert sorted(s for b in per_step for s in b) == sorted(factored)
    if vectors_factored:  # (6, 4) and the (24,) vectors share the (6, 4) view
        assert [(6, 4), (24,), (24,), (24,)] in per_step and [(), ()] in per_step
    assert [(4, 3, 3, 3), (4, 3, 3, 3)] in per_step
    for a, b in zip(fast, plain):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= 1e-6 * scale
        assert not torch.equal(a, torch.zeros_like(a))
    for a, b in zip(fast, plain):
        sa, sb = fast_opt.state[a], plain_opt.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if key == "sign":
                # a sign can only differ where M is within rounding of 0: allow a stray bit or two
                diff = (sa[key] ^ sb[key]).count_nonzero().item()
                assert diff <= 2, f"{key} of {tuple(a.shape)}"
            elif key != "step":
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-7)


def test_fast_path_keeps_bf16_parameters_and_fp32_state(monkeypatch):
    fast, fast_opt, batched = _run(None, {}, monkeypatch, dtype=torch.bfloat16)
    plain, _, _ = _run(False, {}, monkeypatch, dtype=torch.bfloat16)
    assert batched
    for a, b in zip(fast, plain):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)  # within one bf16 rounding of the weight
        state = fast_opt.state[a]
        assert state["row_v"].dtype == torch.float32


def test_batches_are_cut_to_the_chunk_size(monkeypatch):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24)) for _ in range(10)]
    optimizer = dm.SMMF(params, lr=1e-2)
    optimizer.chunk_numel = 48  # two (24,) tensors per batch
    sizes = []
    original = smmf_module._factored_batch_step
    monkeypatch.setattr(smmf_module, "_factored_batch_step", lambda batch, hp: (sizes.append(len(batch)), original(batch, hp)))
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert sizes == [2] * 5
