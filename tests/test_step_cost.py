"""`bench kernels`: the counter itself on hand-counted ops, and pinned step costs that must not grow.

Counts, not times. The pins are today's counts on the tiny GPT-2 shapes (the bench's default,
GPT-2 small, takes minutes on CPU; README lists its numbers); an optimization lowers them, and a
change that makes a step launch more kernels or move more bytes fails here until it is justified
and the pin raised.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dist_memopt as dm

from dist_memopt.bench.counting import StepCost
from dist_memopt.bench.models import model_shapes
from dist_memopt.shard.geometry import balanced_split, square_matricize

# dist_memopt.bench.kernels registers a benchmark on import: imported in the fixture, so that the
# registration order (which the CLI's messages show) stays that of a plain run

# optimizer -> (launches per step, bytes read + written per element), tiny GPT-2, one process: the
# counts today, rounded up. The fused CPU kernels (kernel="auto" on CPU tensors) step every tensor
# of a dtype and schedule in one call; the torch path takes a few dozen ops per stack of tensors.
PINNED = {
    "SMMF": (5, 18.9),
    "SMMF-nocheck": (4, 14.8),
    "Alada": (5, 27.6),
    "Alada-nocheck": (4, 23.6),
    "SMMF-torch": (330, 109.3),
    "Alada-torch": (336, 87.5),
    # the fused kernels (counted without running them: launches and bytes do not depend on values)
    "SMMF-triton": (27, 20.5),
    "SMMF-triton-nocheck": (20, 16.4),
    "Alada-triton": (38, 31.4),
    "Alada-triton-nocheck": (31, 27.3),
}


def test_counter_counts_kernels_bytes_and_syncs_by_hand():
    a, b = torch.ones(100), torch.ones(100)
    with StepCost() as cost:
        a.add_(b)  # reads a and b, writes a
        c = a * 2  # reads a, writes c
        c.view(10, 10)[0]  # views launch nothing
        torch.empty(50)  # nor do allocations
        b.copy_(c)  # writes b without reading it, reads c
        float(c.sum())  # one kernel, one sync
        c.tolist()  # a sync
        torch._foreach_mul_([a, b], 3.0)  # one launch for both
        cost.record("triton.fake", 7, 5)  # a fused kernel runner reporting to its observer
    assert cost.ops == {"add_": 1, "mul": 1, "copy_": 1, "sum": 1, "_foreach_mul_": 1, "triton.fake": 1}
    assert cost.bytes_read == 400 * (2 + 1 + 1 + 1 + 2) + 7
    assert cost.bytes_written == 400 * (1 + 1 + 1 + 2) + 4 + 5
    assert cost.syncs == {"_local_scalar_dense": 1, "tolist": 1}
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist or "tolist" not in torch.Tensor.__dict__


@pytest.fixture(scope="module")
def tiny_costs():
    from dist_memopt.bench.kernels import kernel_costs

    return kernel_costs("tiny", ["AdamW", "AdamW-foreach"] + list(PINNED))


def test_fused_adamw_is_two_launches_of_28_bytes_per_element(tiny_costs):
    fused = tiny_costs["optimizers"]["AdamW"]
    assert fused["host_ms"] is None  # torch's steps run their kernels: no dry run to time
    assert fused["launches"] == 2 and fused["top_ops"] == {"_foreach_add_": 2, "_fused_adamw_": 2}
    # weight, exp_avg, exp_avg_sq read and written, the gradient read
    assert fused["bytes_per_element"] == pytest.approx(28.0, abs=0.02)  # + step counters
    assert fused["syncs"] == 0


@pytest.mark.parametrize("grad_scale", [None, 4.0])
def test_fused_adamw_writes_its_gradients_only_to_unscale_them(grad_scale):
    """The schema marks the gradients written; the kernel writes them only with a grad_scale."""
    from dist_memopt.bench.counting import StepCost

    n = 1000
    weights, grads, exp_avgs, exp_avg_sqs = ([torch.randn(n)] for _ in range(4))
    exp_avg_sqs[0].abs_()
    before = grads[0].clone()
    scale = None if grad_scale is None else torch.tensor(grad_scale)
    with StepCost() as cost:
        torch._fused_adamw_(weights, grads, exp_avgs, exp_avg_sqs, [], [torch.tensor(1.0)], lr=1e-3, beta1=0.9,
                            beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False, grad_scale=scale)
    unscaled = not torch.equal(grads[0], before)
    assert unscaled == (grad_scale is not None)
    assert cost.bytes_written == 4 * n * (4 if unscaled else 3)


@pytest.mark.parametrize("name", PINNED)
def test_step_cost_does_not_grow(tiny_costs, name):
    if name not in tiny_costs["optimizers"]:
        pytest.skip("triton is not installed")
    row = tiny_costs["optimizers"][name]
    launches, per_element = PINNED[name]
    assert row["launches"] <= launches, row["top_ops"]
    assert row["bytes_per_element"] <= per_element
    assert row["syncs"] == (0 if name.endswith("nocheck") else 1)  # see test_host_syncs.py
    assert (row["host_ms"] is not None) == ("torch" not in name) and (row["host_ms"] or 1) > 0  # the fused kernels' dry runs
    if "triton" in name:  # a few launches per (n, m) view (2 steps counted), not a few per tensor
        view = square_matricize if name.startswith("SMMF") else balanced_split
        views = {view(shape.numel() if view is square_matricize else shape) for _, shape in model_shapes("tiny").params}
        kernels = ("smmf_tiles", "smmf_reduce") if name.startswith("SMMF") else ("alada_stats", "alada_reduce", "alada_update")
        assert [row["top_ops"][f"triton.{k}"] for k in kernels] == [2 * len(views)] * len(kernels)
    assert row["bytes_per_element"] >= 12  # at least: read the gradient, read and write the weight (fp32)
    if name.startswith(("SMMF", "Alada")) and "-" not in name.replace("-nocheck", ""):  # the fused CPU kernels
        calls = {k: v for k, v in row["ops"].items() if k.startswith("cpu.") and k != "cpu.finite_check"}
        if name.startswith("SMMF"):
            assert calls == {"cpu.smmf": 2, "cpu.smmf_finish": 2}  # one call each per step (2 counted)
        else:  # one process: whole tensors, so the even step is one pass, the odd step two
            assert calls == {"cpu.alada_even_rows": 1, "cpu.alada_stats": 1, "cpu.alada_update": 1}
    from dist_memopt.bench.kernels import format_costs

    assert f"\n{name} " in format_costs("tiny", tiny_costs["optimizers"])


#: GPT-2 small, one process, an odd and an even step: at most these bytes per element (the fused
#: CPU kernels: one pass over weight, gradient and sign bits for SMMF, 12.25 bytes; for Alada two
#: passes at odd steps, 24, and one at even steps, 20; the finite check reads the gradients once
#: more; the rest is the factors and the tiles' partial sums)
GPT2_BYTES = {"SMMF": 16.5, "SMMF-nocheck": 12.5, "Alada": 26.5, "Alada-nocheck": 22.5}


def test_fused_cpu_kernels_move_about_half_of_adamws_bytes_on_gpt2_small():
    from dist_memopt.bench.kernels import kernel_costs

    costs = kernel_costs("gpt2", list(GPT2_BYTES), warmup=1, steps=2)["optimizers"]
    for name, limit in GPT2_BYTES.items():
        assert costs[name]["bytes_per_element"] <= limit, (name, costs[name]["bytes_per_element"])
        assert costs[name]["launches"] <= 5, costs[name]["ops"]  # the statistic buffers, the step counters, the kernels


def test_half_precision_weights_cost_six_bytes_per_element_less_in_the_kernels(tiny_costs):
    """`bench kernels --kernel-dtype bfloat16`: the kernels read the 2-byte weight and gradient and
    write the weight (no fp32 copies): 2 + 2 + 2 bytes less than fp32, the same launches."""
    from dist_memopt.bench.kernels import kernel_costs

    names = [n for n in ("SMMF-triton-nocheck", "Alada-triton-nocheck") if n in tiny_costs["optimizers"]]
    if not names:
        pytest.skip("triton is not installed")
    half = kernel_costs("tiny", names, dtype=torch.bfloat16)["optimizers"]
    for name in names:
        full = tiny_costs["optimizers"][name]
        assert half[name]["launches"] == full["launches"], name
        assert half[name]["bytes_per_element"] == pytest.approx(full["bytes_per_element"] - 6, abs=0.05), name


class _FreshOutputs(TorchDispatchMode):
    """Counts op outputs that are new tensors (not views, in-place or out= results) of at least
    ``at_least`` elements: the temporaries a CPU allocator may hand back and fault in again."""

    def __init__(self, at_least: int) -> None:
        super().__init__()
        self.at_least, self.count = at_least, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(func._schema.returns, results):
            if ret.alias_info is None and isinstance(value, torch.Tensor) and value.numel() >= self.at_least:
                self.count += 1
        return out


@pytest.mark.parametrize("cls, config", [(dm.SMMF, dict(weight_decay_mode="adam")), (dm.Alada, {})])
def test_chunk_temporaries_are_reused_across_chunks(cls, config):
    """The torch path's chunk-sized temporaries come from the step's scratch buffers: as many fresh
    chunk-sized tensors per step for a tensor cut into 16 chunks as for one cut into 2."""
    fresh = []
    for chunk in (8192, 1024):  # a (128, 128) weight: 2 and 16 chunks of whole rows
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(128, 128))
        optimizer = cls([weight], lr=1e-2, kernel="torch", weight_decay=0.1, **config)
        optimizer.chunk_numel = chunk
        for _ in range(2):  # the second step counts
            weight.grad = torch.randn(128, 128)
            with _FreshOutputs(chunk) as counter:
                optimizer.step()
        fresh.append(counter.count)
    assert fresh[0] == fresh[1], fresh
