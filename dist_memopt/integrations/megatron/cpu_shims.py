"""The few places where megatron-core 0.16 assumes CUDA, replaced for CPU-only machines.

Megatron-core's ``GPTModel``, ``BertModel`` and ``T5Model`` with the local layer specs and
``use_cpu_initialization=True`` run forward and backward on CPU except for these assumptions, and
so do its ``DistributedDataParallel`` (contiguous grad buffers, bucketed reduce-scatter over gloo),
``DistributedOptimizer``, ``Float16OptimizerWithFloat16Params``, ``FP32Optimizer``, gradient
clipping, loss scaling, distributed checkpoint saving and the pipeline schedules (point-to-point
sends between stages over gloo, tied embeddings copied to the last stage). Each shim below is an explicit function:
it names the assumptions it replaces, changes nothing when CUDA is available (megatron-core's own
code runs there), and is idempotent. Call :func:`install_cpu_shims` once before building a model
and :func:`model_parallel_manual_seed` where Megatron would call ``model_parallel_cuda_manual_seed``.

Not shimmed, because callers can avoid them: ``transformer.utils.get_default_causal_mask``
(allocates on ``"cuda"`` when a causal layer gets ``attention_mask=None``): pass an explicit mask.
``MegatronGradScaler.load_state_dict`` (``.cuda()``), DDP with
``num_distributed_optimizer_instances > 1`` (CUDA streams) and the fully parallel checkpoint
exchange strategies (``.cuda()``) still need CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import operator
import types
from contextlib import nullcontext
from functools import reduce
from typing import Any, Callable, Optional

import torch

__all__ = [
    "install_cpu_shims",
    "shim_global_memory_buffer",
    "shim_rng_tracker",
    "shim_cuda_allocations",
    "shim_cuda_type_names",
    "shim_cuda_copies",
    "shim_gloo_coalescing",
    "model_parallel_manual_seed",
    "CPURNGStatesTracker",
]

_MARK = "_dist_memopt_cpu_shim"


def _cuda() -> bool:
    return torch.cuda.is_available()


def install_cpu_shims() -> None:
    """Install every shim (no-op with CUDA, safe to call repeatedly)."""
    shim_global_memory_buffer()
    shim_rng_tracker()
    shim_cuda_allocations()
    shim_cuda_type_names()
    shim_cuda_copies()
    shim_gloo_coalescing()


def shim_global_memory_buffer() -> None:
    """Replaces: ``utils.GlobalMemoryBuffer.get_tensor`` allocating on ``torch.cuda.current_device()``.

    Local ``DotProductAttention`` takes its ``baddbmm`` input buffer from this global buffer; on
    CPU the replacement allocates on the CPU, otherwise behaving exactly like the original.
    """
    if _cuda():
        return
    from megatron.core.utils import GlobalMemoryBuffer

    if getattr(GlobalMemoryBuffer.get_tensor, _MARK, False):
        return

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context: Optional[Callable] = None):
        required_len = reduce(operator.mul, tensor_shape, 1)
        buffer = self.buffer.get((name, dtype))
        if buffer is None or buffer.numel() < required_len:
            with (mem_alloc_context or nullcontext)():
                buffer = torch.empty(required_len, dtype=dtype, device="cpu", requires_grad=False)
            self.buffer[(name, dtype)] = buffer
        return buffer[0:required_len].view(*tensor_shape)

    setattr(get_tensor, _MARK, True)
    get_tensor.__wrapped__ = GlobalMemoryBuffer.get_tensor  # the original, for inspection and tests
    GlobalMemoryBuffer.get_tensor = get_tensor


class CPURNGStatesTracker:
    """Named RNG states forked on the CPU generator (what ``CudaRNGStatesTracker`` does on CUDA).

    Same interface as megatron-core's tracker (``add``, ``fork``, ``get_states``, ``set_states``,
    ``reset``, ``is_initialized``), so dropout inside ``fork()`` and checkpointing of RNG states
    work unchanged; states are CPU ``ByteTensor``s from ``torch.get_rng_state()``.
    """

    def __init__(self) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


def shim_rng_tracker() -> None:
    """Replaces: ``tensor_parallel.random``'s tracker forking CUDA generator states.

    ``CudaRNGStatesTracker.add``/``fork`` call ``torch.cuda.get_rng_state``/``manual_seed``; local
    attention wraps its dropout in ``get_cuda_rng_tracker().fork()``. On CPU the module's tracker
    becomes a :class:`CPURNGStatesTracker` (marked initialized, so megatron-core keeps it).
    """
    if _cuda():
        return
    from megatron.core.tensor_parallel import random as mrandom

    if isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
        return
    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default, tensor-parallel and expert RNG states as Megatron does.

    Replaces: ``tensor_parallel.model_parallel_cuda_manual_seed`` (seeds CUDA generators). With
    CUDA this calls it; on CPU it seeds the CPU tracker with the same seeds (data-parallel
    ``seed``, tensor-parallel ``seed + 2718 + tp_rank``, expert ``seed + 1024 + 100·ep + etp``).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    if _cuda():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    shim_rng_tracker()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tp = parallel_state.get_tensor_model_parallel_rank()
    ep = parallel_state.get_expert_model_parallel_rank()
    etp = parallel_state.get_expert_tensor_parallel_rank()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep + etp)


# megatron-core modules that allocate tensors with ``device="cuda"`` or
# ``device=torch.cuda.current_device()`` (or call ``torch.cuda.synchronize()``), and what for.
CUDA_DEVICE_MODULES: dict[str, str] = {
    "megatron.core.distributed.param_and_grad_buffer": "DDP's contiguous param and grad buffers",
    "megatron.core.optimizer.optimizer": "loss-scale, found-inf and overflow flags of the optimizers",
    "megatron.core.optimizer.clip_grads": "gradient-norm and zero-count scalars",
    "megatron.core.optimizer.grad_scaler": "constant and dynamic loss scales",
    "megatron.core.optimizer.distrib_optimizer": "state shards allocated to load an Adam checkpoint",
    "megatron.core.utils": "the local multi-tensor l2 norm's result",
    "megatron.core.tensor_parallel.mappings": "sequence parallelism's all-gather and reduce-scatter outputs",
    "megatron.core.tensor_parallel.layers": "the all-gathered input of a sequence-parallel linear's backward",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "the failure flag of a save",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize after staging tensors to save",
    "megatron.core.pipeline_parallel.p2p_communication": "pipeline stages' receive buffers and shape messages; synchronize",
    "megatron.core.pipeline_parallel.schedules": "the schedules' token count",
}

_TENSOR_FACTORIES = ("tensor", "zeros", "ones", "empty", "full")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a CUDA ordinal


class _CPUCuda:
    """``torch.cuda`` whose ``current_device()`` is the CPU and whose ``synchronize()`` has nothing
    to wait for; everything else is ``torch.cuda``."""

    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def synchronize(self, device: Any = None) -> None:
        """CPU work is synchronous."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CPUTorch(types.ModuleType):
    """``torch`` as one megatron-core module sees it on a CPU-only machine.

    The same module, except that tensor factories (``tensor``, ``zeros``, ``ones``, ``empty``,
    ``full``) put tensors asked for on a CUDA device on the CPU, and ``torch.cuda.current_device()``
    names the CPU (whose ``synchronize()`` returns at once). Tensors built any other way, and every
    other attribute, are torch's own.
    """

    def __init__(self) -> None:
        super().__init__("torch", "torch, with CUDA tensor factories redirected to the CPU")
        self.cuda = _CPUCuda()
        for name in _TENSOR_FACTORIES:
            setattr(self, name, self._on_cpu(getattr(torch, name)))

    @staticmethod
    def _on_cpu(factory: Callable) -> Callable:
        @functools.wraps(factory)
        def create(*args: Any, **kwargs: Any) -> torch.Tensor:
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)

        return create

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def shim_cuda_allocations() -> None:
    """Replaces: CUDA allocations and synchronization in the modules of :data:`CUDA_DEVICE_MODULES`.

    Each of those modules gets a :class:`_CPUTorch` as its ``torch`` global, so DDP's buffers, the
    optimizers' flags and scales, gradient clipping and the checkpoint saver allocate on the CPU.
    The original module stays reachable as ``module.torch.__wrapped__``.
    """
    if _cuda():
        return
    for name in CUDA_DEVICE_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _CPUTorch):
            proxy = _CPUTorch()
            proxy.__wrapped__ = module.torch
            module.torch = proxy


