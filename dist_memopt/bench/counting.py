"""Count what a step costs on an accelerator without one: kernel launches, bytes moved, host syncs.

:class:`StepCost` is a ``TorchDispatchMode``: every aten op that would launch a kernel on a GPU
(views, allocations and metadata ops launch none) counts as one launch, and its tensor
arguments and results as the bytes it reads and writes: inputs are read, results and mutated
arguments written, a mutated argument that is not write-only (``add_`` but not ``copy_``)
is read too. Fused kernels report themselves with the bytes of their own loads and stores:
a :class:`StepCost` is the :class:`~dist_memopt.kernels.launch.KernelObserver` of the optimizers
it is given. Ops that make the host wait for the device
(``.item()``, ``bool(t)``, ``.tolist()``, data-dependent shapes) are counted as syncs, and
tensors made from host data (``torch.tensor(...)``) as uploads: on an accelerator each is a
host-to-device copy from pageable memory, which waits for the device's queue as a sync does.

These are counts, not times: a foreach op is one launch here (a few on CUDA, one per ~tens of
tensors), and cache reuse is ignored (every op reads its inputs from memory).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dist_memopt.optim.base import FactoredOptimizer, default_chunk_numel

__all__ = ["StepCost", "NO_KERNEL", "SYNC_OPS", "count_step", "prepare_triton"]

aten = torch.ops.aten

#: ops that allocate or describe tensors without running a kernel
NO_KERNEL = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.detach.default,
    aten.alias.default,
    aten._unsafe_view.default,  # a view without alias annotation (matmul reshapes its bmm result)
    aten.lift_fresh.default,
    aten.resize_.default,
    aten.set_.source_Storage_storage_offset,
    aten.set_.source_Tensor,
    aten.sym_size.int,
    aten.sym_stride.int,
    aten.sym_numel.default,
    aten.is_same_size.default,
    torch.ops.profiler._record_function_enter_new.default,  # torch.optim's profiler annotations
    torch.ops.profiler._record_function_exit._RecordFunction,
}

#: ops whose result the host must wait for (a device-to-host sync on an accelerator)
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t)
    aten.nonzero.default,  # data-dependent output shape
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
}

#: in-place ops that overwrite their first argument without reading it
WRITE_ONLY = {"copy_", "fill_", "zero_", "_foreach_copy_", "_foreach_zero_", "normal_", "uniform_"}

#: arguments the schema marks written that the kernel writes only when another argument is given:
#: torch's fused Adam unscales the gradients in place only with a ``grad_scale`` (checked in
#: tests/test_step_cost.py)
WRITTEN_ONLY_WITH = {"_fused_adam_": ("grads", "grad_scale"), "_fused_adamw_": ("grads", "grad_scale")}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Tensors in ``value``; a DTensor as its local shard (what the kernel touches)."""
    for leaf in tree_flatten(value)[0]:
        if isinstance(leaf, torch.Tensor):
            yield getattr(leaf, "_local_tensor", leaf)


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


class StepCost(TorchDispatchMode):
    """Launches, bytes read, bytes written and host syncs of the ops run inside the ``with``.

    ``ops`` counts launches per op name (fused kernels under the name their runner reports, e.g.
    ``triton.<kernel>``), ``syncs`` per sync op; ``tolist`` calls are counted by patching
    ``Tensor.tolist`` for the duration (it reads the data without dispatching an op).

    ``uploads`` counts tensors made from host data during the ``with``.

    ``optimizers``: those whose fused kernel runners report to this count, as its
    ``kernel_observer`` for the duration. ``execute=False`` makes their runners launch nothing (a
    dry run, see :mod:`dist_memopt.kernels.launch`): the counts are a real step's, the results not.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer, execute: bool = True) -> None:
        super().__init__()
        self.execute = execute
        self._optimizers = optimizers
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        #: tensors made from host data (``aten.lift_fresh``): a blocking copy on an accelerator
        self.uploads = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self._tolist = None

    @property
    def launches(self) -> int:
        return sum(self.ops.values())

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())

    def __enter__(self) -> "StepCost":
        original = self._tolist = torch.Tensor.tolist

        def tolist(tensor: torch.Tensor) -> Any:
            self.syncs["tolist"] += 1
            return original(tensor)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        for optimizer in self._optimizers:
            optimizer.kernel_observer = self
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for optimizer in self._optimizers:
            optimizer.kernel_observer = None
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]

    def record(self, name: str, bytes_read: int, bytes_written: int) -> None:
        """A fused kernel's launch (the :class:`~dist_memopt.kernels.launch.KernelObserver` method)."""
        self.ops[name] += 1
        self.bytes_read += bytes_read
        self.bytes_written += bytes_written

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SYNC_OPS:
            self.syncs[func.overloadpacket.__name__] += 1
        if func is aten.lift_fresh.default:
            self.uploads += 1
        if func in NO_KERNEL or func.is_view or func is aten._local_scalar_dense.default:
            return out  # no kernel (a scalar read is a copy, counted as a sync above)
        self.ops[func.overloadpacket.__name__] += 1
        self._count_bytes(func, args, kwargs, out)
        return out

    def _count_bytes(self, func, args, kwargs, out) -> None:  # noqa: ANN001
        schema = func._schema
        written_ids: set[int] = set()
        values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args) :]]
        name = func.overloadpacket.__name__
        write_only = name in WRITE_ONLY
        unwritten = None  # the argument the schema marks written that this call leaves as it is
        if name in WRITTEN_ONLY_WITH:
            target, condition = WRITTEN_ONLY_WITH[name]
            if all(v is None for a, v in zip(schema.arguments, values) if a.name == condition):
                unwritten = target
        for arg, value in zip(schema.arguments, values):
            if value is None:
                continue
            mutated = arg.alias_info is not None and arg.alias_info.is_write and arg.name != unwritten
            if mutated:
                self.bytes_written += _nbytes(value)
                written_ids.update(id(t) for t in _tensors(value))
                if write_only or arg.is_out:
                    continue
            self.bytes_read += _nbytes(value)
        if not any(r.alias_info for r in schema.returns):  # fresh results (in-place ones counted above)
            self.bytes_written += sum(t.numel() * t.element_size() for t in _tensors(out) if id(t) not in written_ids)


