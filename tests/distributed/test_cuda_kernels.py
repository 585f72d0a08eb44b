"""The CUDA tier of the fused kernels (skipped without CUDA; `bash launch/gpu_check.sh` runs it).

On a GPU, compiled rather than interpreted: ``kernel="triton"`` against the float64 references on
the fidelity model and on Alada's rare rows (where fp32 scalars would lose Ũ), against the torch
path on GPT-2-sized shapes (fp32 and bf16) and on shard and tensor-parallel layouts, bit-identical across two runs, at most one host sync per step (the verdict's read), and FSDP2 over NCCL with the Triton kernels against one process; FSDP2 with
``CPUOffloadPolicy`` (which needs an accelerator) stepping its host shards with the fused CPU
kernels against one process.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

import dist_memopt as dm  # noqa: E402
from harness import run_distributed  # noqa: E402
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard  # noqa: E402

from models import AwkwardModel, batch  # noqa: E402
from reference import AladaReference, SMMFReference  # noqa: E402
from test_fidelity import check_alada_rare_rows  # noqa: E402
from test_fsdp import TOLERANCE, _full  # noqa: E402
from kernel_cases import KernelNames, sharded_run  # noqa: E402

SHAPES = [(768, 3072), (3072,), (768,), (768, 768), (2304,), (1024, 768), (7, 13), ()]


def test_the_cuda_tier_runs_the_compiled_kernels():
    """tests/conftest.py defaults TRITON_INTERPRET to 1 for the CPU tests; here that would run the
    interpreter on host copies of the CUDA tensors and test nothing a GPU compiles."""
    from dist_memopt.kernels import tiles

    assert type(tiles.tile_elements).__name__ != "InterpretedFunction", (
        "the kernels were imported for Triton's interpreter: run the CUDA tier with TRITON_INTERPRET=0 "
        "(bash launch/gpu_check.sh does)")


@pytest.mark.parametrize("cls, reference", [(dm.SMMF, SMMFReference), (dm.Alada, AladaReference)])
def test_cuda_triton_matches_the_float64_reference(cls, reference):
    config = dict(lr=1e-2, weight_decay=0.1)
    model = AwkwardModel().cuda()
    optimizer = cls(model.parameters(), kernel="triton", **config)
    references = [reference(p.cpu(), **config) for p in model.parameters()]
    for step in range(20):
        optimizer.zero_grad()
        _loss(model, step).backward()
        grads = [p.grad.cpu().clone() for p in model.parameters()]
        optimizer.step()
        for ref, grad, param in zip(references, grads, model.parameters()):
            ref.step(grad)
            scale = max(1.0, ref.w.abs().max().item())
            assert (param.detach().cpu().double() - ref.w).abs().max().item() <= 5e-6 * scale


def test_cuda_triton_alada_rare_rows_keep_their_digits():
    """Compiled, the kernels' plain float arguments are fp32: the float64 ones must stay float64."""
    check_alada_rare_rows("triton", "cuda")


def _gpt2_like(kernel: str, dtype: torch.dtype, steps: int = 5, cls=dm.SMMF):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").mul_(0.02).to(dtype)) for s in SHAPES]
    optimizer = cls(params, kernel=kernel, weight_decay=0.01)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=generator).mul_(1e-3).to(dtype)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_cuda_triton_matches_the_torch_path(dtype, atol, cls):
    fused, _ = _gpt2_like("triton", dtype, cls=cls)
    plain, _ = _gpt2_like("torch", dtype, cls=cls)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_cuda_triton_matches_the_torch_path_on_shard_and_tensor_parallel_layouts(cls):
    """Declared layouts (kernel_cases.sharded_run): rows cut at both ends, an empty shard,
    segments sharing sign words, and strided TP pieces in the carried and the dividing index math."""
    fused, _ = sharded_run("triton", dict(weight_decay=0.1), cls=cls, device="cuda")
    plain, _ = sharded_run("torch", dict(weight_decay=0.1), cls=cls, device="cuda")
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_cuda_triton_is_bit_identical_across_runs(cls):
    first, first_opt = _gpt2_like("triton", torch.float32, cls=cls)
    second, second_opt = _gpt2_like("triton", torch.float32, cls=cls)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
        assert all(torch.equal(first_opt.state[a][k], second_opt.state[b][k]) for k in first_opt.state[a])


