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
    SegmentBatches,
    SegmentPlan,
    StepItem,
    check_foreach,
    check_number,
    chunk_ranges,
    decay_weights,
)
from dist_memopt.kernels.select import check_kernel, fused_item, fused_step
from dist_memopt.optim.bits import pack_signs, unpack_signs
from dist_memopt.optim.state_layout import StateKey
from dist_memopt.shard.geometry import square_matricize
from dist_memopt.shard.reduce import StatReducer

__all__ = ["SMMF", "normalize_factors"]

WEIGHT_DECAY_MODES = ("adam", "adamw")


def normalize_factors(rows: Tensor, cols: Tensor) -> None:
    """Algorithms 4/5: divide the shorter side (rows when n <= m) by its total, if non-zero."""
    side = rows if rows.numel() <= cols.numel() else cols
    total = side.sum()
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
        kernel: ``"auto"`` (fused Triton kernels on CUDA when Triton imports, else torch),
            ``"torch"`` or ``"triton"`` (see :mod:`dist_memopt.kernels.select`).
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
        check_number("lr", group["lr"], where, low=0.0)
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

    def _reserve(self, items: list[StepItem], reducer: StatReducer) -> list[list[Optional[tuple[int, int, int, int]]]]:
        """Slots per factored segment: row/col sums of V, and of |M| when there is a first moment.

        Segments on the fast path get None: their sums never leave the process.
        """
        tickets = []
        for item in items:
            device = item.weight.device
            with_first = item.group["beta"] is not None
            per_item: list[Optional[tuple[int, int, int, int]]] = []
            for seg in item.plan.factored:
                geo = seg.geometry
                assert geo is not None
                if self._batched(item.group, seg) and not fused_item(item):
                    per_item.append(None)
                    continue
                per_item.append(
                    (
                        reducer.reserve(seg.group, geo.rows, device),
                        reducer.reserve(seg.group, geo.cols, device),
                        reducer.reserve(seg.group, geo.rows, device) if with_first else -1,
                        reducer.reserve(seg.group, geo.cols, device) if with_first else -1,
                    )
                )
            tickets.append(per_item)
        return tickets

    def _apply(self, items: list[StepItem], reducer: StatReducer, tickets: list[list[Optional[tuple[int, int, int, int]]]]) -> None:
        jobs: list[tuple[StepItem, SegmentPlan, _Schedule, tuple[int, int, int, int]]] = []
        batches = SegmentBatches()
        decays: list[tuple[Tensor, float]] = []
        schedules: list[_Schedule] = []
        fused = fused_step(items, "SMMF")  # the Triton kernels, for the items whose group selects them
        for item, per_item, t in zip(items, tickets, self._advance_steps(items)):
            for key, (numel, dtype) in self._expected_state(item.group, item.plan).items():
                self._ensure(item.state, key, numel, dtype, item.weight.device)
            hp = _Schedule.at(item.group, t)
            schedules.append(hp)
            in_kernel = fused is not None and fused_item(item)
            if hp.decoupled_decay:  # the kernel decays its own segments' elements
                targets = [s.local(item.weight) for s in item.plan.dense_segments] if in_kernel else [item.weight]
                decays += [(target, 1.0 - hp.lr * hp.weight_decay) for target in targets]
            for seg, t in zip(item.plan.factored, per_item):
                if in_kernel:
                    assert fused is not None and t is not None
                    fused.add(item, seg, hp, _slots(reducer, t))
                elif t is None:
                    batches.add(item, seg, hp)
                else:
                    jobs.append((item, seg, hp, t))

        decay_weights(decays)  # W ← W·(1 − lr·wd) before any update
        for item, hp in zip(items, schedules):
            for seg in item.plan.dense_segments:
                _dense_step(item, seg, hp)
        batches.run(_factored_batch_step)
        for item, seg, hp, (t_rv, t_cv, t_rm, t_cm) in jobs:
            stats_m = (reducer.slot(t_rm), reducer.slot(t_cm)) if t_rm >= 0 else None
            _factored_step(item, seg, hp, (reducer.slot(t_rv), reducer.slot(t_cv)), stats_m)
        if fused is not None:
            fused.run()
        for item in items:
            item.commit()

        def finish() -> None:
            for item, seg, _, (t_rv, t_cv, t_rm, t_cm) in jobs:
                _store_factors(seg, item.state, "row_v", "col_v", reducer.slot(t_rv), reducer.slot(t_cv))
                if t_rm >= 0:
                    _store_factors(seg, item.state, "row_m", "col_m", reducer.slot(t_rm), reducer.slot(t_cm))
            if fused is not None:
                fused.finish()

        if reducer.groups:
            reducer.reduce(async_op=True)
            self._pending = (reducer, finish)
        else:
            finish()


