"""SMMF and Alada in Megatron with MoE experts split by expert tensor parallelism give TP=1's parameters.

The model (megatron_moe_setup.gpt_moe) has two MoE layers of 4 SwiGLU experts (SequentialMLP), on
4 gloo ranks in one launch, each layout (TP, expert TP, EP) against TP=1 x DP=4:

- TP=2, ETP=2, EP=1 (DP=2): experts split like the dense MLP, in the dense optimizer (Megatron
  treats experts as dense without expert parallelism);
- TP=2, ETP=2, EP=2 (expert DP=1): each EP rank holds 2 of the experts, in Megatron's expert
  optimizer; reducing their statistics over the dense data-parallel group (which pairs ranks
  holding *different* experts) instead of the expert one fails this case;
- TP=1, ETP=2, EP=2: the experts are split over an expert tensor-parallel group that is not the
  (size-1) dense tensor-parallel group; completing them over the dense group fails this case;
- TP=2, ETP=1, EP=2: whole experts beside TP-split dense weights (their pieces checked against the
  expert tensor-parallel size, 1, not the dense one).

Every layout starts from the same full weights and steps on the same injected main gradients
(each rank's piece of the TP=1 gradient); after 10 steps with clipping active the assembled
parameters equal TP=1's to 1e-6 of their scale, with the distributed optimizer on and off. The
TP=1 x ETP=2 x EP=2 SMMF run is also saved at step 5 with Megatron's distributed checkpointing
and resumed at ETP=1 (EP=2: the same two chained optimizers; Megatron's ChainedOptimizer keys its
optimizers' state by number and loads only into as many, so EP=2 to EP=1 does not load, whatever
the optimizer). Grouped-GEMM experts are refused with a clear error.
"""

from __future__ import annotations

import time
import types

import pytest
import torch

pytest.importorskip("megatron.core")

import megatron_moe_setup as me  # noqa: E402
import megatron_tp_setup as mt  # noqa: E402
from dist_memopt.integrations.megatron.tensor_parallel import Box  # noqa: E402
from harness import run_distributed  # noqa: E402

STEPS = 10
TOLERANCE = 1e-6
REFERENCE = (1, 1, 1)
LAYOUTS = {
    # (TP, expert TP, EP): the (optimizer, distributed optimizer) cases run there
    REFERENCE: [("smmf", True), ("alada", True)],
    (2, 2, 1): [("smmf", True), ("smmf", False), ("alada", True), ("alada", False)],
    (2, 2, 2): [("smmf", True), ("smmf", False), ("alada", True), ("alada", False)],
    (1, 2, 2): [("smmf", True), ("alada", True)],
    (2, 1, 2): [("smmf", True), ("alada", True)],
}
CASES = [(layout, name, distributed) for layout, cases in LAYOUTS.items() if layout != REFERENCE for name, distributed in cases]
FC1 = "decoder.layers.0.mlp.experts.local_experts.{}.linear_fc1.weight"
FC2 = "decoder.layers.0.mlp.experts.local_experts.{}.linear_fc2.weight"
QKV = "decoder.layers.0.self_attention.linear_qkv.weight"
SAVE_AT = 5
SAVED, RESUMED_AT = ((1, 2, 2), "smmf", True), (1, 1, 2)  # saved at step SAVE_AT, resumed at this layout


def _reduced_over(optimizer) -> dict[str, list[tuple[int, ...]]]:
    """Per stepped tensor (by Megatron's parameter name), the ranks of each group its statistics
    are completed over."""
    import torch.distributed as dist

    from dist_memopt.shard.spec import layout_of

    out = {}
    for chained in optimizer.chained_optimizers:
        for group in chained.optimizer.param_groups:
            for tensor in group["params"]:
                segment = layout_of(tensor).segments[0]
                out[segment.name] = [tuple(dist.get_process_group_ranks(g)) for g in segment.spec.groups]
    return out