@contextlib.contextmanager
def _tensor_method(name: str, replacement: Callable) -> Any:
    """``torch.Tensor.<name>`` is ``replacement`` while active, torch's own afterwards."""
    saved = torch.Tensor.__dict__.get(name)
    setattr(torch.Tensor, name, replacement)
    try:
        yield
    finally:
        if saved is None:
            delattr(torch.Tensor, name)
        else:
            setattr(torch.Tensor, name, saved)


@contextlib.contextmanager
def cuda_type_names():
    """While active, ``tensor.type()`` names CPU tensors as CUDA ones (``torch.cuda.FloatTensor``).

    Only the no-argument form changes; ``tensor.type(dtype)`` conversions are untouched.
    """
    original = torch._C.TensorBase.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    with _tensor_method("type", type_):
        yield


# (module, class or None, function) whose dtype checks compare ``param.type()`` with
# ``'torch.cuda.FloatTensor'``/``'torch.cuda.HalfTensor'``/``'torch.cuda.BFloat16Tensor'``.
CUDA_TYPE_NAME_SITES: tuple[tuple[str, Optional[str], str], ...] = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", None, "clip_grad_by_total_norm_fp32"),  # imported by name
)


def _within(context: Callable[[], Any], fn: Callable) -> Callable:
    """``fn`` run inside ``context()`` (marked as a shim)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with context():
            return fn(*args, **kwargs)

    setattr(call, _MARK, True)
    return call


def _wrap_sites(sites: tuple[tuple[str, Optional[str], str], ...], context: Callable[[], Any]) -> None:
    for module_name, owner_name, attr in sites:
        owner = importlib.import_module(module_name)
        if owner_name is not None:
            owner = getattr(owner, owner_name)
        fn = getattr(owner, attr)
        if not getattr(fn, _MARK, False):
            setattr(owner, attr, _within(context, fn))


def shim_cuda_type_names() -> None:
    """Replaces: the ``param.type() == 'torch.cuda.*Tensor'`` checks of :data:`CUDA_TYPE_NAME_SITES`.

    ``DistributedOptimizer`` and ``Float16OptimizerWithFloat16Params`` sort parameters into fp32
    and 16-bit groups by those names (and reject anything else); gradient clipping asserts fp32
    CUDA gradients. Each site runs inside :func:`cuda_type_names`; the original function is its
    ``__wrapped__``.
    """
    if _cuda():
        return
    _wrap_sites(CUDA_TYPE_NAME_SITES, cuda_type_names)


@contextlib.contextmanager
def cuda_copies_stay():
    """While active, ``tensor.cuda()`` of a CPU tensor returns the tensor itself (no copy)."""

    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    with _tensor_method("cuda", cuda):
        yield


# (module, class, function) that move a parameter with ``.cuda()`` before a collective.
CUDA_COPY_SITES: tuple[tuple[str, Optional[str], str], ...] = (
    # pipeline stages with tied embeddings: the last stage's copy all-reduced from the first stage's
    ("megatron.core.models.common.language_module.language_module", "LanguageModule", "setup_embeddings_and_output_layer"),
)


def shim_cuda_copies() -> None:
    """Replaces: the ``weight.data.cuda()`` of :data:`CUDA_COPY_SITES` (each runs inside
    :func:`cuda_copies_stay`; the original function is its ``__wrapped__``)."""
    if _cuda():
        return
    _wrap_sites(CUDA_COPY_SITES, cuda_copies_stay)


#: where megatron-core's DDP buckets coalesce their collectives (grad reduce-scatter or all-reduce,
#: parameter all-gather)
COALESCING_SITE = "megatron.core.distributed.param_and_grad_buffer"


def shim_gloo_coalescing() -> None:
    """Replaces: ``torch.distributed._coalescing_manager`` around the DDP buckets' synchronous
    collectives over gloo, which then run one after another instead.

    Coalesced, those collectives go to gloo's coalesced kernels in one call. In a standalone loop of
    gloo collectives shaped like a Megatron step (4 ranks, torch 2.13), a rank aborted on a
    corrupted heap in 6 of 37 runs with the coalesced all-gather, and in none of 27 with the same
    all-gathers issued one by one. Each collective is independent of the others, so the results
    are the same (``tools/gloo_coalescing.py`` runs that loop both ways). Asynchronous bucket
    collectives (``overlap_grad_reduce``, ``overlap_param_gather``) and other backends keep the
    coalescing manager.
    """
    if _cuda():
        return
    module = importlib.import_module(COALESCING_SITE)
    original = module._coalescing_manager
    if getattr(original, _MARK, False):
        return

    @contextlib.contextmanager
    def coalescing_manager(group: Any = None, device: Any = None, async_ops: bool = False) -> Any:
        import torch.distributed as dist

        if async_ops or dist.get_backend(group) != dist.Backend.GLOO:
            with original(group, device=device, async_ops=async_ops) as cm:
                yield cm
        else:
            yield None  # Megatron reads the handle only for asynchronous collectives

    coalescing_manager.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(coalescing_manager, _MARK, True)
    module._coalescing_manager = coalescing_manager