def _slots(reducer: StatReducer, tickets: tuple[int, int, int, int]) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    return tuple(reducer.slot(t) if t >= 0 else None for t in tickets)  # type: ignore[return-value]


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
            lr=group["lr"],
            eps=group["eps"],
            weight_decay=wd,
            decoupled_decay=mode == "adamw" and wd != 0,
            coupled_decay=mode == "adam" and wd != 0,
            beta1=None if beta is None else beta * group["growth_rate"] ** (t - 1),
            beta2=1.0 - t ** group["decay_rate"],
        )


def _dense_step(item: StepItem, seg: SegmentPlan, hp: _Schedule) -> None:
    """vector_reshape=False: 1-D tensors keep dense moments with the same schedules."""
    weight = seg.local(item.weight)
    grad = seg.local(item.grad)
    if hp.coupled_decay:
        grad = grad.add(weight, alpha=hp.weight_decay)
    exp_avg_sq = seg.dense(item.state["exp_avg_sq"])
    exp_avg_sq.mul_(hp.beta2).addcmul_(grad, grad, value=1.0 - hp.beta2)
    if hp.beta1 is None:
        numerator = grad
    else:
        numerator = seg.dense(item.state["exp_avg"])
        numerator.mul_(hp.beta1).add_(grad, alpha=1.0 - hp.beta1)
    weight.addcdiv_(numerator, exp_avg_sq.sqrt().add_(hp.eps), value=-hp.lr)


