"""The optimizers against dense float64 references written from the papers' equations.

Both run the same gradient sequence (recorded from real backward passes of a model holding a
scalar, vectors, a prime-sized vector, an uneven matrix and a 4-D conv kernel) for 25 steps. The
optimizers compute in fp32, the references in fp64; the tolerance (5e-6 times the parameter
scale, lr 1e-2) covers fp32 rounding accumulated over the steps, about 10x what is observed, and
is far below one step's update (~1e-2), so any departure from the equations fails.
"""

import importlib.util
import os

import pytest
import torch

import dist_memopt as dm
from models import AwkwardModel, loss_fn
from reference import AladaReference, SMMFReference

STEPS = 25
TOLERANCE = 5e-6

SMMF_CONFIGS = {
    "adamw-decay": dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="adamw"),
    "adam-decay": dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="adam"),
    "no-first-moment": dict(lr=1e-2, beta=None),
    "dense-vectors": dict(lr=1e-2, vector_reshape=False, weight_decay=0.05),
    "dense-vectors-no-first-moment": dict(lr=1e-2, vector_reshape=False, beta=None),
    "transformer-schedule": dict(lr=1e-2, decay_rate=-0.8, growth_rate=0.99, beta=0.8, eps=1e-6),
}
ALADA_CONFIGS = {
    "default": dict(lr=1e-2),
    "decay-betas": dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-12),
}


def _compare(optimizer_cls, reference_cls, config, chunk_numel=None, **options):
    model = AwkwardModel()
    names = [n for n, _ in model.named_parameters()]
    optimizer = optimizer_cls(model.named_parameters(), **config, **options)
    optimizer.chunk_numel = chunk_numel
    references = [reference_cls(p, **config) for p in model.parameters()]
    for step in range(STEPS):
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        for name, ref, grad, param in zip(names, references, grads, model.parameters()):
            ref.step(grad)
            scale = max(1.0, ref.w.abs().max().item())
            error = (param.detach().double() - ref.w).abs().max().item()
            assert error <= TOLERANCE * scale, f"step {step + 1}, {name}: off by {error:.3g}"
    return model


# 40 elements per chunk cuts the (23, 54) matrix mid-row: partial rows at chunk boundaries
CHUNKS = pytest.mark.parametrize("chunk_numel", [None, 40], ids=["whole", "chunked"])


@CHUNKS
@pytest.mark.parametrize("foreach", [None, False], ids=["fast-path", "per-tensor"])
@pytest.mark.parametrize("config", SMMF_CONFIGS.values(), ids=SMMF_CONFIGS.keys())
def test_smmf_matches_reference(config, chunk_numel, foreach):
    _compare(dm.SMMF, SMMFReference, config, chunk_numel, foreach=foreach, kernel="torch")


@CHUNKS
@pytest.mark.parametrize("foreach", [None, False], ids=["fast-path", "per-tensor"])
@pytest.mark.parametrize("config", ALADA_CONFIGS.values(), ids=ALADA_CONFIGS.keys())
def test_alada_matches_reference(config, chunk_numel, foreach):
    _compare(dm.Alada, AladaReference, config, chunk_numel, foreach=foreach, kernel="torch")


@pytest.mark.parametrize("cls, reference, config", [(dm.SMMF, SMMFReference, c) for c in SMMF_CONFIGS.values()]
                         + [(dm.Alada, AladaReference, c) for c in ALADA_CONFIGS.values()],
                         ids=[f"smmf-{k}" for k in SMMF_CONFIGS] + [f"alada-{k}" for k in ALADA_CONFIGS])
def test_the_fused_cpu_kernels_match_the_reference(cls, reference, config):
    """``kernel="auto"`` on CPU tensors: the fused CPU kernels (dense vectors stay on the torch path)."""
    _compare(cls, reference, config, kernel="auto")


_INTERPRETED_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = pytest.mark.parametrize(
    "kernel", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.skipif(not _INTERPRETED_TRITON, reason="needs triton and TRITON_INTERPRET=1"))]
)


