"""A diagnostic for the quality study: Alada's Algorithm 2 with a dense second moment.

Alada differs from Adam in two ways: its second moment tracks the bias-corrected *momentum's*
square M̃² (not the gradient's), and it keeps that moment as a rank-one product p qᵀ. To tell
which one costs perplexity, :class:`DenseAlada` keeps Algorithm 2 exactly (same M̃, v0 start, bias
correction, clamp and ε under the square root) with an elementwise U instead of p qᵀ.

    python -m dist_memopt.bench.quality_probe --models gpt2 --optimizers Alada --lrs 0.0003,0.001 \\
        --seeds 0 --json docs/results/alada_dense.json --out docs/results/alada_dense

runs the quality study with "Alada" built as :class:`DenseAlada` (its runs are labelled
``Alada factored=false``, so they never mix with the factored optimizer's records).
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional, Sequence

import torch

__all__ = ["DenseAlada", "main"]


class DenseAlada(torch.optim.Optimizer):
    """Algorithm 2 of the Alada paper with U kept elementwise (2× AdamW's state: a reference only).

    ``moment_of="gradient"`` feeds U the gradient's square G² instead of M̃² (everything else as
    Algorithm 2): with β2 = 0.999 that is Adam with Alada's ε, v0 start and bias correction.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.9),
                 eps: float = 1e-16, weight_decay: float = 0.0, factored: bool = False,
                 moment_of: str = "momentum") -> None:
        if factored:
            raise ValueError("factored: DenseAlada keeps U dense; use dist_memopt.Alada for p qᵀ")
        if moment_of not in ("momentum", "gradient"):
            raise ValueError(f"moment_of: 'momentum' or 'gradient', got {moment_of!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, moment_of=moment_of)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            (b1, b2), eps, lr = group["betas"], group["eps"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["t"], state["M"] = 0, torch.zeros_like(p)
                    state["v0"] = p.grad.square().mean()
                    state["U"] = torch.full_like(p, float(state["v0"]))
                t = state["t"]
                state["M"].mul_(b1).add_(p.grad, alpha=1 - b1)
                m_tilde = state["M"] / (1 - b1 ** (t + 1))
                fed = m_tilde if group["moment_of"] == "momentum" else p.grad
                state["U"].mul_(b2).add_(fed.square(), alpha=1 - b2)
                u_tilde = ((state["U"] - b2 ** (t + 1) * state["v0"]) / (1 - b2 ** (t + 1))).clamp_min(0)
                p.mul_(1 - lr * group["weight_decay"])
                p.sub_(lr * m_tilde / (u_tilde + eps).sqrt())
                state["t"] = t + 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The quality CLI with optimizer type "Alada" built as :class:`DenseAlada`."""
    from dist_memopt.bench.cli import main as bench_main
    from dist_memopt.train import optimizers

    argv = list(sys.argv[1:] if argv is None else argv)
    real = optimizers.OPTIMIZERS["Alada"]
    optimizers.OPTIMIZERS["Alada"] = optimizers.OptimizerSpec(lambda: DenseAlada, real.paper_params)
    try:
        return bench_main(["quality", *argv, "--set", "optimizer.params.factored=false"])
    finally:
        optimizers.OPTIMIZERS["Alada"] = real


if __name__ == "__main__":
    sys.exit(main())
