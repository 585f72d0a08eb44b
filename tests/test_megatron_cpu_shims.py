"""The megatron-core CPU shims: explicit, idempotent, CPU-only, and faithful to what they replace."""

import importlib

import pytest
import torch

pytest.importorskip("megatron.core")
from megatron.core.tensor_parallel import random as mrandom  # noqa: E402
from megatron.core.utils import GlobalMemoryBuffer  # noqa: E402

from dist_memopt.integrations.megatron import cpu_shims  # noqa: E402


def _wrapped_sites():
    for module_name, owner_name, attr in cpu_shims.CUDA_TYPE_NAME_SITES + cpu_shims.CUDA_COPY_SITES:
        owner = importlib.import_module(module_name)
        yield (getattr(owner, owner_name) if owner_name else owner), attr
    yield importlib.import_module(cpu_shims.COALESCING_SITE), "_coalescing_manager"


@pytest.fixture
def pristine(monkeypatch):
    """Megatron's originals for the test's duration (restored afterwards, whatever it installs)."""
    original = getattr(GlobalMemoryBuffer.get_tensor, "__wrapped__", GlobalMemoryBuffer.get_tensor)
    monkeypatch.setattr(GlobalMemoryBuffer, "get_tensor", original)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)
    for name in cpu_shims.CUDA_DEVICE_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "torch", torch)
    for owner, attr in _wrapped_sites():
        fn = getattr(owner, attr)
        monkeypatch.setattr(owner, attr, fn.__wrapped__ if getattr(fn, cpu_shims._MARK, False) else fn)  # only a shim's
    return original


