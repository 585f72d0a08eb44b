"""SMMF and Alada in Megatron at TP=2 (DP=1 and DP=2) give the parameters of TP=1.

The model (megatron_tp_setup.gpt) has grouped-query attention (a fused QKV projection split by
query groups), a SwiGLU ``linear_fc1`` (each TP rank holds a gate block and an up block), row-parallel
``linear_proj``/``linear_fc2`` (a column block: one run per row), untied vocabulary-parallel
embeddings and output layer, replicated norms and row-parallel biases. Megatron's CPU initialization
draws each full weight and keeps the rank's piece, so the TP=2 pieces assembled by the positions
dist_memopt derives must be exactly the TP=1 weights; after 10 steps on the same injected main
gradients (clipping active), the assembled TP=2 parameters equal TP=1's, with the distributed
optimizer on and off, SMMF and Alada, fp32 and bf16, with sequence parallelism, and at TP=2 x PP=2.
Also: distributed checkpoints saved at TP=1 resumed at TP=2 and back, and the optimizer's collectives
per step (constant in the number of layers).
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
    "smmf-distopt-sp": ("smmf", True, torch.float32, True),
}


PIPELINE_RUNS = ("smmf-distopt", "alada-whole")
CHECKPOINTED = ("smmf-distopt", "alada-whole")  # saved at SAVE_AT by TP=1 and by TP=2 x DP=1
SAVE_AT = 5


def _layout_runs(world_size: int, tp: int, root: str, save: bool) -> dict:
    """Every run of RUNS at TP=``tp`` (DP = the rest), saving the CHECKPOINTED ones at SAVE_AT."""
    mt.init_parallel(tp)
    out: dict = {"runs": {}}
    for label, (name, distributed, dtype, sp) in RUNS.items():
        if (sp and tp == 1) or (world_size > tp > 1 and not _at_dp2(label)):
            continue  # TP=1's reference of a sequence-parallel run is the plain one
        ddp, optimizer = mt.build(name, distributed, dtype, sequence_parallel=sp)
        before = mt.local_weights(ddp)
        returned = mt.train(ddp, optimizer, range(SAVE_AT))
        if label in CHECKPOINTED and save:
            mt.save(ddp, optimizer, f"{root}/tp{tp}/{label}")
        returned += mt.train(ddp, optimizer, range(SAVE_AT, STEPS))
        marked = sorted(n for n, p in ddp.module.named_parameters() if getattr(p, "sequence_parallel", False))
        out["runs"][label] = dict(initial=before, final=mt.local_weights(ddp), returned=returned, sequence_parallel=marked)
        if label == "smmf-distopt":
            out["pieces"] = {n: (tuple(piece.global_shape), piece.boxes) for n, _, piece in mt.named_pieces(ddp)}
    return out


def _two_ranks(rank: int, world_size: int, root: str) -> tuple[dict, dict]:
    """TP=1 x DP=2 (the reference), then TP=2 x DP=1, which also resumes TP=1's checkpoints."""
    reference = _layout_runs(world_size, 1, root, save=True)
    tp2 = _layout_runs(world_size, 2, root, save=True)
    tp2["resumed"] = _resume(f"{root}/tp1")
    return reference, tp2


def _four_ranks(rank: int, world_size: int, root: str, initial: dict) -> dict:
    """TP=2 x DP=2; the collectives; TP=2 x PP=2 from TP=1's ``initial`` weights (a later stage's
    layers would draw other values); TP=2's checkpoints resumed at TP=1 x DP=4."""
    out = _layout_runs(world_size, 2, root, save=False)
    out["collectives"] = _collectives()
    mt.init_parallel(2, 2)
    for label in PIPELINE_RUNS:
        name, distributed, dtype, _ = RUNS[label]
        ddp, optimizer = mt.build(name, distributed, dtype, initial=initial)
        returned = mt.train(ddp, optimizer, range(STEPS))
        out.setdefault("pipeline", {})[label] = dict(final=mt.local_weights(ddp), returned=returned)
    mt.init_parallel(1)
    out["resumed"] = _resume(f"{root}/tp2")
    return out


def _resume(saved: str) -> dict:
    """The CHECKPOINTED runs loaded from ``saved`` (another layout's step SAVE_AT), continued."""
    resumed = {}
    for label in CHECKPOINTED:
        name, distributed, dtype, _ = RUNS[label]
        ddp, optimizer = mt.build(name, distributed, dtype)
        mt.load(ddp, optimizer, f"{saved}/{label}")
        mt.train(ddp, optimizer, range(SAVE_AT, STEPS))
        steps = {int(s["step"]) for o in optimizer.chained_optimizers for s in o.optimizer.state.values()}
        resumed[label] = dict(final=mt.local_weights(ddp), steps=steps)
    return resumed


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
    for name, distributed in (("smmf", True), ("alada", True), ("smmf", False)):
        per_layers = []
        for layers in (1, 3):
            ddp, optimizer = mt.build(name, distributed, num_layers=layers)
            per_layers.append([_counted_step(optimizer, ddp, step) for step in range(2)])
        counts[name, distributed] = per_layers
    return counts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("megatron-tp-checkpoints"))
    two = run_distributed(_two_ranks, 2, root, timeout=400, daemon=False)
    reference = two[0][0]  # TP=1: every rank holds whole parameters
    initial, _ = mt.assemble([reference["runs"]["smmf-distopt"]["initial"]])
    tp2 = {2: [r[1] for r in two], 4: run_distributed(_four_ranks, 4, root, initial, timeout=500, daemon=False)}
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


