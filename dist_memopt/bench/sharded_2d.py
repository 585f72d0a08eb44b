"""GPT-2-small-shaped transformer blocks under FSDP2 × tensor parallelism on 4 CPU ranks.

The ``sharded`` benchmark's 2-D case. HF's GPT-2 uses ``Conv1D``, which torch's TP styles refuse,
so the blocks are built from ``nn.Linear`` with GPT-2 small's shapes: ``c_attn`` (768 → 2304) and
``mlp.c_fc`` (768 → 3072) column-wise, ``attn.c_proj`` (768 → 768) and ``mlp.c_proj`` (3072 →
768) row-wise, layer norms replicated over tp; then ``fully_shard`` over dp. The attention is a
stand-in (the value third of ``c_attn``'s output goes to ``c_proj``): the layouts, gradients and
collectives are those of a real block. Per optimizer it reports each rank's state, the optimizer's
all_reduce bytes against FSDP's gradient reduce-scatter bytes, the step time against AdamW under
the same wrapping, and the step of the row-wise ``mlp.c_proj`` weights (strided column blocks)
against that of the column-wise ``mlp.c_fc`` weights of the same size (contiguous rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist_memopt.bench.ranks import OPTIMIZERS, CollectiveBytes, interleaved_steps, make_optimizer, spawn_ranks, timed_step
from dist_memopt.bench.step import STEPS_PER_SAMPLE

WIDTH, HIDDEN = 768, 3072


class Block(nn.Module):
    """A GPT-2 small block's parameters (pre-norm attention and MLP) as ``nn.Linear`` layers."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.c_attn, self.attn_proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.c_fc, self.mlp_proj = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(self.ln_1(x))  # local: this tp rank's 2304 / tp features
        value = qkv[..., -qkv.shape[-1] // 3 :]  # stand-in attention: the value third
        x = x + self.attn_proj(value)
        return x + self.mlp_proj(torch.nn.functional.gelu(self.c_fc(self.ln_2(x))))


def _model(layers: int, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(layers)])
    plan = {"c_attn": ColwiseParallel(), "attn_proj": RowwiseParallel(), "c_fc": ColwiseParallel(), "mlp_proj": RowwiseParallel()}
    for block in model:
        parallelize_module(block, mesh["tp"], plan)
        fully_shard(block, mesh=mesh["dp"])
    return fully_shard(model, mesh=mesh["dp"])


def _rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        import dist_memopt as dm

        mesh = init_device_mesh("cpu", (world_size // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
        results, optimizers, models = {}, {}, []  # models: kept alive for the interleaved rounds
        for name in OPTIMIZERS:
            model = _model(args.tp_layers, mesh)
            optimizer = make_optimizer(name, model.parameters())
            x = torch.randn(1, args.seq_length, WIDTH, generator=torch.Generator().manual_seed(0))
            with CollectiveBytes() as backward_bytes:
                model(x).square().mean().backward()
            with CollectiveBytes() as step_bytes:
                optimizer.step()
                if hasattr(optimizer, "synchronize"):
                    optimizer.synchronize()
            row_wise = make_optimizer(name, [b.mlp_proj.weight for b in model])
            col_wise = make_optimizer(name, [b.c_fc.weight for b in model])
            results[name] = dict(
                state_bytes=dm.state_bytes(optimizer),
                optimizer_all_reduce_bytes=step_bytes.all_reduce,
                grad_reduce_scatter_bytes=backward_bytes.reduce_scatter,
                row_wise_seconds=timed_step(row_wise, args.repeats),
                col_wise_seconds=timed_step(col_wise, args.repeats),
                placements={"mlp_proj": str(model[0].mlp_proj.weight.placements), "c_fc": str(model[0].c_fc.weight.placements)},
            )
            del row_wise, col_wise
            optimizers[name] = optimizer
            models.append(model)
        for name, timing in interleaved_steps(optimizers, args.repeats).items():
            results[name].update(timing)
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree of the 2-D case (default 2)")
    parser.add_argument("--tp-ranks", type=int, default=4, help="CPU ranks of the 2-D case, dp × tp (default 4; 0 skips it)")
    parser.add_argument("--tp-layers", type=int, default=12, help="transformer blocks in the 2-D case (default 12, GPT-2 small)")


def check_arguments(args: argparse.Namespace) -> None:
    """Exit with a usage message before any process starts."""
    if args.tp < 1 or args.tp_layers < 1 or (args.tp_ranks > 0 and args.tp_ranks % args.tp):
        raise SystemExit(
            f"sharded: --tp-ranks ({args.tp_ranks}) must be a multiple of --tp ({args.tp}), both and "
            f"--tp-layers ({args.tp_layers}) positive"
        )


def run_2d(args: argparse.Namespace) -> dict[str, Any]:
    """The 2-D table: one line per optimizer."""
    if args.tp_ranks <= 0:
        return {}
    per_rank = spawn_ranks(_rank_main, args.tp_ranks, args)
    lines = [
        f"{args.tp_layers} GPT-2-small blocks (nn.Linear) under FSDP2 x TP, mesh (dp={args.tp_ranks // args.tp}, "
        f"tp={args.tp}) on CPU/gloo; per rank (worst rank for bytes, median rank time per step of rounds of {STEPS_PER_SAMPLE} consecutive steps; "
        "vs AdamW: within each round)",
        f"{'optimizer':<13} {'state MiB':>10} {'vs AdamW':>9} {'opt all_reduce':>15} {'grad reduce-scatter':>20} "
        f"{'extra comm':>10} {'step s':>8} {'vs AdamW':>9} {'row/col-wise':>13}",
    ]
    summary: dict[str, Any] = {}
    for name in OPTIMIZERS:
        ranks = [r[name] for r in per_rank]
        s = summary[name] = dict(
            state_bytes=max(r["state_bytes"] for r in ranks),
            optimizer_all_reduce_bytes=max(r["optimizer_all_reduce_bytes"] for r in ranks),
            grad_reduce_scatter_bytes=max(r["grad_reduce_scatter_bytes"] for r in ranks),
            step_seconds=statistics.median(r["step_seconds"] for r in ranks),
            vs_adamw=statistics.median(r["vs_baseline"] for r in ranks),
            row_over_col_wise=statistics.median(r["row_wise_seconds"] / r["col_wise_seconds"] for r in ranks),
            placements=ranks[0]["placements"],
        )
        s["extra_comm_fraction"] = s["optimizer_all_reduce_bytes"] / max(1, s["grad_reduce_scatter_bytes"])
    adamw = summary["AdamW"]
    for name, s in summary.items():
        lines.append(
            f"{name:<13} {s['state_bytes'] / 2**20:>10.2f} {s['state_bytes'] / adamw['state_bytes']:>8.1%} "
            f"{s['optimizer_all_reduce_bytes']:>15,} {s['grad_reduce_scatter_bytes']:>20,} "
            f"{s['extra_comm_fraction']:>10.3%} {s['step_seconds']:>8.3f} "
            f"{s['vs_adamw']:>8.2f}x {s['row_over_col_wise']:>12.2f}x"
        )
    lines.append(
        f"placements: mlp.c_proj {adamw['placements']['mlp_proj']} (row-wise: column blocks), "
        f"mlp.c_fc {adamw['placements']['c_fc']} (column-wise: rows)"
    )
    lines.append("targets: extra communication under 1% of the gradient reduce-scatter bytes; row-wise step within 1.5x of column-wise")
    print("\n".join(lines))
    return summary