def _factored_step(
    item: StepItem,
    seg: SegmentPlan,
    hp: _Schedule,
    stats_v: tuple[Tensor, Tensor],
    stats_m: Optional[tuple[Tensor, Tensor]],
) -> None:
    """Decompress, fold in the gradient, update the weight, add partial factor sums; by chunks."""
    geo = seg.geometry
    assert geo is not None
    state = item.state
    weights, grads = seg.local(item.weight), seg.local(item.grad)
    # β·(r ⊗ c) = (β·r) ⊗ c: scale the short factor once instead of every element
    row_v, col_v = seg.rows(state["row_v"]) * hp.beta2, seg.cols(state["col_v"])
    if hp.beta1 is not None:
        row_m, col_m = seg.rows(state["row_m"]) * hp.beta1, seg.cols(state["col_m"])
        signs = seg.bits(state["sign"])
    for lo, hi in chunk_ranges(geo.numel, item.chunk):
        part = geo.sub(lo, hi)
        weight, grad = weights[lo:hi], grads[lo:hi]
        if hp.coupled_decay:
            grad = grad.add(weight, alpha=hp.weight_decay)
        second = part.outer(row_v, col_v).addcmul_(grad, grad, value=1.0 - hp.beta2)
        part.add_row_col_sums(second, *stats_v)
        if hp.beta1 is None:
            numerator = grad
        else:
            assert stats_m is not None
            bits = signs[lo // 8 : (hi + 7) // 8]
            first = part.outer(row_m, col_m).mul_(unpack_signs(bits, hi - lo))
            first.add_(grad, alpha=1.0 - hp.beta1)
            pack_signs(first >= 0, bits)
            part.add_row_col_sums(first.abs(), *stats_m)
            numerator = first
        weight.addcdiv_(numerator, second.sqrt_().add_(hp.eps), value=-hp.lr)


def _factored_batch_step(batch: list[tuple[StepItem, SegmentPlan]], hp: _Schedule) -> None:
    """The fast path: :func:`_factored_step` for whole, unsharded segments of one (n, m) view.

    The segments are stacked into (B, n, m) tensors, so that each op of the step runs once for
    the batch; states and weights are read and written through lists of views (foreach ops).
    """
    geo = batch[0][1].geometry
    assert geo is not None
    n, m, count = geo.rows, geo.cols, len(batch)
    weights = [seg.local(item.weight) for item, seg in batch]
    grads = torch.stack([seg.local(item.grad) for item, seg in batch]).view(count, n, m)
    if hp.coupled_decay:
        grads.add_(torch.stack(weights).view(count, n, m), alpha=hp.weight_decay)

    def factors(row_key: str, col_key: str) -> tuple[Tensor, Tensor]:
        rows = torch.stack([seg.rows(item.state[row_key]) for item, seg in batch])
        return rows, torch.stack([seg.cols(item.state[col_key]) for item, seg in batch])

    row_v, col_v = factors("row_v", "col_v")
    second = torch.mul((row_v * hp.beta2).unsqueeze(2), col_v.unsqueeze(1))
    second.addcmul_(grads, grads, value=1.0 - hp.beta2)
    _store_batch_factors(batch, "row_v", "col_v", second.sum(2), second.sum(1))
    if hp.beta1 is None:
        numerator = grads
    else:
        row_m, col_m = factors("row_m", "col_m")
        sign_views = [seg.bits(item.state["sign"]) for item, seg in batch]
        words = sign_views[0].numel()
        signs = unpack_signs(torch.stack(sign_views).view(-1), count * words * 8).view(count, words * 8)
        first = torch.mul((row_m * hp.beta1).unsqueeze(2), col_m.unsqueeze(1))
        first.mul_(signs[:, : n * m].view(count, n, m)).add_(grads, alpha=1.0 - hp.beta1)
        nonnegative = signs.new_zeros(count, words * 8, dtype=torch.bool)  # padding bits stay 0
        nonnegative[:, : n * m] = (first >= 0).view(count, n * m)
        packed = sign_views[0].new_empty(count * words)
        pack_signs(nonnegative, packed)
        torch._foreach_copy_(sign_views, list(packed.view(count, words).unbind(0)))
        magnitude = first.abs()
        _store_batch_factors(batch, "row_m", "col_m", magnitude.sum(2), magnitude.sum(1))
        numerator = first
    denominator = second.sqrt_().add_(hp.eps)
    torch._foreach_addcdiv_(
        weights, list(numerator.view(count, -1).unbind(0)), list(denominator.view(count, -1).unbind(0)), value=-hp.lr
    )


def _store_batch_factors(
    batch: list[tuple[StepItem, SegmentPlan]], row_key: str, col_key: str, rows: Tensor, cols: Tensor
) -> None:
    """:func:`_store_factors` for a batch: (B, n) row and (B, m) column sums, normalised per segment."""
    side = rows if rows.shape[1] <= cols.shape[1] else cols
    total = side.sum(1, keepdim=True)
    side.div_(torch.where(total > 0, total, torch.ones_like(total)))
    torch._foreach_copy_([seg.rows(item.state[row_key]) for item, seg in batch], list(rows.unbind(0)))
    torch._foreach_copy_([seg.cols(item.state[col_key]) for item, seg in batch], list(cols.unbind(0)))


def _store_factors(seg: SegmentPlan, state: dict[str, Tensor], row_key: str, col_key: str, rows: Tensor, cols: Tensor) -> None:
    """Complete sums → normalised factors in the state."""
    row_state, col_state = seg.rows(state[row_key]), seg.cols(state[col_key])
    row_state.copy_(rows)
    col_state.copy_(cols)
    normalize_factors(row_state, col_state)
