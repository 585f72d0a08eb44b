"""The few places where megatron-core 0.16 assumes CUDA, replaced for CPU-only machines.

Megatron-core's ``GPTModel``, ``BertModel`` and ``T5Model`` with the local layer specs and
``use_cpu_initialization=True`` run forward and backward on CPU except for these assumptions. Each
shim below is an explicit function: it names the assumption it replaces, changes nothing when
CUDA is available (megatron-core's own code runs there), and is idempotent. Call
:func:`install_cpu_shims` once before building a model and :func:`model_parallel_manual_seed`
where Megatron would call ``model_parallel_cuda_manual_seed``.

Not shimmed, because callers can avoid them: ``transformer.utils.get_default_causal_mask``
(allocates on ``"cuda"`` when a causal layer gets ``attention_mask=None``): pass an explicit mask.
"""

from __future__ import annotations

import contextlib
import operator
from contextlib import nullcontext
from functools import reduce
from typing import Callable, Optional

import torch

__all__ = [
    "install_cpu_shims",
    "shim_global_memory_buffer",
    "shim_rng_tracker",
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