def check_alada_rare_rows(kernel: str, device: str = "cpu") -> None:
    """A row and a column with gradients 1e-4 of the others: there p qᵀ and β2^(t+1)·v0 agree to
    about 1e-11 of their size, far below fp32's resolution (6e-8), yet Ũ, and with it the update,
    must follow the float64 reference (an fp32 difference turns those updates into lr·M̃/√eps)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(12, 10, device=device))
    config = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-16)
    optimizer = dm.Alada([weight], kernel=kernel, **config)
    reference = AladaReference(weight.cpu(), **config)
    scale = torch.ones(12, 10)
    scale[0], scale[:, 0] = 1e-4, 1e-4
    generator = torch.Generator().manual_seed(1)
    for step in range(8):
        grad = torch.randn(12, 10, generator=generator) * scale
        weight.grad = grad.to(device)
        optimizer.step()
        reference.step(grad)
        error = (weight.detach().cpu().double() - reference.w).abs().max().item()
        assert error <= TOLERANCE * max(1.0, reference.w.abs().max().item()), f"step {step + 1}: off by {error:.3g}"


@KERNELS
def test_alada_rare_rows_keep_their_digits(kernel):
    check_alada_rare_rows(kernel)


@pytest.mark.parametrize("cls, config", [(dm.SMMF, {}), (dm.Alada, {})])
def test_steps_move_parameters_beyond_tolerance(cls, config):
    """Guards the comparison above against a do-nothing optimizer passing it."""
    torch.manual_seed(0)
    model = AwkwardModel()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = cls(model.parameters(), lr=1e-2, **config)
    for step in range(3):
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        optimizer.step()
    for b, p in zip(before, model.parameters()):
        assert (p.detach() - b).abs().max() > 100 * TOLERANCE


def test_alada_momentum_in_grad_equals_state_momentum():
    """Listing 1's M-in-.grad loop gives the same parameters as M kept as optimizer state."""
    torch.manual_seed(0)
    plain, in_grad = AwkwardModel(), AwkwardModel()
    in_grad.load_state_dict(plain.state_dict())
    opt_plain = dm.Alada(plain.parameters(), lr=1e-2, betas=(0.8, 0.9))
    opt_grad = dm.Alada(in_grad.parameters(), lr=1e-2, betas=(0.8, 0.9), momentum_in_grad=True)
    for step in range(STEPS):
        opt_plain.zero_grad()
        loss_fn(plain, step).backward()
        opt_plain.step()
        opt_grad.zero_grad()  # decays the momentum held in .grad by beta1 (creates zeros first)
        opt_grad.scale_loss(loss_fn(in_grad, step)).backward()
        opt_grad.step()
    for a, b in zip(plain.parameters(), in_grad.parameters()):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)
    assert all("exp_avg" not in s for s in opt_grad.state.values())
    assert dm.state_bytes(opt_grad) < dm.state_bytes(opt_plain) / 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_low_precision_parameters_use_fp32_state(cls, dtype):
    """The math runs in fp32: one step on bf16/fp16 weights is the fp32 step, rounded once."""
    torch.manual_seed(0)
    weight32 = torch.randn(23, 6)
    grad32 = torch.randn(23, 6).to(dtype).float()  # a gradient representable in both
    low = torch.nn.Parameter(weight32.to(dtype))
    high = torch.nn.Parameter(low.detach().float())
    opt_low, opt_high = cls([low], lr=1e-2), cls([high], lr=1e-2)
    for _ in range(3):
        low.grad, high.grad = grad32.to(dtype), grad32.clone()
        opt_low.step()
        opt_high.step()
        assert torch.equal(low.detach(), high.detach().to(dtype))
        high.data.copy_(low.detach().float())  # continue both from the same rounded weights
    for value in opt_low.state[low].values():
        assert value.dtype in (torch.float32, torch.float64, torch.uint8)