def prepare_triton(names: Iterable[str], device: torch.device) -> None:
    """Before Triton is first imported (building model shapes may import it): Triton rows among
    ``names`` on CPU run in Triton's interpreter, chosen by ``TRITON_INTERPRET=1``."""
    if device.type != "cuda" and any("triton" in name for name in names):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def count_step(optimizer: torch.optim.Optimizer, numel: int, warmup: int = 2, steps: int = 2, execute: bool = True) -> dict[str, Any]:
    """Launches, bytes per element and host syncs of ``steps`` steps (after ``warmup``), per step.

    ``execute=False`` counts the fused kernels without running them, warm-up included
    (interpreting GPT-2 small's kernels on CPU takes many minutes; the counts are the same), and
    where fused kernels take part times ``steps`` more such steps: ``host_ms``, the host's Python
    per step besides the kernels (on a GPU, what the host spends before they are queued).

    ``optimizer`` must not hold state yet: its state is dropped afterwards (the bench shares parameters).
    The torch path steps in the chunks it would take on a GPU (:func:`default_chunk_numel` of
    CUDA), whatever device the count runs on: the counts are what a GPU pays, and smaller CPU
    chunks would add a few dozen launches per chunk that a GPU run does not make.
    """
    if isinstance(optimizer, FactoredOptimizer) and optimizer.chunk_numel is None:
        optimizer.chunk_numel = default_chunk_numel(torch.device("cuda"))
    optimizer.kernel_observer = None if execute else StepCost(execute=False)  # a warm-up's dry run counts nothing
    for _ in range(warmup):
        optimizer.step()
    if hasattr(optimizer, "synchronize"):
        optimizer.synchronize()  # SMMF leaves the last warm-up step's reduction to the next step
    costs = []
    for _ in range(steps):
        with StepCost(optimizer, execute=execute) as cost:
            optimizer.step()
            if hasattr(optimizer, "synchronize"):
                optimizer.synchronize()
        costs.append(cost)
    host_ms = None
    fused = any(op.startswith(("triton.", "cpu.")) for c in costs for op in c.ops)
    if fused and not execute:  # the dry run's steps, timed outside the counter: the Python a step costs the host
        optimizer.kernel_observer = StepCost(execute=False)  # the counter's exit took its own away
        started = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        host_ms = (time.perf_counter() - started) / steps * 1e3
    optimizer.state.clear()
    ops = sum((c.ops for c in costs), start=type(costs[0].ops)())
    moved = sum(c.bytes_read + c.bytes_written for c in costs)
    return {
        "launches": sum(c.launches for c in costs) / steps,
        "launches_per_step": [c.launches for c in costs],
        "bytes_per_element": moved / steps / max(1, numel),
        "read_per_element": sum(c.bytes_read for c in costs) / steps / max(1, numel),
        "syncs": sum(c.sync_count for c in costs) / steps,
        "host_ms": host_ms,
        "top_ops": dict(ops.most_common(8)),
        "ops": dict(ops),
    }