def _all_layouts(rank: int, world_size: int, root: str) -> dict:
    start = time.perf_counter()
    out: dict = {}
    for layout, cases in LAYOUTS.items():
        me.init_parallel(*layout)
        for name, distributed in cases:
            ddp, optimizer, named = me.build(name, distributed)
            initial = me.local_weights(named)
            returned = me.train(ddp, optimizer, named, range(SAVE_AT))
            if (layout, name, distributed) == SAVED:
                mt.save(ddp, optimizer, root)
            returned += me.train(ddp, optimizer, named, range(SAVE_AT, STEPS))
            run = out[layout, name, distributed] = dict(initial=initial, final=me.local_weights(named), returned=returned)
            if name == "smmf":
                run["pieces"] = {n: (tuple(p.global_shape), p.boxes, p.expert) for n, _, p in named}
                run["reduced_over"] = _reduced_over(optimizer) if distributed else None
    me.init_parallel(*RESUMED_AT)
    ddp, optimizer, named = me.build(*SAVED[1:])
    mt.load(ddp, optimizer, root)
    me.train(ddp, optimizer, named, range(SAVE_AT, STEPS))
    steps = {int(s["step"]) for o in optimizer.chained_optimizers for s in o.optimizer.state.values()}
    out["resumed"] = dict(final=me.local_weights(named), steps=steps)
    out["seconds"] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    start = time.perf_counter()
    result = run_distributed(_all_layouts, 4, str(tmp_path_factory.mktemp("expert-tp-checkpoint")), timeout=400, daemon=False)
    print(f"\n4 ranks: {time.perf_counter() - start:.1f} s, of which the layouts {max(r['seconds'] for r in result):.1f} s")
    return result


def _compare(runs, key, reference_key) -> tuple[dict[str, float], float]:
    expected, _ = mt.assemble([runs[0][reference_key]["final"]])  # TP=1: rank 0 holds every parameter
    got, disagreement = mt.assemble([r[key]["final"] for r in runs])
    return mt.max_errors(got, expected), disagreement


def test_expert_pieces(runs):
    """Expert pieces from Megatron's metadata: the expert tensor-parallel rank's gate and up blocks of
    ``linear_fc1`` and column block of ``linear_fc2``, global expert indices under EP; all pieces
    together hold every element of the same initial TP=1 weights."""
    for layout in ((2, 2, 1), (2, 2, 2), (1, 2, 2)):
        key = (layout, "smmf", True)
        expected, _ = mt.assemble([runs[0][(REFERENCE, "smmf", True)]["initial"]])
        got, disagreement = mt.assemble([r[key]["initial"] for r in runs])
        assert disagreement == 0.0 and all(torch.equal(got[n], v) for n, v in expected.items()), layout
        etp_rank1 = runs[3][key]["pieces"]  # rank 3: expert TP rank 1, and EP rank 1 where EP=2
        expert = 2 if layout[2] == 2 else 0  # its first local expert: global 2 of 4 at EP=2
        assert etp_rank1[FC1.format(expert)] == ((20, 18), (Box((5, 0), (5, 18)), Box((15, 0), (5, 18))), True)
        assert etp_rank1[FC2.format(expert)] == ((18, 10), (Box((0, 5), (18, 5)),), True)
        assert FC1.format(expert + 1) in etp_rank1 and len([n for n in etp_rank1 if "linear_fc1" in n]) == 2 * 4 // layout[2]
        qkv = etp_rank1[QKV]
        assert qkv[2] is False and qkv[1] == ((Box((15, 0), (15, 18)),) if layout[0] == 2 else (Box((0, 0), (30, 18)),))


