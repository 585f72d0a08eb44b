"""The megatron-core CPU shims: explicit, idempotent, CPU-only, and faithful to what they replace."""

import pytest
import torch

pytest.importorskip("megatron.core")
from megatron.core.tensor_parallel import random as mrandom  # noqa: E402
from megatron.core.utils import GlobalMemoryBuffer  # noqa: E402

from dist_memopt.integrations.megatron import cpu_shims  # noqa: E402


@pytest.fixture
def pristine(monkeypatch):
    """Megatron's originals for the test's duration (restored afterwards, whatever it installs)."""
    original = getattr(GlobalMemoryBuffer.get_tensor, "__wrapped__", GlobalMemoryBuffer.get_tensor)
    monkeypatch.setattr(GlobalMemoryBuffer, "get_tensor", original)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)
    return original


def test_shims_do_nothing_when_cuda_is_present(pristine, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu_shims.install_cpu_shims()
    assert GlobalMemoryBuffer.get_tensor is pristine
    assert mrandom._CUDA_RNG_STATE_TRACKER is None


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