def test_shims_do_nothing_when_cuda_is_present(pristine, monkeypatch):
    sites = {(owner, attr): getattr(owner, attr) for owner, attr in _wrapped_sites()}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu_shims.install_cpu_shims()
    assert GlobalMemoryBuffer.get_tensor is pristine
    assert mrandom._CUDA_RNG_STATE_TRACKER is None
    assert all(importlib.import_module(name).torch is torch for name in cpu_shims.CUDA_DEVICE_MODULES)
    assert all(getattr(owner, attr) is fn for (owner, attr), fn in sites.items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for CPU-only machines")
def test_cuda_allocations_land_on_the_cpu(pristine):
    from megatron.core.distributed import param_and_grad_buffer

    cpu_shims.install_cpu_shims()
    proxy = param_and_grad_buffer.torch
    cpu_shims.install_cpu_shims()
    assert param_and_grad_buffer.torch is proxy and proxy.__wrapped__ is torch  # idempotent
    assert torch.zeros(1).device.type == "cpu"  # torch itself is untouched
    for device in ("cuda", "cuda:0", 0, torch.device("cuda"), proxy.cuda.current_device()):
        buffer = proxy.zeros(4, dtype=torch.bfloat16, device=device)
        assert buffer.device.type == "cpu" and buffer.dtype == torch.bfloat16 and buffer.shape == (4,)
    assert proxy.tensor([1.0], device="cuda").item() == 1.0 and proxy.empty(2, device="cuda").device.type == "cpu"
    assert proxy.Tensor is torch.Tensor and proxy.distributed is torch.distributed and proxy.float is torch.float
    proxy.cuda.synchronize()  # nothing to wait for on the CPU
    assert proxy.cuda.is_available() is False  # everything else is torch.cuda's own


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for CPU-only machines")
def test_type_names_read_cuda_only_inside_the_shimmed_sites(pristine):
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    t = torch.zeros(2)
    with cpu_shims.cuda_type_names():
        assert t.type() == "torch.cuda.FloatTensor" and t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert t.type(torch.float64).dtype == torch.float64  # conversions unchanged
    assert t.type() == "torch.FloatTensor" and "type" not in torch.Tensor.__dict__
    cpu_shims.install_cpu_shims()
    init = distrib_optimizer.DistributedOptimizer.__init__
    cpu_shims.install_cpu_shims()
    assert distrib_optimizer.DistributedOptimizer.__init__ is init  # wrapped once
    assert t.type() == "torch.FloatTensor"
    grad = torch.ones(3)
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = grad
    for module in (clip_grads, optimizer):  # asserts fp32 "CUDA" gradients, then scales them
        module.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=2.0)
    assert torch.allclose(grad, torch.full((3,), 0.25), rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for CPU-only machines")
def test_install_is_idempotent_and_buffer_allocates_on_cpu(pristine):
    cpu_shims.install_cpu_shims()
    shimmed, tracker = GlobalMemoryBuffer.get_tensor, mrandom._CUDA_RNG_STATE_TRACKER
    cpu_shims.install_cpu_shims()
    assert GlobalMemoryBuffer.get_tensor is shimmed and mrandom._CUDA_RNG_STATE_TRACKER is tracker
    assert shimmed.__wrapped__ is pristine
    buffer = GlobalMemoryBuffer()
    a = buffer.get_tensor((2, 3), torch.float32, "mpu")
    b = buffer.get_tensor((3, 2), torch.float32, "mpu")  # reused, as on CUDA
    assert a.device.type == "cpu" and a.shape == (2, 3) and b.data_ptr() == a.data_ptr()
    assert buffer.get_tensor((4, 4), torch.float32, "mpu").numel() == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for CPU-only machines")
def test_rng_tracker_forks_the_cpu_generator(pristine):
    cpu_shims.install_cpu_shims()
    tracker = mrandom.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_shims.CPURNGStatesTracker)
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outside = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        inside_first = torch.rand(3)
    assert torch.equal(torch.rand(3), outside)  # the default stream is untouched by the fork
    with tracker.fork():
        inside_second = torch.rand(3)
    expected = torch.Generator().manual_seed(123)
    assert torch.equal(inside_first, torch.rand(3, generator=expected)) and torch.equal(inside_second, torch.rand(3, generator=expected))
    saved = {k: v.clone() for k, v in tracker.get_states().items()}  # what a checkpoint keeps
    with tracker.fork():
        third = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(3), third)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("other", 123)
    with pytest.raises(KeyError, match="not added"):
        with tracker.fork("missing"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for CPU-only machines")
def test_cuda_copies_stay_on_the_cpu_only_inside_the_shimmed_sites(pristine):
    from megatron.core.models.common.language_module.language_module import LanguageModule

    t = torch.zeros(2)
    with cpu_shims.cuda_copies_stay():
        assert t.cuda() is t
    assert "cuda" not in torch.Tensor.__dict__  # torch's own method again
    original = LanguageModule.setup_embeddings_and_output_layer
    cpu_shims.install_cpu_shims()
    shimmed = LanguageModule.setup_embeddings_and_output_layer
    cpu_shims.install_cpu_shims()
    assert LanguageModule.setup_embeddings_and_output_layer is shimmed and shimmed.__wrapped__ is original  # wrapped once


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for CPU-only machines")
def test_synchronous_bucket_collectives_over_gloo_run_one_by_one(pristine, tmp_path):
    """Coalesced, an all-gather inside the manager is only recorded and runs at its exit; shimmed,
    a synchronous one runs at once (an asynchronous one is still coalesced)."""
    import torch.distributed as dist

    buckets = importlib.import_module(cpu_shims.COALESCING_SITE)
    original = buckets._coalescing_manager
    cpu_shims.install_cpu_shims()
    shimmed = buckets._coalescing_manager
    cpu_shims.install_cpu_shims()
    assert buckets._coalescing_manager is shimmed and shimmed.__wrapped__ is original  # wrapped once
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        for manager, async_ops, at_once in ((original, False, False), (shimmed, False, True), (shimmed, True, False)):
            out = torch.zeros(3)
            with manager(group, async_ops=async_ops) as cm:
                dist.all_gather_into_tensor(out, torch.ones(3), group=group, async_op=async_ops)
                assert torch.equal(out, torch.ones(3)) is at_once, (manager, async_ops)
            if async_ops:
                cm.wait()
            assert torch.equal(out, torch.ones(3))
    finally:
        dist.destroy_process_group()