def test_expert_statistics_are_reduced_over_expert_groups(runs):
    """With the distributed optimizer: an expert weight's statistics over expert TP (and expert DP,
    where it has more than one rank), a dense weight's over TP and DP."""
    expected = {  # rank 0: (expert fc1, dense qkv) -> ranks of each group
        (2, 2, 1): ([(0, 1), (0, 2)], [(0, 1), (0, 2)]),  # expert DP = DP at EP=1
        (2, 2, 2): ([(0, 1)], [(0, 1), (0, 2)]),  # expert DP of one rank: nothing to complete
        (1, 2, 2): ([(0, 1)], [(0, 1, 2, 3)]),  # dense: DP=4; experts: their own TP group
        (2, 1, 2): ([(0, 2)], [(0, 1), (0, 2)]),  # whole experts: expert DP only
    }
    for layout, (expert, dense) in expected.items():
        reduced = runs[0][layout, "smmf", True]["reduced_over"]
        fc1 = [groups for name, groups in reduced.items() if name.endswith(FC1.format(0))]
        qkv = [groups for name, groups in reduced.items() if name.endswith(QKV)]
        assert fc1 == [expert] and qkv == [dense], (layout, fc1, qkv)


def _case_id(layout: tuple[int, int, int], name: str, distributed: bool) -> str:
    tp, etp, ep = layout
    return f"tp{tp}-etp{etp}-ep{ep}-{name}-{'distopt' if distributed else 'whole'}"


@pytest.mark.parametrize("layout, name, distributed", CASES, ids=[_case_id(*case) for case in CASES])
def test_expert_tp_equals_tp1(runs, layout, name, distributed):
    reference_key = (REFERENCE, name, True)
    errors, disagreement = _compare(runs, (layout, name, distributed), reference_key)
    worst = max(errors, key=errors.get)
    experts = max(e for n, e in errors.items() if "experts" in n)
    print(f"TP={layout[0]} ETP={layout[1]} EP={layout[2]} {name} {'distopt' if distributed else 'whole'}: "
          f"max relative difference {errors[worst]:.3g} ({worst}), experts {experts:.3g}; replicas {disagreement:.3g}")
    assert errors[worst] <= TOLERANCE, f"{worst} off by {errors[worst]:.3g}"
    assert disagreement <= TOLERANCE
    ref_returned = runs[0][reference_key]["returned"]
    for result in runs:
        for (ok, norm, _), (ref_ok, ref_norm, _) in zip(result[layout, name, distributed]["returned"], ref_returned, strict=True):
            assert ok is True and ref_ok is True and norm == pytest.approx(ref_norm, rel=1e-5)
    assert ref_returned[0][1] > mt.CLIP  # clipping was active


def test_checkpoint_saved_at_expert_tp2_resumes_at_expert_tp1(runs):
    """Saved at step 5 by TP=1 x ETP=2 x EP=2, loaded at ETP=1 x EP=2 (experts whole, expert DP=2),
    continued: equal to the uninterrupted TP=1 run."""
    expected, _ = mt.assemble([runs[0][(REFERENCE, *SAVED[1:])]["final"]])
    got, disagreement = mt.assemble([r["resumed"]["final"] for r in runs])
    errors = mt.max_errors(got, expected)
    worst = max(errors, key=errors.get)
    print(f"ETP=2 -> ETP=1 resume: max relative difference {errors[worst]:.3g} ({worst}); replicas {disagreement:.3g}")
    assert errors[worst] <= TOLERANCE and disagreement <= TOLERANCE, (worst, errors[worst], disagreement)
    assert all(r["resumed"]["steps"] == {STEPS} for r in runs)


class _Group:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


@pytest.mark.parametrize("grouped", ["GroupedMLP", "TEGroupedMLP"])
def test_grouped_gemm_experts_are_refused(grouped):
    """Grouped-GEMM experts (CUDA-only, so not built here: an instance without its CUDA setup)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.moe import experts

    from dist_memopt.integrations.megatron import get_megatron_optimizer

    module = getattr(experts, grouped).__new__(getattr(experts, grouped))
    torch.nn.Module.__init__(module)
    chunk = torch.nn.Module()
    chunk.experts, chunk.ddp_config = module, types.SimpleNamespace(use_megatron_fsdp=False)
    config = OptimizerConfig(optimizer="smmf", lr=1e-3)
    with pytest.raises(ValueError, match=f"experts is a {grouped}: grouped-GEMM experts .*moe_grouped_gemm=False"):
        get_megatron_optimizer(config, [chunk], pg_collection=types.SimpleNamespace(tp=_Group(1), expt_tp=_Group(2)))
