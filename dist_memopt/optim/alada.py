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

from dist_memopt.kernels.jobs import alada_statistic
from dist_memopt.optim.base import (
    FactoredOptimizer,
    ParamPlan,
    SegmentPlan,
    SegmentStack,
    SegmentWork,
    Side,
    StepWork,
    check_foreach,
    check_number,
    chunk_ranges,
    flat_tensor,
)
from dist_memopt.kernels.select import check_kernel
from dist_memopt.optim.grad_contract import GradContract
from dist_memopt.optim.stacks import Scratch, local_grad, local_weight, state_view
from dist_memopt.optim.state_layout import StateKey
from dist_memopt.shard.geometry import balanced_split
from dist_memopt.shard.reduce import StatReducer
from dist_memopt.shard.spec import grad_like_param, local_tensor

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
        kernel: ``"auto"`` (the fused CPU kernels on CPU tensors, the fused Triton kernels on CUDA
            when Triton imports, else torch), ``"cpu"``, ``"triton"`` or ``"torch"`` (see
            :mod:`dist_memopt.kernels.select`).
    """

    hyperparameters = ("lr", "betas", "eps", "weight_decay")
    ignored_keys = {
        "beta": "Alada takes betas=(beta1, beta2) (the paper's (0.9, 0.9))",
        "decoupled_weight_decay": "Alada's weight decay is always decoupled (W <- W*(1 - lr*wd)); remove it",
    }
    # p, q, v0 in float64: see _denominator_terms (Ũ cancels p·qᵀ against β2^(t+1)·v0);
    # exp_avg_in_grad: M of momentum_in_grad groups, which .grad holds, in checkpoints only
    state_layout = dict(
        exp_avg=StateKey("elems", present=lambda group: not group["momentum_in_grad"]),
        exp_avg_in_grad=StateKey("elems", present=lambda group: group["momentum_in_grad"], held=False),
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
        check_number("lr", group["lr"], where, low=0.0, tensor=True)
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

    def _state_outside(self, group: dict[str, Any], param: Tensor, plan: ParamPlan) -> dict[str, Tensor]:
        """``exp_avg_in_grad``: a copy of the momentum ``.grad`` holds (zeros where it has none, as
        on a rank whose FSDP1 shard of the parameter is empty), so that a resumed run continues
        from it."""
        if not group["momentum_in_grad"]:
            return {}
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        flat = flat_tensor(local_tensor(grad_like_param(param, grad)), torch.float32)
        pieces = [seg.local(flat) for seg in plan.factored]
        return {"exp_avg_in_grad": torch.cat(pieces) if pieces else flat.new_zeros(0)}

    def _restore_outside(self, group: dict[str, Any], param: Tensor, plan: ParamPlan, values: dict[str, Tensor]) -> None:
        """Loaded ``exp_avg_in_grad`` into ``.grad`` (a zero gradient is made where there is none),
        written in place: the tensor ``zero_grad`` left stays the one the loop contract expects."""
        momentum = values.get("exp_avg_in_grad")
        if momentum is None or not group["momentum_in_grad"]:
            return
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        placed = grad_like_param(param, param.grad)
        if placed is not param.grad:
            param.grad = placed  # as step() places it
        local = local_tensor(placed)
        flat = flat_tensor(local, local.dtype)
        for seg in plan.factored:
            seg.local(flat).copy_(seg.elems(momentum))
        if flat.data_ptr() != local.data_ptr():
            local.copy_(flat.view_as(local))

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

    kernel_family = "Alada"
    kernel_dtypes = (torch.bfloat16, torch.float16)

    def statistics(self, group: dict[str, Any]) -> dict[str, Side]:
        """V·q, Vᵀ·p and ‖G0‖², whatever the step.

        Only one statistic is needed per step (and ‖G0‖² only at t = 0), but a layout that does
        not depend on the step count keeps the collective identical on every rank even where a
        rank's count differs: FSDP1's optim_state_dict_to_load gives a rank whose shard of a
        parameter is empty no state for it, so that rank restarts the parameter at t = 0 (harmless:
        it updates no element of it).
        """
        return {"row": "rows", "col": "cols", "norm": 1}

    def _schedule(self, group: dict[str, Any], t: int) -> "_Schedule":
        return _Schedule.at(group, t - 1)  # Algorithm 2 counts from 0

    def _update(self, work: StepWork, reducer: StatReducer) -> None:
        for stack in work.stacks:
            _partial_statistics(stack, work.scratch)
            stack.publish()
        fused = work.fused
        if fused is not None:
            fused.statistics()
        reducer.reduce(async_op=False)  # the refits need the complete statistics at once
        for stack in work.stacks:
            _refit_and_update(stack, work.scratch)
        if fused is not None:
            fused.update()
        for item in work.items:
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
            lr=float(group["lr"]),  # a tensor lr is read here, once per step
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            beta1=beta1,
            beta2=beta2,
            in_grad=group["momentum_in_grad"],
            bias1=1.0 - beta1 ** (t + 1),
            bias2=1.0 - beta2 ** (t + 1),
        )

    @property
    def decay_factor(self) -> Optional[float]:
        """Decoupled decay W ← W·(1 − lr·wd), applied before the update (None: no decay)."""
        return 1.0 - self.lr * self.weight_decay if self.weight_decay else None

    @property
    def start_decays(self) -> tuple[float, float]:
        """(β2^kp, β2^kq): how far p's and q's √v0 start has decayed by this step's refit (kp = ⌊t/2⌋ + 1
        refits of p, kq = ⌊(t+1)/2⌋ of q; their product is β2^(t+1)), see :func:`_denominator_terms`."""
        return self.beta2 ** (self.t // 2 + 1), self.beta2 ** ((self.t + 1) // 2)


def _momentum(work: SegmentWork) -> Tensor:
    """M_{t+1} for this segment (the state, or the gradient buffer that holds it)."""
    if work.schedule.in_grad:
        return work.seg.local(work.item.grad)
    return work.seg.elems(work.item.state["exp_avg"])


def _statistic_name(hp: "_Schedule") -> str:
    return alada_statistic(hp.t)


_P = state_view("row", SegmentPlan.rows)  # float64
_Q = state_view("col", SegmentPlan.cols)


def _v0(work: SegmentWork) -> Tensor:
    return work.item.state["v0"][work.seg.factor_index]


def _partial_statistics(stack: SegmentStack, scratch: Scratch) -> None:
    """Update M, then add this range's V·q (even t) or Vᵀ·p (odd t), and ‖G0‖² at t = 0.

    V = M̃² = M²/bias1²: the 1/bias1² goes into the (rows or cols) weights of the sums, so a chunk
    squares M once instead of dividing and then squaring.
    """
    geo, hp = stack.geometry, stack.schedule
    in_place = stack.count == 1  # one segment: M updated in place, chunk by chunk
    if not hp.in_grad and not in_place:  # several: on the members' own tensors, then stacked
        momentum_views = [_momentum(w) for w in stack.works]
        torch._foreach_lerp_(momentum_views, [local_grad(w) for w in stack.works], 1.0 - hp.beta1)
    momenta = stack.memo("momenta", lambda: stack.gather(_momentum))
    needs_grad = hp.t == 0 or (in_place and not hp.in_grad)
    grads = stack.gather(local_grad) if needs_grad else None
    stat = stack.statistic(_statistic_name(hp))
    norm = stack.statistic("norm") if hp.t == 0 else None
    unbias = 1.0 / (hp.bias1 * hp.bias1)
    if hp.t % 2 == 1:
        weights = stack.memo("row", lambda: stack.gather(_P)).float().mul_(unbias)
    elif hp.t > 0:
        weights = stack.memo("col", lambda: stack.gather(_Q)).float().mul_(unbias)
    else:
        # q_0 = sqrt(v0)·1 is not known before ‖G0‖² is complete: send plain row sums of V and
        # scale them by sqrt(v0) once it is (V·q_0 = sqrt(v0)·rowsum(V)).
        weights = torch.full((stack.count, geo.cols), unbias, dtype=torch.float32, device=stat.device)
    for lo, hi in chunk_ranges(geo.numel, stack.chunk):
        part = geo.sub(lo, hi)
        momentum = momenta[:, lo:hi]
        if in_place and not hp.in_grad:
            assert grads is not None
            momentum.lerp_(grads[:, lo:hi], 1.0 - hp.beta1)
        square = scratch.take("square", momentum.numel(), torch.float32, momentum.device).view(momentum.shape)
        second = torch.square(momentum, out=square)  # M², weighted by 1/bias1² in the sums
        if hp.t % 2 == 1:
            part.add_weighted_col_sums(second, weights, stat)
        else:
            part.add_weighted_row_sums(second, weights, stat)
        if norm is not None:
            assert grads is not None
            grad = grads[:, lo:hi]
            g0 = grad if not hp.in_grad else grad / (1.0 - hp.beta1)
            norm.add_((g0 * g0).sum(1, keepdim=True))


def _refit_and_update(stack: SegmentStack, scratch: Scratch) -> None:
    """Alternating refit of p or q from the complete statistic, then the preconditioned update.

    p, q and v0 are kept in float64 (they are O(rows + cols), so this costs nothing in memory);
    Ũ + eps is formed from them without cancellation (:func:`_denominator_terms`), and M and the
    update stay fp32.
    """
    geo, hp = stack.geometry, stack.schedule
    p = stack.memo("row", lambda: stack.gather(_P))  # (B, n) float64
    q = stack.memo("col", lambda: stack.gather(_Q))  # (B, m)
    v0 = stack.gather(_v0)  # (B,)
    stat = stack.complete(_statistic_name(hp)).to(torch.float64)
    if hp.t == 0:
        v0.copy_(stack.complete("norm")[:, 0] / (geo.rows * geo.cols))
        root = v0.sqrt().unsqueeze(1)
        p.copy_(root.expand_as(p))
        q.copy_(root.expand_as(q))
        stat.mul_(root)  # rowsum(V) -> V·q_0
    if hp.t % 2 == 0:
        p.mul_(hp.beta2).add_(stat.div_((q * q).sum(1, keepdim=True) + hp.eps), alpha=1.0 - hp.beta2)
    else:
        q.mul_(hp.beta2).add_(stat.div_((p * p).sum(1, keepdim=True) + hp.eps), alpha=1.0 - hp.beta2)
    rows, cols, row_shift = _denominator_terms(p, q, v0, hp)
    momenta = stack.memo("momenta", lambda: stack.gather(_momentum))  # updated by the first phase
    for lo, hi in chunk_ranges(geo.numel, stack.chunk):
        # max(Ũ, 0) + eps is max(Ũ + eps, eps): one clamp and one sqrt finish the denominator
        part = geo.sub(lo, hi)
        refit = part.outer(rows, cols, row_shift, out=scratch.take("refit", part.outer_numel, torch.float32, rows.device))
        denom = refit.clamp_min_(hp.eps).sqrt_()
        # M̃ / denom = M / (bias1·denom): the bias correction goes into the step size
        stack.addcdiv_(local_weight, lo, hi, momenta[:, lo:hi], denom, value=-hp.lr / hp.bias1)
    stack.scatter(p, _P)
    stack.scatter(q, _Q)
    stack.scatter(v0, _v0)


def _denominator_terms(p: Tensor, q: Tensor, v0: Tensor, hp: "_Schedule") -> tuple[Tensor, Tensor, Tensor]:
    """fp32 ``rows``, ``cols``, ``row_shift`` with Ũ + eps = rows ⊗ cols + row_shift (per row).

    Ũ = (p qᵀ − c)/(1 − β2^(t+1)) with c = β2^(t+1)·v0 subtracts two nearly equal terms wherever a
    row or column gets small gradients (early steps, rare embedding rows): in fp32 the difference
    can lose every digit, clamp to 0 and turn the update into lr·M̃/√eps. But p and q start at √v0
    and each of their refits (kp = ⌊t/2⌋ + 1 of p, kq = ⌊(t+1)/2⌋ of q by step t) decays them by β2
    and adds a non-negative term, so p ≥ x_p = β2^kp·√v0, q ≥ x_q = β2^kq·√v0, x_p·x_q = c, and
    p qᵀ − c = p ⊗ (q − x_q) + x_q·(p − x_p): two non-negative terms. The differences are taken in
    float64 on the (B, n) and (B, m) vectors; per element, fp32 sums two non-negative numbers.
    """
    root = v0.sqrt().unsqueeze(1)  # (B, 1)
    decay_p, decay_q = hp.start_decays
    x_p, x_q = root * decay_p, root * decay_q
    rows = (p / hp.bias2).float()
    cols = (q - x_q).float()
    row_shift = ((p - x_p) * (x_q / hp.bias2) + hp.eps).float()
    return rows, cols, row_shift