def _at_dp2(label: str) -> bool:
    """Whether ``label`` also runs at TP=2 x DP=2 (sequence parallelism and bf16: DP=1 only, for time)."""
    _, _, dtype, sp = RUNS[label]
    return not sp and dtype == torch.float32


@pytest.mark.parametrize("world, label", [(2, label) for label in RUNS] + [(4, label) for label in RUNS if _at_dp2(label)])
def test_tp2_equals_tp1(runs, world, label):
    reference, tp2 = runs
    ref_label = label.removesuffix("-sp")
    expected, _ = mt.assemble([reference["runs"][ref_label]["final"]])
    got, disagreement = mt.assemble([r["runs"][label]["final"] for r in tp2[world]])
    errors = mt.max_errors(got, expected)
    worst = max(errors, key=errors.get)
    print(f"TP=2 x DP={world // 2} {label}: max relative difference {errors[worst]:.3g} ({worst}); replicas {disagreement:.3g}")
    if RUNS[label][2] == torch.bfloat16:
        # the fp32 main weights agree to rounding; their bf16 roundings by at most one spacing
        spacings = mt.bf16_spacings(got, expected)
        assert spacings <= 1.0, f"{label}: off by {spacings:.3g} bf16 spacings"
    else:
        assert errors[worst] <= TOLERANCE, f"{label}: {worst} off by {errors[worst]:.3g}"
    assert disagreement <= TOLERANCE
    marked = tp2[world][0]["runs"][label]["sequence_parallel"]
    # sequence parallelism marks the norms (2 per layer and the final one, weight and bias) and the
    # row-parallel biases, whose gradients Megatron completes over tp: all replicated over tp here
    assert len(marked) == (14 if label.endswith("-sp") else 0), marked
    assert all("norm" in n or n.endswith(("linear_proj.bias", "linear_fc2.bias")) for n in marked), marked
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
            assert [c[1] for c in one_layer] == [c[1] for c in three_layers] == [ours] * 2, (name, distributed)
            assert [c[0] for c in one_layer] == [c[0] for c in three_layers], (name, distributed)


@pytest.mark.parametrize("label", PIPELINE_RUNS)
def test_pipeline_stages_step_their_own_parameters(runs, label):
    """TP=2 x PP=2 on 4 ranks: each stage steps its layers; assembled, they equal TP=1 x PP=1."""
    reference, tp2 = runs
    expected, _ = mt.assemble([reference["runs"][label]["final"]])
    stages = [r["pipeline"][label]["final"] for r in tp2[4]]
    assert "embedding.word_embeddings.weight" not in stages[-1] and "output_layer.weight" not in stages[0]
    got, disagreement = mt.assemble(stages)
    errors = mt.max_errors(got, expected)
    worst = max(errors, key=errors.get)
    print(f"TP=2 x PP=2 {label}: max relative difference {errors[worst]:.3g} ({worst})")
    assert errors[worst] <= TOLERANCE and disagreement <= TOLERANCE, (worst, errors[worst], disagreement)
    for result in tp2[4]:
        for (ok, norm, _), (_, ref_norm, _) in zip(result["pipeline"][label]["returned"], reference["runs"][label]["returned"]):
            assert ok is True and norm == pytest.approx(ref_norm, rel=1e-5)


@pytest.mark.parametrize("label", CHECKPOINTED)
@pytest.mark.parametrize("direction", ["tp1-to-tp2", "tp2-to-tp1"])
def test_checkpoint_resumes_on_another_tensor_parallel_layout(runs, direction, label):
    """Saved by Megatron's distributed checkpointing at step 5 at TP=1 x DP=2 and loaded at TP=2 x
    DP=1; saved at TP=2 x DP=1 and loaded at TP=1 x DP=4: continued, equal to the uninterrupted run."""
    reference, tp2 = runs
    ranks = tp2[2] if direction == "tp1-to-tp2" else tp2[4]
    expected, _ = mt.assemble([reference["runs"][label]["final"]])
    got, disagreement = mt.assemble([r["resumed"][label]["final"] for r in ranks])
    errors = mt.max_errors(got, expected)
    worst = max(errors, key=errors.get)
    print(f"{direction} {label}: max relative difference {errors[worst]:.3g} ({worst})")
    assert errors[worst] <= TOLERANCE and disagreement <= TOLERANCE, (worst, errors[worst], disagreement)
    assert all(r["resumed"][label]["steps"] == {STEPS} for r in ranks)
