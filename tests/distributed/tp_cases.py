"""Tensor-parallel models and meshes for the 2-D parallelism tests (imported by the ranks).

Gradients are injected, not computed: every rank draws the same full gradient per parameter and
step and places it like the parameter, and a single-process copy steps on the same full
gradients, so the forward pass's TP reduction order cannot blur the comparison.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import dist_memopt as dm

from test_fsdp import CONFIGS, TOLERANCE  # noqa: F401  (the same optimizer settings as FSDP's tests)

STEPS = 12

# mesh name -> (world size, mesh shape, dim names, data-parallel dims for fully_shard)
MESHES = {
    "tp2": (2, (2,), ("tp",), ()),
    "dp2-tp2": (4, (2, 2), ("dp", "tp"), ("dp",)),
    "dp2-tp1": (2, (2, 1), ("dp", "tp"), ("dp",)),
    "hsdp2-tp2": (4, (2, 1, 2), ("replicate", "shard", "tp"), ("replicate", "shard")),
    "dp4-tp1": (4, (4, 1), ("dp", "tp"), ("dp",)),  # a checkpoint's other layouts
    "dp1-tp2": (2, (1, 2), ("dp", "tp"), ("dp",)),
}


class TPModel(nn.Module):
    """Layers whose TP shards are awkward in the factorization views (see the test's docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_rows = nn.Embedding(11, 6)  # RowwiseParallel: Shard(0)
        self.embed_cols = nn.Embedding(9, 6)  # ColwiseParallel: Shard(1), runs of 3 in a (9, 6) view
        self.up = nn.Linear(6, 38)  # column-wise: 19 rows per tp rank, 10 / 9 over dp
        self.down = nn.Linear(38, 14)  # row-wise (14, 38): runs of 19 = one (28, 19) view row
        self.mid = nn.Linear(6, 30)
        self.cross = nn.Linear(30, 14)  # row-wise (14, 30): runs of 15 cut across (21, 20) view rows
        self.norm = nn.LayerNorm(14)  # replicated over tp
        self.tiny = nn.Linear(14, 3)  # column-wise: fewer rows than ranks (empty shards)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_rows(tokens) + self.embed_cols(tokens % 9)
        out = self.down(torch.relu(self.up(h))) + self.cross(torch.relu(self.mid(h)))
        return self.tiny(self.norm(out))


PLAN = {
    "embed_rows": RowwiseParallel(input_layouts=Replicate()),
    "embed_cols": ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    "up": ColwiseParallel(),
    "down": RowwiseParallel(),
    "mid": ColwiseParallel(),
    "cross": RowwiseParallel(),
    "tiny": ColwiseParallel(output_layouts=Replicate()),
}


@functools.cache
def make_mesh(name: str) -> DeviceMesh:
    """One mesh per layout and process, as a training script has (a new mesh makes new groups)."""
    _, shape, names, _ = MESHES[name]
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


HAND_PLACED = ("kernel", "cube", "scalar", "plane")


@functools.cache
def unnamed_mesh(name: str) -> DeviceMesh:
    """The same mesh without dimension names: its parameters are reduced over a chain of groups."""
    return init_device_mesh("cpu", MESHES[name][1])


def hand_placed() -> dict[str, torch.Tensor]:
    """Full initial values of the parameters placed by hand (see :func:`hand_placements`)."""
    torch.manual_seed(1)
    return {"kernel": torch.randn(6, 4, 3, 3), "cube": torch.randn(5, 7, 4), "scalar": torch.randn(()), "plane": torch.randn(9, 10)}


def hand_placements(mesh: DeviceMesh) -> dict[str, tuple]:
    dp = [Replicate()] * (mesh.ndim - 1)
    shard_dp = dp[:-1] + [Shard(0)] if dp else []
    return {
        "kernel": tuple(shard_dp + [Shard(1)]),  # dp over dim 0, tp over dim 1 of a conv kernel
        "cube": tuple(dp + [Shard(1)]),  # 7 over tp: 4 / 3, a middle dim
        "scalar": tuple([Replicate()] * mesh.ndim),
        "plane": tuple(shard_dp + [Shard(1)]),  # on the unnamed mesh (see build)
    }


def build(name: str, extra_layers: int = 0) -> tuple[nn.Module, list[DTensor], dict[str, torch.Tensor]]:
    """The sharded model, hand-placed DTensors, and full initial values of every parameter."""
    mesh = make_mesh(name)
    torch.manual_seed(0)
    model = TPModel()
    for i in range(extra_layers):
        model.add_module(f"extra{i}", nn.Linear(6, 10))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    tp_mesh = mesh["tp"]
    plan = dict(PLAN, **{f"extra{i}": ColwiseParallel() for i in range(extra_layers)})
    parallelize_module(model, tp_mesh, plan)
    dp_dims = MESHES[name][3]
    if dp_dims:
        fully_shard(model, mesh=mesh[dp_dims] if len(dp_dims) > 1 else mesh[dp_dims[0]])
    extra = []
    for key, full in hand_placed().items():
        initial[key] = full.clone()
        on = unnamed_mesh(name) if key == "plane" else mesh
        placed = distribute_tensor(full, on, [Replicate()] * on.ndim).redistribute(on, hand_placements(mesh)[key])
        extra.append(nn.Parameter(placed))
    return model, extra, initial


def full_grad(name: str, shape: torch.Size, step: int) -> torch.Tensor:
    seed = (sum(map(ord, name)) * 1009 + step) % (1 << 31)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if name == "up.weight":
        grad[5] = 0.0  # a zero gradient row
    return grad


def inject(named: list[tuple[str, torch.Tensor]], step: int, replicated_grads: tuple[str, ...] = ()) -> None:
    """Place the step's full gradient like each parameter (``replicated_grads`` stay Replicate())."""
    for name, param in named:
        grad = full_grad(name, param.shape, step)
        if isinstance(param, DTensor):
            mesh = param.device_mesh
            grad = distribute_tensor(grad, mesh, [Replicate()] * mesh.ndim)
            if name not in replicated_grads:
                grad = grad.redistribute(mesh, param.placements)
        param.grad = grad


def named_params(model: nn.Module, extra: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + list(zip(HAND_PLACED, extra))


def single_process(config: str, initial: dict[str, torch.Tensor], steps: int = STEPS) -> dict[str, torch.Tensor]:
    cls_name, kwargs = CONFIGS[config]
    params = {n: nn.Parameter(t.clone()) for n, t in initial.items()}
    optimizer = getattr(dm, cls_name)(list(params.values()), **kwargs)
    for step in range(steps):
        inject(list(params.items()), step)
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}


def full_values(named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named}


def max_errors(reference: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter, the largest difference relative to the parameter's scale."""
    return {
        n: (full[n] - ref).abs().max().item() / max(1.0, ref.abs().max().item()) for n, ref in reference.items()
    }
