"""SMMF: square-matricized momentum factorization (Park & Lee, AAAI 2025), sharding-aware.

Per parameter, the moments live in a square-matricized (n, m) view (Algorithm 2). Each step
decompresses the previous factors (Algorithm 3), folds in the gradient, updates the weight with
the *uncompressed* moments, then compresses again (Algorithm 4): the sign of M as packed bits and
row/column sums of |M| and of V, the shorter side normalised by its total. On a shard, the sums are
partial; one all_reduce per process group, left running until the next step needs the factors,
completes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from dist_memopt.optim.base import (
    FactoredOptimizer,
    SegmentPlan,
    SegmentStack,
    Side,
    StepItem,
    StepWork,
    check_foreach,
    check_number,
    chunk_ranges,
)
from dist_memopt.kernels.select import check_kernel
from dist_memopt.optim.bits import pack_sign_rows, unpack_sign_rows
from dist_memopt.optim.fused_adam import eager_adam_step, fused_adam_available, fused_adam_step
from dist_memopt.optim.stacks import Scratch, local_grad, local_weight, state_view
from dist_memopt.optim.state_layout import StateKey
from dist_memopt.shard.geometry import square_matricize
from dist_memopt.shard.reduce import StatReducer

__all__ = ["SMMF", "normalize_factors"]

WEIGHT_DECAY_MODES = ("adam", "adamw")


def normalize_factors(rows: Tensor, cols: Tensor) -> None:
    """Algorithms 4/5: divide the shorter side (rows when n <= m) by its total, if non-zero.

    Leading dimensions are a batch: (B, n) rows and (B, m) columns normalise each segment alone.
    """
    side = rows if rows.shape[-1] <= cols.shape[-1] else cols
    total = side.sum(-1, keepdim=True)
    # A zero total means a zero side (its entries are non-negative): dividing by 1 keeps it, and
    # avoids a host sync that an `if` on the total would cost.
    side.div_(torch.where(total > 0, total, torch.ones_like(total)))


def _first_moment(group: dict[str, Any]) -> bool:
    return group["beta"] is not None


class SMMF(FactoredOptimizer):
    """SMMF with 1-bit sign state, exact on sharded parameters.

    Args:
        params: parameters or param groups (``model.parameters()`` of a plain, DDP, FSDP2 or
            FSDP1 model; names from ``named_parameters()`` are used in error messages).
        lr: learning rate.
        beta: first-moment coefficient β1; the schedule is β1,t = beta·growth_rate^(t−1).
            ``None`` turns the first moment off (update G/(√V + eps)).
        eps: added to √V in the update's denominator.
        weight_decay: decay coefficient (see ``weight_decay_mode``).
        decay_rate: γ in the second-moment schedule β2,t = 1 − t^γ (negative).
        growth_rate: λ in the first-moment schedule.
        vector_reshape: factorize tensors that are 1-D after squeezing too; with False they keep
            dense fp32 moments.
        weight_decay_mode: ``"adamw"`` decays the weight, W ← W·(1 − lr·wd) (Algorithm 7);
            ``"adam"`` adds wd·W to the gradient (Algorithm 6).
        check_finite: raise :class:`NonFiniteGradientError` on inf/NaN gradients before any state
            changes; False skips the check (one pass over the gradients) for speed.
        foreach: None or True steps small, whole (unsharded) tensors of the same 2-D view
            together, a few batched ops for all of them instead of a few dozen per tensor
            (vectors, biases, norms: most of a transformer's tensors, little of its size); False
            keeps the plain per-tensor path, the reference the fast path is tested against.
        kernel: ``"auto"`` (the fused CPU kernels on CPU tensors, the fused Triton kernels on CUDA
            when Triton imports, else torch), ``"cpu"``, ``"triton"`` or ``"torch"`` (see
            :mod:`dist_memopt.kernels.select`).
    """

    hyperparameters = ("lr", "beta", "eps", "weight_decay", "decay_rate", "growth_rate", "vector_reshape", "weight_decay_mode")
    ignored_keys = {
        "betas": "SMMF has one first-moment coefficient: write beta=betas[0]; its second moment "
        "follows decay_rate (beta2_t = 1 - t**decay_rate), not a beta2",
        "decoupled_weight_decay": "write weight_decay_mode='adamw' (decoupled) or 'adam' (L2 in the gradient)",
    }
    state_layout = dict(
        sign=StateKey("bits", torch.uint8, present=_first_moment),
        row_m=StateKey("rows", present=_first_moment),
        col_m=StateKey("cols", present=_first_moment),
        row_v=StateKey("rows"),
        col_v=StateKey("cols"),
        exp_avg=StateKey("dense", present=_first_moment),
        exp_avg_sq=StateKey("dense"),
    )

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        beta: Optional[float] = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_rate: float = -0.5,
        growth_rate: float = 0.999,
        vector_reshape: bool = True,
        weight_decay_mode: str = "adamw",
        *,
        check_finite: bool = True,
        foreach: Optional[bool] = None,
        kernel: str = "auto",
    ) -> None:
        defaults = dict(
            kernel=kernel,
            lr=lr,
            beta=beta,
            eps=eps,
            weight_decay=weight_decay,
            decay_rate=decay_rate,
            growth_rate=growth_rate,
            vector_reshape=vector_reshape,
            weight_decay_mode=weight_decay_mode,
            check_finite=check_finite,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    # --- configuration ---------------------------------------------------------------------

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        check_number("lr", group["lr"], where, low=0.0, tensor=True)
        beta = group["beta"]
        if beta is not None:
            check_number("beta", beta, where, low=0.0, high=1.0, high_open=True)
        check_number("eps", group["eps"], where, low=0.0)
        check_number("weight_decay", group["weight_decay"], where, low=0.0)
        decay_rate = group["decay_rate"]
        check_number("decay_rate", decay_rate, where)
        if decay_rate >= 0:
            raise ValueError(f"Invalid decay_rate{where}: {decay_rate!r} (must be negative, so that β2,t = 1 − t^decay_rate grows towards 1)")
        check_number("growth_rate", group["growth_rate"], where, low=0.0, high=1.0)
        if not isinstance(group["vector_reshape"], bool):
            raise ValueError(f"Invalid vector_reshape{where}: {group['vector_reshape']!r} (must be a bool)")
        check_foreach(group, where)
        check_kernel(group, where)
        if group["weight_decay_mode"] not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"Invalid weight_decay_mode{where}: {group['weight_decay_mode']!r} (must be one of {WEIGHT_DECAY_MODES})"
            )

    def _plan_key(self, group: dict[str, Any]) -> Any:
        return group["vector_reshape"]

    def _matrix_shape(self, group: dict[str, Any], global_shape: torch.Size) -> Optional[tuple[int, int]]:
        if not group["vector_reshape"] and sum(1 for d in global_shape if d != 1) <= 1:
            return None
        return square_matricize(global_shape.numel())

    # --- step ------------------------------------------------------------------------------

    kernel_family = "SMMF"
    kernel_dtypes = (torch.bfloat16, torch.float16)

    def statistics(self, group: dict[str, Any]) -> dict[str, Side]:
        """Row/column sums of V, and of |M| when there is a first moment."""
        names: dict[str, Side] = {"row_v": "rows", "col_v": "cols"}
        if group["beta"] is not None:
            names.update(row_m="rows", col_m="cols")
        return names

    def _schedule(self, group: dict[str, Any], t: int) -> "_Schedule":
        return _Schedule.at(group, t)

    def _update(self, work: StepWork, reducer: StatReducer) -> None:
        for item, hp in zip(work.items, work.schedules):
            for seg in item.plan.dense_segments:
                _dense_step(item, seg, hp)
        reduced = []
        for stack in work.stacks:
            _factored_step(stack, work.scratch)
            if stack.reduced:
                stack.publish()
                reduced.append(stack)
            else:
                _store_stack_factors(stack)
        fused = work.fused
        if fused is not None:
            fused.run()
        for item in work.items:
            item.commit()

        def finish() -> None:
            for stack in reduced:
                _store_stack_factors(stack)
            if fused is not None:
                fused.finish()

        if reducer.groups:
            reducer.reduce(async_op=True)
            self._pending = (reducer, finish)
        else:
            finish()


@dataclass(frozen=True)
class _Schedule:
    """One parameter's hyperparameters at step ``t`` (counting from 1); equal ones batch together."""

    lr: float
    eps: float
    weight_decay: float
    decoupled_decay: bool
    coupled_decay: bool
    beta1: Optional[float]
    beta2: float

    @classmethod
    def at(cls, group: dict[str, Any], t: int) -> "_Schedule":
        wd, mode, beta = group["weight_decay"], group["weight_decay_mode"], group["beta"]
        return cls(
            lr=float(group["lr"]),  # a tensor lr is read here, once per step
            eps=group["eps"],
            weight_decay=wd,
            decoupled_decay=mode == "adamw" and wd != 0,
            coupled_decay=mode == "adam" and wd != 0,
            beta1=None if beta is None else beta * group["growth_rate"] ** (t - 1),
            beta2=1.0 - t ** group["decay_rate"],
        )

    @property
    def decay_factor(self) -> Optional[float]:
        """Decoupled decay W ← W·(1 − lr·wd), applied before the update (None: no decay)."""
        return 1.0 - self.lr * self.weight_decay if self.decoupled_decay else None


def _dense_step(item: StepItem, seg: SegmentPlan, hp: _Schedule) -> None:
    """vector_reshape=False: 1-D tensors keep dense moments with the same schedules (the same
    fused Adam step, or eager ops, as the factored chunks)."""
    weight, grad = seg.local(item.weight), seg.local(item.grad)
    first = None if hp.beta1 is None else seg.dense(item.state["exp_avg"])
    second = seg.dense(item.state["exp_avg_sq"])
    if _takes_fused_adam(hp, weight.device):
        assert first is not None
        _fused_step([weight], grad.unsqueeze(0), first.unsqueeze(0), second.unsqueeze(0), hp)
        return
    if hp.coupled_decay:
        grad = grad.add(weight, alpha=hp.weight_decay)
    second.mul_(hp.beta2)
    _eager_step([weight], grad.unsqueeze(0), None if first is None else first.unsqueeze(0), second.unsqueeze(0), torch.empty_like(second), hp)


_SIGNS = state_view("sign", SegmentPlan.bits)


def _factored_step(stack: SegmentStack, scratch: Scratch) -> None:
    """Decompress, step the moments and the weights, add partial factor sums; by chunks.

    One stack of segments at a time (a lone segment works on views of its own tensors); the sums
    go to the stack's statistics, completed over the ranks that hold the segments when sharded.
    The moments' and weights' step is torch's fused Adam where the device has it (one pass; see
    :mod:`~dist_memopt.optim.fused_adam`). The chunk's temporaries live in the step's ``scratch``.
    """
    geo, hp = stack.geometry, stack.schedule
    grads = stack.gather(local_grad)
    fused = _takes_fused_adam(hp, grads.device)
    if hp.coupled_decay and not fused:
        weights = stack.gather(local_weight)
    # the eager ops take β2·V_{t-1}: β2·(r ⊗ c) = (β2·r) ⊗ c scales the short factor once
    row_v = stack.gather(state_view("row_v", SegmentPlan.rows)) * (1.0 if fused else hp.beta2)
    col_v = stack.gather(state_view("col_v", SegmentPlan.cols))
    stats_v = stack.statistic("row_v"), stack.statistic("col_v")
    if hp.beta1 is not None:
        row_m = stack.gather(state_view("row_m", SegmentPlan.rows))
        col_m = stack.gather(state_view("col_m", SegmentPlan.cols))
        stats_m = stack.statistic("row_m"), stack.statistic("col_m")
        signs = stack.gather(_SIGNS)

    def take(role: str, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return scratch.take(role, numel, dtype, grads.device)

    for lo, hi in chunk_ranges(geo.numel, stack.chunk):
        part = geo.sub(lo, hi)
        grad = grads[:, lo:hi]
        second = part.outer(row_v, col_v, out=take("v", part.outer_numel))
        first = None
        if hp.beta1 is not None:
            bits = signs[:, lo // 8 : (hi + 7) // 8]
            sign = unpack_sign_rows(bits, hi - lo, take("sign", bits.numel() * 8), take("index", bits.numel(), torch.int32))
            first = part.outer(row_m, col_m, out=take("m", part.outer_numel)).mul_(sign)  # M_{t-1} = S ⊙ (r ⊗ c)
        if fused:
            assert first is not None
            _fused_step(stack.pieces(local_weight, lo, hi), grad, first, second, hp)
        else:
            if hp.coupled_decay:
                grad = torch.add(grad, weights[:, lo:hi], alpha=hp.weight_decay, out=take("decayed", grad.numel()).view(grad.shape))
            _eager_step(stack.pieces(local_weight, lo, hi), grad, first, second, take("denominator", grad.numel()), hp)
        part.add_row_col_sums(second, *stats_v)
        if first is not None:
            # M >= 0 into int8 0/1 bytes read as bools: torch's CPU compare vectorizes for an int8
            # output but not a bool one (3x per element; 4% of the FSDP2 step)
            mask = take("mask", first.numel(), torch.int8).view(first.shape)
            nonnegative = torch.ge(first, 0, out=mask).view(torch.bool)
            pack_sign_rows(nonnegative, bits, overwrite=True)
            part.add_row_col_sums(torch.abs(first, out=sign), *stats_m)
    if hp.beta1 is not None:
        stack.scatter(signs, _SIGNS)


def _takes_fused_adam(hp: _Schedule, device: torch.device) -> bool:
    """Whether this schedule's moments step in torch's fused Adam kernel (needs a first moment)."""
    return hp.beta1 is not None and fused_adam_available(device)


def _fused_step(weights: list[Tensor], grad: Tensor, first: Tensor, second: Tensor, hp: _Schedule) -> None:
    """The moments' and weights' step in one fused pass over (B, n) rows: ``second`` is V_{t-1}."""
    assert hp.beta1 is not None
    fused_adam_step(
        weights, list(grad.unbind(0)), list(first.unbind(0)), list(second.unbind(0)),
        lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, weight_decay=hp.weight_decay if hp.coupled_decay else 0.0,
    )


def _eager_step(weights: list[Tensor], grad: Tensor, first: Optional[Tensor], second: Tensor, denominator: Tensor, hp: _Schedule) -> None:
    """The moments' and weights' step in foreach ops over (B, n) rows: ``second`` is β2·V_{t-1}."""
    eager_adam_step(
        weights, list(grad.unbind(0)), None if first is None else list(first.unbind(0)), list(second.unbind(0)),
        list(denominator.view(grad.shape).unbind(0)), lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
    )


def _store_stack_factors(stack: SegmentStack) -> None:
    """Complete sums → normalised factors in the state, for V and (with a first moment) |M|."""
    pairs = [("row_v", "col_v")] + ([("row_m", "col_m")] if stack.schedule.beta1 is not None else [])
    for row_key, col_key in pairs:
        rows, cols = stack.complete(row_key), stack.complete(col_key)
        normalize_factors(rows, cols)
        for key, values, part in ((row_key, rows, SegmentPlan.rows), (col_key, cols, SegmentPlan.cols)):
            view = state_view(key, part)
            torch._foreach_copy_([view(w) for w in stack.works], list(values.unbind(0)))
