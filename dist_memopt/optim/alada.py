"""Alada: alternating adaptation of a rank-one second moment (He et al.), sharding-aware.

Per parameter, the second moment is p qᵀ over a 2-D view (eq. (12) for rank >= 2, square
matricization below that). Even steps refit p to the bias-corrected momentum's square with q
fixed, odd steps refit q (Algorithm 2). The refits need V·q or Vᵀ·p, and the first step ‖G0‖²:
on a shard those are partial sums, completed by one all_reduce per process group inside the step
(the update needs them at once, so unlike SMMF nothing can be deferred).

The first moment M is optimizer state by default. With ``momentum_in_grad=True`` it lives in the
``.grad`` buffers instead (Section IV-A, Listing 1): :meth:`Alada.zero_grad` scales them by β1 instead
of clearing them and :meth:`Alada.scale_loss` scales the loss by (1 − β1), so that backward leaves
exactly M_{t+1} = β1·M_t + (1 − β1)·G_t in ``.grad`` and the optimizer keeps no M at all.
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
from dist_memopt.optim.grad_contract import GradContract
from dist_memopt.optim.state_layout import StateKey
from dist_memopt.shard.geometry import balanced_split
from dist_memopt.shard.reduce import StatReducer

__all__ = ["Alada"]


class Alada(FactoredOptimizer):
    """Alada (Algorithm 2, with M̃ in the update's numerator), exact on sharded parameters.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: (β1, β2): first-moment decay and the decay of the factors p, q.
        eps: added to ‖q‖², ‖p‖² and to Ũ under the square root (the paper's 1e-16).
        weight_decay: decoupled decay, W ← W·(1 − lr·wd) before the update.
        momentum_in_grad: keep M in ``.grad`` (see the module docstring); the training loop
            calls ``optimizer.zero_grad()`` as usual and backpropagates
            ``optimizer.scale_loss(loss)``.
        check_finite: raise on inf/NaN gradients before any state changes (False skips the check).
        foreach: None or True steps small, whole (unsharded) tensors of the same 2-D view
            together in batched ops; False keeps the plain per-tensor path (see :class:`SMMF`).
        kernel: ``"auto"`` (fused Triton kernels on CUDA when Triton imports, else torch),
            ``"torch"`` or ``"triton"`` (see :mod:`dist_memopt.kernels.select`).
    """

    hyperparameters = ("lr", "betas", "eps", "weight_decay")
    ignored_keys = {
        "beta": "Alada takes betas=(beta1, beta2) (the paper's (0.9, 0.9))",
        "decoupled_weight_decay": "Alada's weight decay is always decoupled (W <- W*(1 - lr*wd)); remove it",
    }
    # p, q, v0 in float64: see _refit_and_update (Ũ cancels p·qᵀ against β2^(t+1)·v0)
    state_layout = dict(
        exp_avg=StateKey("elems", present=lambda group: not group["momentum_in_grad"]),
        row=StateKey("rows", torch.float64, everywhere=True),
        col=StateKey("cols", torch.float64, everywhere=True),
        v0=StateKey("factor", torch.float64, everywhere=True),
    )

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        *,
        momentum_in_grad: bool = False,
        check_finite: bool = True,
        foreach: Optional[bool] = None,
        kernel: str = "auto",
    ) -> None:
        defaults = dict(
            kernel=kernel,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum_in_grad=momentum_in_grad,
            check_finite=check_finite,
            foreach=foreach,
        )
        super().__init__(params, defaults)
        self._contract = GradContract()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_contract", GradContract())

    def _check_loop(self) -> None:
        self._contract.check(type(self).__name__, self.param_groups, self._param_name)

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        check_number("lr", group["lr"], where, low=0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas{where}: {betas!r} (must be a pair (beta1, beta2))")
        check_number("betas[0]", betas[0], where, low=0.0, high=1.0, high_open=True)
        check_number("betas[1]", betas[1], where, low=0.0, high=1.0, high_open=True)
        check_number("eps", group["eps"], where, low=0.0)
        check_number("weight_decay", group["weight_decay"], where, low=0.0)
        if not isinstance(group["momentum_in_grad"], bool):
            raise ValueError(f"Invalid momentum_in_grad{where}: {group['momentum_in_grad']!r} (must be a bool)")
        check_foreach(group, where)
        check_kernel(group, where)

    def _matrix_shape(self, group: dict[str, Any], global_shape: torch.Size) -> Optional[tuple[int, int]]:
        return balanced_split(global_shape)

    # --- the in-gradient first moment ------------------------------------------------------

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; in ``momentum_in_grad`` groups, decay the momentum they hold by β1.

        A parameter without a gradient there gets a zero one (M_0 = 0), so that backward
        accumulates into it.
        """
        for group in self.param_groups:
            in_grad = group["momentum_in_grad"]
            for p in group["params"]:
                if in_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad.mul_(group["betas"][0])
                    self._contract.record(p)
                elif p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        if p.grad.grad_fn is not None:
                            p.grad.detach_()
                        else:
                            p.grad.requires_grad_(False)
                        p.grad.zero_()
        self._contract.zeroed = True

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss·(1 − β1)`` for ``momentum_in_grad`` training (``loss`` unchanged otherwise)."""
        beta1s = {g["betas"][0] for g in self.param_groups if g["momentum_in_grad"]}
        if not beta1s:
            return loss
        if len(beta1s) > 1:
            raise ValueError(
                f"scale_loss needs one beta1 across momentum_in_grad param groups, found {sorted(beta1s)}"
            )
        return loss * (1.0 - beta1s.pop())

    # --- step ------------------------------------------------------------------------------

    def _reserve(self, items: list[StepItem], reducer: StatReducer) -> list[tuple[StepItem, SegmentPlan, Optional[tuple[int, int, int]]]]:
        """Per factored segment, slots for V·q, Vᵀ·p and ‖G0‖², whatever the step.

        Only one statistic is needed per step (and ‖G0‖² only at t = 0), but a layout that does
        not depend on the step count keeps the collective identical on every rank even where a
        rank's count differs: FSDP1's optim_state_dict_to_load gives a rank whose shard of a
        parameter is empty no state for it, so that rank restarts the parameter at t = 0 (harmless:
        it updates no element of it). Segments on the fast path get None (nothing to reduce).
        """
        jobs: list[tuple[StepItem, SegmentPlan, Optional[tuple[int, int, int]]]] = []
        for item in items:
            device = item.weight.device
            for seg in item.plan.factored:
                geo = seg.geometry
                assert geo is not None
                if self._batched(item.group, seg) and not fused_item(item):
                    jobs.append((item, seg, None))
                    continue
                slots = (
                    reducer.reserve(seg.group, geo.rows, device),
                    reducer.reserve(seg.group, geo.cols, device),
                    reducer.reserve(seg.group, 1, device),
                )
                jobs.append((item, seg, slots))
        return jobs

    def _apply(self, items: list[StepItem], reducer: StatReducer, jobs: list[tuple[StepItem, SegmentPlan, Optional[tuple[int, int, int]]]]) -> None:
        steps: dict[int, _Schedule] = {}
        decays: list[tuple[Tensor, float]] = []
        for item, t in zip(items, self._advance_steps(items)):
            for key, (numel, dtype) in self._expected_state(item.group, item.plan).items():
                self._ensure(item.state, key, numel, dtype, item.weight.device)
            hp = steps[id(item)] = _Schedule.at(item.group, t - 1)
            if hp.weight_decay and not fused_item(item):
                decays.append((item.weight, 1.0 - hp.lr * hp.weight_decay))
        batches = SegmentBatches()
        reduced = []
        fused = fused_step(items, "Alada")  # the Triton kernels, for the items whose group selects them

        def slots(job_slots: tuple[int, int, int], hp: "_Schedule") -> tuple[Tensor, Tensor]:
            rows, cols, norm = job_slots
            return reducer.slot(cols if hp.t % 2 == 1 else rows), reducer.slot(norm)

        for item, seg, job_slots in jobs:
            hp = steps[id(item)]
            if fused is not None and fused_item(item):
                assert job_slots is not None
                fused.add(item, seg, hp, *slots(job_slots, hp))
            elif job_slots is None:
                batches.add(item, seg, hp)
            else:
                reduced.append((item, seg, hp, job_slots))
        for item, seg, hp, job_slots in reduced:
            _partial_statistics(item, seg, hp, *slots(job_slots, hp))
        if fused is not None:
            fused.statistics()
        reducer.reduce(async_op=False)
        decay_weights(decays)  # W ← W·(1 − lr·wd) before the update (the kernels decay their own)
        batches.run(_batch_step)
        for item, seg, hp, job_slots in reduced:
            _refit_and_update(item, seg, hp, *slots(job_slots, hp))
        if fused is not None:
            fused.update()
        for item in items:
            item.commit()


@dataclass(frozen=True)
class _Schedule:
    """One parameter's hyperparameters at step ``t`` (counting from 0, as in Algorithm 2)."""

    t: int
    lr: float
    eps: float
    weight_decay: float
    beta1: float
    beta2: float
    in_grad: bool
    bias1: float
    bias2: float

    @classmethod
    def at(cls, group: dict[str, Any], t: int) -> "_Schedule":
        beta1, beta2 = group["betas"]
        return cls(
            t=t,
            lr=group["lr"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            beta1=beta1,
            beta2=beta2,
            in_grad=group["momentum_in_grad"],
            bias1=1.0 - beta1 ** (t + 1),
            bias2=1.0 - beta2 ** (t + 1),
        )


def _momentum(item: StepItem, seg: SegmentPlan, hp: _Schedule) -> Tensor:
    """M_{t+1} for this segment (the state, or the gradient buffer that holds it)."""
    if hp.in_grad:
        return seg.local(item.grad)
    return seg.elems(item.state["exp_avg"])


def _partial_statistics(item: StepItem, seg: SegmentPlan, hp: _Schedule, stat: Tensor, norm: Tensor) -> None:
    """Update M, then add this range's V·q (even t) or Vᵀ·p (odd t), and ‖G0‖² at t = 0."""
    geo = seg.geometry
    assert geo is not None
    grads, momenta = seg.local(item.grad), _momentum(item, seg, hp)
    if hp.t % 2 == 1:
        weights = seg.rows(item.state["row"]).float()
    elif hp.t > 0:
        weights = seg.cols(item.state["col"]).float()
    else:
        # q_0 = sqrt(v0)·1 is not known before ‖G0‖² is complete: send plain row sums of V and
        # scale them by sqrt(v0) once it is (V·q_0 = sqrt(v0)·rowsum(V)).
        weights = torch.ones(geo.cols, dtype=torch.float32, device=stat.device)
    for lo, hi in chunk_ranges(geo.numel, item.chunk):
        part = geo.sub(lo, hi)
        grad, momentum = grads[lo:hi], momenta[lo:hi]
        if not hp.in_grad:
            momentum.mul_(hp.beta1).add_(grad, alpha=1.0 - hp.beta1)
        second = momentum.div(hp.bias1).square_()
        if hp.t % 2 == 1:
            part.add_weighted_col_sums(second, weights, stat)
        else:
            part.add_weighted_row_sums(second, weights, stat)
        if hp.t == 0:
            g0 = grad if not hp.in_grad else grad / (1.0 - hp.beta1)
            norm += torch.dot(g0, g0)


def _refit_and_update(item: StepItem, seg: SegmentPlan, hp: _Schedule, stat: Tensor, norm: Tensor) -> None:
    """Alternating refit of p or q from the complete statistic, then the preconditioned update.

    Ũ = (p·qᵀ − β2^(t+1)·v0)/(1 − β2^(t+1)) subtracts two nearly equal terms wherever a row or
    column gets small gradients (early steps, rare embedding rows). In fp32 the difference can
    lose every digit, clamp to 0 and turn the update into lr·M̃/√eps, so p, q, v0 are kept in
    float64 and Ũ is formed in float64 (p and q are O(rows + cols), so this costs nothing in
    memory); M and the update stay fp32.
    """
    geo = seg.geometry
    assert geo is not None
    state = item.state
    p, q = seg.rows(state["row"]), seg.cols(state["col"])
    v0 = state["v0"][seg.factor_index]
    stat = stat.to(torch.float64)
    if hp.t == 0:
        v0.copy_(norm[0] / (geo.rows * geo.cols))
        root = v0.sqrt()
        p.copy_(root.expand_as(p))
        q.copy_(root.expand_as(q))
        stat.mul_(root)  # rowsum(V) -> V·q_0
    if hp.t % 2 == 0:
        p.mul_(hp.beta2).add_(stat.div_(q.dot(q) + hp.eps), alpha=1.0 - hp.beta2)
    else:
        q.mul_(hp.beta2).add_(stat.div_(p.dot(p) + hp.eps), alpha=1.0 - hp.beta2)
    shift = -v0 * hp.beta2 ** (hp.t + 1) / hp.bias2  # a 0-d float64 tensor: no host sync
    weights, momenta = seg.local(item.weight), _momentum(item, seg, hp)
    for lo, hi in chunk_ranges(geo.numel, item.chunk):
        second = geo.sub(lo, hi).outer(p, q, scale=1.0 / hp.bias2, shift=shift)
        denom = second.clamp_min_(0.0).add_(hp.eps).sqrt_().to(torch.float32)
        weights[lo:hi].addcdiv_(momenta[lo:hi].div(hp.bias1), denom, value=-hp.lr)


def _batch_step(batch: list[tuple[StepItem, SegmentPlan]], hp: _Schedule) -> None:
    """The fast path: both halves of the step for whole, unsharded segments of one (n, m) view.

    Stacked into (B, n, m) tensors, the statistics are complete locally, so the refit and the
    update follow at once; states and weights are read and written through lists of views.
    """
    geo = batch[0][1].geometry
    assert geo is not None
    n, m, count = geo.rows, geo.cols, len(batch)
    grad_views = [seg.local(item.grad) for item, seg in batch]
    momentum_views = [_momentum(item, seg, hp) for item, seg in batch]
    if not hp.in_grad:
        torch._foreach_mul_(momentum_views, hp.beta1)
        torch._foreach_add_(momentum_views, grad_views, alpha=1.0 - hp.beta1)
    corrected = torch.stack(momentum_views).view(count, n, m).div_(hp.bias1)  # M̃
    second = corrected.square()
    p = torch.stack([seg.rows(item.state["row"]) for item, seg in batch])  # (B, n) float64
    q = torch.stack([seg.cols(item.state["col"]) for item, seg in batch])  # (B, m)
    v0_views = [item.state["v0"][seg.factor_index] for item, seg in batch]
    if hp.t == 0:
        g0 = torch.stack(grad_views)
        if hp.in_grad:
            g0 = g0 / (1.0 - hp.beta1)
        v0 = ((g0 * g0).sum(1) / (n * m)).to(torch.float64)  # ‖G0‖²/(mn)
        root = v0.sqrt().unsqueeze(1)
        p, q = root.expand(count, n).clone(), root.expand(count, m).clone()
    else:
        v0 = torch.stack(v0_views)
    if hp.t % 2 == 0:  # p ← β2·p + (1 − β2)·V q/(‖q‖² + eps); at t = 0, V·q_0 = sqrt(v0)·rowsum(V)
        weights = second.new_ones(count, m) if hp.t == 0 else q.float()
        stat = torch.bmm(second, weights.unsqueeze(2)).squeeze(2).to(torch.float64)
        if hp.t == 0:
            stat.mul_(root)
        p.mul_(hp.beta2).add_(stat.div_((q * q).sum(1, keepdim=True) + hp.eps), alpha=1.0 - hp.beta2)
    else:  # q ← β2·q + (1 − β2)·Vᵀ p/(‖p‖² + eps)
        stat = torch.bmm(second.transpose(1, 2), p.float().unsqueeze(2)).squeeze(2).to(torch.float64)
        q.mul_(hp.beta2).add_(stat.div_((p * p).sum(1, keepdim=True) + hp.eps), alpha=1.0 - hp.beta2)
    shift = (-v0 * hp.beta2 ** (hp.t + 1) / hp.bias2).view(count, 1, 1)
    refit = torch.mul(p.unsqueeze(2), q.unsqueeze(1)).mul_(1.0 / hp.bias2).add_(shift)  # Ũ, float64
    denominator = refit.clamp_min_(0.0).add_(hp.eps).sqrt_().to(torch.float32)
    torch._foreach_addcdiv_(
        [seg.local(item.weight) for item, seg in batch],
        list(corrected.view(count, -1).unbind(0)),
        list(denominator.view(count, -1).unbind(0)),
        value=-hp.lr,
    )
    torch._foreach_copy_([seg.rows(item.state["row"]) for item, seg in batch], list(p.unbind(0)))
    torch._foreach_copy_([seg.cols(item.state["col"]) for item, seg in batch], list(q.unbind(0)))
    torch._foreach_copy_(v0_views, list(v0.unbind(0)))
