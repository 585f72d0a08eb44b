"""Small models holding every awkward parameter shape the optimizers must handle."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AwkwardModel(nn.Module):
    """A scalar, vectors, a prime-sized vector, a 4-D conv kernel, an uneven matrix (23 rows)
    and a matrix with fewer rows (2) than the largest world size used in the tests (3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=3)  # weight (6, 3, 3, 3), bias (6,)
        self.proj = nn.Linear(54, 23)  # weight (23, 54): 23 rows split unevenly over 2 or 3 ranks
        self.head = nn.Linear(23, 2)  # weight (2, 23): fewer rows than 3 ranks
        self.prime = nn.Parameter(torch.randn(31) * 0.1)  # 31 elements: prime
        self.scale = nn.Parameter(torch.tensor(1.0))  # 0-d

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.tanh(self.proj(h))
        return self.scale * self.head(h).sum(-1) + z @ self.prime


def batch(step: int, size: int = 8, generator_seed: int = 1234) -> tuple[Tensor, Tensor, Tensor]:
    """A deterministic batch for ``step``: input image, side vector and target."""
    g = torch.Generator().manual_seed(generator_seed + step)
    x = torch.randn(size, 3, 5, 5, generator=g)
    z = torch.randn(size, 31, generator=g)
    y = torch.randn(size, generator=g)
    return x, z, y


def loss_fn(model: nn.Module, step: int, size: int = 8) -> Tensor:
    x, z, y = batch(step, size)
    return (model(x, z) - y).pow(2).mean()