@pytest.mark.parametrize("kernel", ["triton", "torch"])
@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
@pytest.mark.parametrize("check_finite, syncs", [(True, 1), (False, 0)])
def test_a_cuda_step_waits_for_the_device_only_to_read_its_verdict(cls, kernel, check_finite, syncs):
    """torch's sync debug mode warns at each call that makes the host wait for the device (a read
    of a value, a copy from pageable host memory): reading the non-finite verdict is a step's one
    wait, and there is none without check_finite. The gradients of each step are new tensors at
    new places (the old ones are held), so the Triton runners copy their kept tables every step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").mul_(0.02)) for s in SHAPES]
    optimizer = cls(params, kernel=kernel, check_finite=check_finite)
    held, waits = [], []
    for _ in range(6):
        held.append([torch.randn(p.shape, device="cuda").mul_(1e-3) for p in params])
        for p, grad in zip(params, held[-1]):
            p.grad = grad
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                optimizer.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        waits.append(sum("synchronizing" in str(w.message) for w in caught))
    assert waits[3:] == [syncs] * 3, waits  # after the state and both of Alada's phases are built


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, z, y = (t.cuda() for t in batch(step))
    return (model(x, z) - y).pow(2).mean()


def _train_cuda(kernel: str, shard: bool, name: str = "SMMF") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = AwkwardModel().cuda()
    if shard:
        for module in (model.conv, model.proj, model.head):
            fully_shard(module)
        fully_shard(model, ignored_params={model.scale})
    optimizer = getattr(dm, name)(model.parameters(), kernel=kernel, lr=1e-2, weight_decay=0.1)
    for step in range(5):
        optimizer.zero_grad()
        _loss(model, step).backward()
        optimizer.step()
    return {n: p.cpu() for n, p in _full(model).items()}


def _fsdp2_nccl(rank, world_size, kernel):
    return _train_cuda(kernel, shard=True)


@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_fsdp2_over_nccl_equals_one_process(kernel):
    reference = _train_cuda("torch", shard=False)
    world_size = min(2, torch.cuda.device_count())
    for params in run_distributed(_fsdp2_nccl, world_size, kernel, backend="nccl"):
        for name, value in reference.items():
            scale = max(1.0, value.abs().max().item())
            assert (params[name] - value).abs().max().item() <= TOLERANCE * scale, name


def _fsdp2_cpu_offload(rank, world_size, name):
    """FSDP2 keeps the shards (and their gradients) on the host; the optimizer steps them there and
    completes its factor statistics over the process group's CPU backend (gloo)."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.manual_seed(0)
    model = AwkwardModel().cuda()
    policy = CPUOffloadPolicy()
    for module in (model.conv, model.proj, model.head):
        fully_shard(module, offload_policy=policy)
    fully_shard(model, ignored_params={model.scale}, offload_policy=policy)
    sharded = [p for p in model.parameters() if p is not model.scale]
    optimizer = getattr(dm, name)(model.parameters(), lr=1e-2, weight_decay=0.1)
    optimizer.kernel_observer = observer = KernelNames()
    for step in range(5):
        optimizer.zero_grad()
        _loss(model, step).backward()
        optimizer.step()
    devices = {p.to_local().device.type for p in sharded}
    return {n: p.cpu() for n, p in _full(model).items()}, devices, sorted(observer.names)


@pytest.mark.parametrize("name", ["SMMF", "Alada"])
def test_fsdp2_cpu_offload_steps_host_shards_with_the_cpu_kernels(name):
    reference = _train_cuda("torch", shard=False, name=name)
    world_size = min(2, torch.cuda.device_count())
    ranks = run_distributed(_fsdp2_cpu_offload, world_size, name, backend="cpu:gloo,cuda:nccl")
    for params, devices, kernels in ranks:
        assert devices == {"cpu"}, "CPUOffloadPolicy keeps the shards on the host"
        assert any(k.startswith(f"cpu.{name.lower()}") for k in kernels), kernels
        for pname, value in reference.items():
            scale = max(1.0, value.abs().max().item())
            assert (params[pname] - value).abs().max().item() <= TOLERANCE * scale, pname
