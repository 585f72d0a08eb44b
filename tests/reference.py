"""Dense float64 references of SMMF and Alada, written from the equations in issue #2.

They share no code with the package: the 2-D views, the sign matrix, the factors and the
updates are spelled out on whole float64 matrices, one parameter at a time, so that a test
comparing them with the optimizers checks the optimizers against the papers, not against
themselves. They take the gradients as given, step by step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

f64 = torch.float64


def square_shape(numel: int) -> tuple[int, int]:
    """Algorithm 2, literally: i from floor(sqrt(N)) down to 1, first divisor wins."""
    for i in range(int(math.floor(math.sqrt(numel))), 0, -1):
        if numel % i == 0:
            return numel // i, i
    raise AssertionError


def alada_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Eq. (12) for rank >= 2 (first split on ties), square matricization below."""
    if len(shape) <= 1:
        return square_shape(max(1, math.prod(shape)))
    gaps = [abs(math.prod(shape[:j]) - math.prod(shape[j:])) for j in range(1, len(shape))]
    j = gaps.index(min(gaps)) + 1
    return math.prod(shape[:j]), math.prod(shape[j:])


class SMMFReference:
    def __init__(
        self,
        weight: Tensor,
        lr: float = 1e-3,
        beta: Optional[float] = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_rate: float = -0.5,
        growth_rate: float = 0.999,
        vector_reshape: bool = True,
        weight_decay_mode: str = "adamw",
    ) -> None:
        self.w = weight.detach().to(f64).clone()
        self.lr, self.beta, self.eps, self.wd = lr, beta, eps, weight_decay
        self.decay_rate, self.growth_rate, self.mode = decay_rate, growth_rate, weight_decay_mode
        self.t = 0
        squeezed = [d for d in weight.shape if d != 1]
        self.dense = not vector_reshape and len(squeezed) <= 1
        if self.dense:
            self.m = torch.zeros(weight.numel(), dtype=f64)
            self.v = torch.zeros(weight.numel(), dtype=f64)
        else:
            n, m = square_shape(weight.numel())
            self.shape = (n, m)
            self.r_m, self.c_m = torch.zeros(n, dtype=f64), torch.zeros(m, dtype=f64)
            self.r_v, self.c_v = torch.zeros(n, dtype=f64), torch.zeros(m, dtype=f64)
            self.sign = torch.zeros(n, m, dtype=torch.bool)

    @staticmethod
    def _compress(x: Tensor) -> tuple[Tensor, Tensor]:
        n, m = x.shape
        r, c = x.sum(dim=1), x.sum(dim=0)
        if n <= m:
            if r.sum() != 0:
                r = r / r.sum()
        elif c.sum() != 0:
            c = c / c.sum()
        return r, c

    def step(self, grad: Tensor) -> None:
        self.t += 1
        t = self.t
        w = self.w.reshape(-1) if self.dense else self.w.reshape(self.shape)
        g = grad.detach().to(f64).reshape(w.shape)
        if self.mode == "adam":
            g = g + self.wd * w
        beta1 = None if self.beta is None else self.beta * self.growth_rate ** (t - 1)
        beta2 = 1.0 - t ** self.decay_rate
        if self.dense:
            self.v = beta2 * self.v + (1 - beta2) * g * g
            v = self.v
            if beta1 is None:
                m = g
            else:
                self.m = beta1 * self.m + (1 - beta1) * g
                m = self.m
        else:
            v_hat = torch.outer(self.r_v, self.c_v)
            v = beta2 * v_hat + (1 - beta2) * g * g
            self.r_v, self.c_v = self._compress(v)
            if beta1 is None:
                m = g
            else:
                m_hat = torch.where(self.sign, 1.0, -1.0).to(f64) * torch.outer(self.r_m, self.c_m)
                m = beta1 * m_hat + (1 - beta1) * g
                self.sign = m >= 0
                self.r_m, self.c_m = self._compress(m.abs())
        if self.mode == "adamw":
            w = w * (1 - self.lr * self.wd)
        w = w - self.lr * m / (v.sqrt() + self.eps)
        self.w = w.reshape(self.w.shape)


class AladaReference:
    def __init__(
        self,
        weight: Tensor,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
    ) -> None:
        self.w = weight.detach().to(f64).clone()
        self.lr, self.eps, self.wd = lr, eps, weight_decay
        self.beta1, self.beta2 = betas
        self.shape = alada_shape(tuple(weight.shape))
        self.M = torch.zeros(self.shape, dtype=f64)
        self.t = 0

    def step(self, grad: Tensor) -> None:
        t = self.t
        b1, b2, eps = self.beta1, self.beta2, self.eps
        rows, cols = self.shape
        g = grad.detach().to(f64).reshape(self.shape)
        self.M = b1 * self.M + (1 - b1) * g
        m_tilde = self.M / (1 - b1 ** (t + 1))
        V = m_tilde**2
        if t == 0:
            self.v0 = (g * g).sum() / (rows * cols)
            self.p = self.v0.sqrt() * torch.ones(rows, dtype=f64)
            self.q = self.v0.sqrt() * torch.ones(cols, dtype=f64)
        if t % 2 == 0:
            self.p = b2 * self.p + (1 - b2) * (V @ self.q) / (self.q @ self.q + eps)
        else:
            self.q = b2 * self.q + (1 - b2) * (V.T @ self.p) / (self.p @ self.p + eps)
        U = torch.outer(self.p, self.q)
        U_tilde = ((U - b2 ** (t + 1) * self.v0) / (1 - b2 ** (t + 1))).clamp_min(0)
        w = self.w.reshape(self.shape) * (1 - self.lr * self.wd)
        w = w - self.lr * m_tilde / (U_tilde + eps).sqrt()
        self.w = w.reshape(self.w.shape)
        self.t += 1
