"""SMMF and Alada in Megatron at TP=2 (DP=1 and DP=2) give the parameters of TP=1.

The model (megatron_tp_setup.gpt) has grouped-query attention (a fused QKV projection split by
query groups), a SwiGLU ``linear_fc1`` (each TP rank holds a gate block and an up block), row-parallel
``linear_proj``/``linear_fc2`` (a column block: one run per row), untied vocabulary-parallel
embeddings and output layer, replicated norms and row-parallel biases. Megatron's CPU initialization
draws each full weight and keeps the rank's piece, so the TP=2 pieces assembled by the positions
dist_memopt derives must be exactly the TP=1 weights; after 10 steps on the same injected main
gradients (clipping active), the assembled TP=2 parameters equal TP=1's, with the distributed
optimizer on and off, SMMF and Alada, fp32 and bf16, with sequence parallelism. Also: the optimizer's
collectives per step (constant in the number of layers), and what stays refused.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

import megatron_tp_setup as mt  # noqa: E402
from dist_memopt.integrations.megatron.tensor_parallel import Box  # noqa: E402
from harness import run_distributed  # noqa: E402

STEPS = 10
TOLERANCE = 1e-6
RUNS = {
    # label: (optimizer, distributed optimizer, dtype, sequence parallel)
    "smmf-distopt": ("smmf", True, torch.float32, False),
    "smmf-whole": ("smmf", False, torch.float32, False),
    "alada-distopt": ("alada", True, torch.float32, False),
    "alada-whole": ("alada", False, torch.float32, False),
    "alada-distopt-bf16": ("alada", True, torch.bfloat16, False),
    # "smmf-distopt-sp": ("smmf", True, torch.float32, True),
}


def _train_runs(rank: int, world_size: int, tp: int) -> dict:
    mt.init_parallel(tp)
    out: dict = {"runs": {}}
    for label, (name, distributed, dtype, sp) in RUNS.items():
        if sp and tp == 1:
            continue  # the TP=1 reference of a sequence-parallel run is the plain one
        ddp, optimizer = mt.build(name, distributed, dtype, sequence_parallel=sp)
        initial = mt.local_weights(ddp)
        returned = mt.train(ddp, optimizer, range(STEPS))
        out["runs"][label] = dict(initial=initial, final=mt.local_weights(ddp), returned=returned)
    ddp, _ = mt.build("smmf", True)
    out["pieces"] = {name: (tuple(piece.global_shape), piece.boxes) for name, _, piece in mt.named_pieces(ddp)}
    if tp > 1:
        out["collectives"] = _collectives()
    return out


def _counted_step(optimizer, ddp, step: int) -> tuple[int, int]:
    """All-reduces in one Megatron step, and those issued by SMMF/Alada themselves."""
    import torch.distributed as dist

    inner = optimizer.chained_optimizers[0].optimizer
    total, ours, inside = [0], [0], [False]
    real_all_reduce, real_step = dist.all_reduce, inner.step

    def counted(*args, **kwargs):
        total[0] += 1
        ours[0] += inside[0]
        return real_all_reduce(*args, **kwargs)

    def stepping(*args, **kwargs):
        inside[0] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            inside[0] = False

    dist.all_reduce, inner.step = counted, stepping
    try:
        mt.train(ddp, optimizer, range(step, step + 1))
    finally:
        dist.all_reduce, inner.step = real_all_reduce, real_step
    return total[0], ours[0]


def _collectives() -> dict:
    counts = {}
    for name in mt.CONFIGS:
        for distributed in (True, False):
            per_layers = []
            for layers in (1, 3):
                ddp, optimizer = mt.build(name, distributed, num_layers=layers)
                per_layers.append([_counted_step(optimizer, ddp, step) for step in range(3)])
            counts[name, distributed] = per_layers
    return counts


@pytest.fixture(scope="module")
def runs():
    reference = run_distributed(_train_runs, 1, 1, timeout=300)[0]
    tp2 = {world: run_distributed(_train_runs, world, 2, timeout=400) for world in (2, 4)}
    return reference, tp2


@pytest.mark.parametrize("world", [2, 4])
def test_pieces_assemble_the_tp1_weights(runs, world):
    """Each parameter kind's derived positions, against Megatron's own TP=1 initialization."""
    reference, tp2 = runs
    expected, _ = mt.assemble([reference["runs"]["smmf-distopt"]["initial"]])
    got, disagreement = mt.assemble([r["runs"]["smmf-distopt"]["initial"] for r in tp2[world]])
    assert disagreement == 0.0
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    pieces = tp2[world][1]["pieces"]  # tp rank 1
    layer = "decoder.layers.1."
    assert [b.offset for b in pieces[layer + "mlp.linear_fc1.weight"][1]] == [(11, 0), (33, 0)]  # gate, up
    assert pieces[layer + "self_attention.linear_qkv.weight"] == ((30, 18), (Box((15, 0), (15, 18)),))
    assert pieces[layer + "self_attention.linear_proj.weight"] == ((18, 18), (Box((0, 9), (18, 9)),))
    assert pieces[layer + "mlp.linear_fc2.weight"][1] == (Box((0, 11), (18, 11)),)
    assert pieces["embedding.word_embeddings.weight"][1] == (Box((25, 0), (25, 18)),)
    assert pieces["output_layer.weight"][1] == (Box((25, 0), (25, 18)),)
    for replicated in ("mlp.linear_fc2.bias", "self_attention.linear_proj.bias", "input_layernorm.weight"):
        assert pieces[layer + replicated] == ((18,), (Box((0,), (18,)),))


@pytest.mark.parametrize("label", list(RUNS))
@pytest.mark.parametrize("world", [2, 4])
def test_tp2_equals_tp1(runs, world, label):
    reference, tp2 = runs
    ref_label = label.removesuffix("-sp")
    expected, _ = mt.assemble([reference["runs"][ref_label]["final"]])
    got, disagreement = mt.assemble([r["runs"][label]["final"] for r in tp2[world]])
    errors = mt.max_errors(got, expected)
    worst = max(errors, key=errors.get)
    print(f"TP=2 x DP={world // 2} {label}: max relative difference {errors[worst]:.3g} ({worst}); replicas {disagreement:.3g}")
    assert errors[worst] <= TOLERANCE, f"{label}: {worst} off by {errors[worst]:.3g}"
    assert disagreement <= TOLERANCE
    ref_returned = reference["runs"][ref_label]["returned"]
    for result in tp2[world]:
        for (ok, norm, _), (ref_ok, ref_norm, _) in zip(result["runs"][label]["returned"], ref_returned):
            assert ok is True and ref_ok is True and norm == pytest.approx(ref_norm, rel=1e-5)
    assert ref_returned[0][1] > mt.CLIP  # clipping was active


def test_collectives_per_step_are_constant(runs):
    """SMMF/Alada's own: on TP=2 x DP=2 with the distributed optimizer, a probe on each of the tp and
    dp groups, then one buffer over tp then dp (split parameters) and one over dp (replicated ones);
    without it, the probe and one buffer over tp (DP replicas step identical whole pieces)."""
    _, tp2 = runs
    for result in tp2[4]:
        for (name, distributed), (one_layer, three_layers) in result["collectives"].items():
            ours = 5 if distributed else 2
            assert [c[1] for c in one_layer] == [c[1] for c in three_layers] == [ours] * 3, (name, distributed)
            assert [c[0] for c in one_layer] == [c[0] for c in three_layers], (name, distributed)
