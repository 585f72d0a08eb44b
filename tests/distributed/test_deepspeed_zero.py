"""DeepSpeed ZeRO 0–3 and ZeRO-Offload with SMMF / Alada by name: real engines on 2 and 3 gloo ranks (CPU).

One process launch per world size runs every case (see deepspeed_workers.py); the tests assert on
its results against single-process runs of the same optimizer (deepspeed_cases.reference_run).
"""

from __future__ import annotations

import os

import pytest
import torch

from deepspeed_cases import DS_ENV, max_relative_diff, reference_run
from deepspeed_workers import CaseFailure, run_cases
from harness import run_distributed

pytest.importorskip("deepspeed")

OPTIMIZERS = ("SMMF", "Alada")
STAGES = (1, 2, 3)
STEPS = 10
FP32_TOLERANCE = 1e-6  # × parameter scale (max |w|, at least 1)
OFFLOAD = {"offload_optimizer": {"device": "cpu"}}  # ZeRO-Offload: partitions and step on the host
BF16_OPTIMIZER = dict(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})  # ZeRO-1 → BF16_Optimizer


def _zero(stage: int, **extra: dict) -> dict:
    """The ``zero_optimization`` section; ZeRO-3 sub-groups of ~200 elements: several flat fp32
    tensors, as in large models (with offload, the sub-groups are swapped through param_groups)."""
    return {"zero_optimization": {"stage": stage, **({"sub_group_size": 200} if stage == 3 else {}), **extra}}


def _exact_cases(world: int) -> list:
    cases = []
    for name in OPTIMIZERS:
        for stage in STAGES:
            cases.append((f"exact-{name}-{stage}", "exact", dict(name=name, stage=stage, **_zero(stage))))
    return cases


OFFLOAD_CASES = [(f"offload-{name}-{stage}", name, stage) for name in OPTIMIZERS for stage in STAGES]
OFFLOAD_INSTANCE_CASES = [("offload-by-instance-SMMF-3", "SMMF", 3), ("offload-by-instance-Alada-2", "Alada", 2)]


TWO_RANK_CASES = _exact_cases(2)
TWO_RANK_CASES += [(key, "exact", dict(name=name, stage=stage, **_zero(stage, **OFFLOAD))) for key, name, stage in OFFLOAD_CASES]
TWO_RANK_CASES += [(key, "by_instance", dict(name=name, stage=stage, **_zero(stage, **OFFLOAD))) for key, name, stage in OFFLOAD_INSTANCE_CASES]
TWO_RANK_CASES += [
    ("exact-SMMF-0", "exact", dict(name="SMMF", stage=0)),
    ("by-instance-Alada-2", "by_instance", dict(name="Alada", stage=2)),
    ("by-instance-SMMF-3", "by_instance", dict(name="SMMF", stage=3)),
    ("bad-params", "bad_params", {}),
    ("without-layouts", "without_layouts", dict(name="SMMF", stage=2)),
    ("accumulate-AdamW", "accumulate_clip_schedule", dict(name="AdamW", stage=2)),
    ("accumulate-SMMF", "accumulate_clip_schedule", dict(name="SMMF", stage=2)),
    ("accumulate-Alada", "accumulate_clip_schedule", dict(name="Alada", stage=1)),
]
# bf16: (name, stage, extra config, the dtype DeepSpeed rounds the averaged gradient to)
BF16_CASES = {
    "bf16-SMMF-1-bf16opt": ("SMMF", 1, {"data_types": {"grad_accum_dtype": "fp32"}}, torch.bfloat16),
    "bf16-Alada-1-bf16opt-fp32comm": (
        "Alada", 1, {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}, torch.float32
    ),
    "bf16-SMMF-2": ("SMMF", 2, {}, torch.bfloat16),
    "bf16-Alada-3": ("Alada", 3, {"zero_optimization": {"stage": 3, "sub_group_size": 200}}, torch.bfloat16),
    # stage 0: DeepSpeed's FP16_UnfusedOptimizer, whose zero-gradient priming step must be undone
    "bf16-SMMF-0": ("SMMF", 0, {}, torch.bfloat16),
    "bf16-Alada-0": ("Alada", 0, {}, torch.bfloat16),
    # ZeRO-Offload: the bf16 gradient partitions are copied into fp32 host buffers
    "bf16-offload-SMMF-2": ("SMMF", 2, _zero(2, **OFFLOAD), torch.bfloat16),
    "bf16-offload-Alada-3": ("Alada", 3, _zero(3, **OFFLOAD), torch.bfloat16),
}
TWO_RANK_CASES += [
    (key, "exact", dict(name=name, stage=stage, bf16={"enabled": True}, **extra))
    for key, (name, stage, extra, _) in BF16_CASES.items()
]
RESUME_CASES = {
    "resume-SMMF-2": dict(name="SMMF", stage=2),
    "resume-Alada-1": dict(name="Alada", stage=1),
    "resume-Alada-3": dict(name="Alada", stage=3),
    "resume-SMMF-1-bf16opt": dict(name="SMMF", stage=1, **BF16_OPTIMIZER),
    "resume-offload-SMMF-3": dict(name="SMMF", stage=3, **_zero(3, **OFFLOAD)),
    "resume-offload-Alada-2": dict(name="Alada", stage=2, **_zero(2, **OFFLOAD)),
}
TWO_RANK_CASES += [(key, "resume", kwargs) for key, kwargs in RESUME_CASES.items()]
TWO_RANK_CASES += [
    ("overflow-Alada-0", "fp16_overflow", dict(name="Alada", stage=0)),
    ("overflow-SMMF-2", "fp16_overflow", dict(name="SMMF", stage=2)),
    ("overflow-Alada-3", "fp16_overflow", dict(name="Alada", stage=3)),
    ("state-Alada-1", "state_helpers", dict(name="Alada", stage=1)),
    ("state-Alada-2", "state_helpers", dict(name="Alada", stage=2)),
    ("state-Alada-3", "state_helpers", dict(name="Alada", stage=3)),
    ("state-SMMF-2", "state_helpers", dict(name="SMMF", stage=2)),
    ("round-robin", "exact", dict(name="SMMF", stage=2, zero_optimization={"stage": 2, "round_robin_gradients": True})),
    ("elastic", "exact", dict(name="Alada", stage=1, zero_optimization={"stage": 1, "elastic_checkpoint": True})),
    ("moe-ep1", "moe", dict(name="SMMF", stage=2, ep_size=1)),
    ("moe-ep2", "moe", dict(name="Alada", stage=2, ep_size=2)),
]
# Checkpoints saved at step 5 on 2 ranks, converted, resumed on 3 ranks (at the same or another
# stage): (saved by, engine kwargs, reference kwargs)
UNIVERSAL_CASES = {
    "universal-SMMF-2to2": ("resume-SMMF-2", dict(name="SMMF", stage=2), {}),
    "universal-SMMF-2to3": ("resume-SMMF-2", dict(name="SMMF", stage=3), {}),
    "universal-Alada-3to1": ("resume-Alada-3", dict(name="Alada", stage=1), {}),
    "universal-Alada-3to3": ("resume-Alada-3", dict(name="Alada", stage=3), {}),
    # bf16: saved with bf16 gradient communication (2 ranks: one rounding), resumed with fp32
    # communication (3 ranks in bf16 would round in DeepSpeed's summation order)
    "universal-SMMF-1-bf16opt": (
        "resume-SMMF-1-bf16opt",
        dict(name="SMMF", stage=1, communication_data_type="fp32", **BF16_OPTIMIZER),
        dict(dtype=torch.bfloat16, grad_dtype=[torch.bfloat16] * 5 + [torch.float32] * 5),
    ),
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ds2"))
    return run_distributed(run_cases, 2, TWO_RANK_CASES, workdir, env=DS_ENV, timeout=400)


@pytest.fixture(scope="module")
def converted(two_ranks):
    """The 2-rank step-5 checkpoints of the resume cases, converted to universal checkpoints."""
    from dist_memopt.integrations.deepspeed.universal import main as convert

    folders = {}
    for key in {source for source, _, _ in UNIVERSAL_CASES.values()}:
        folder = _results(two_ranks, key)[0]["folder"]
        convert(["--input_folder", os.path.join(folder, "step5"), "--output_folder", os.path.join(folder, "step5_universal")])
        folders[key] = folder
    return folders


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, converted):
    workdir = str(tmp_path_factory.mktemp("ds3"))
    cases = _exact_cases(3)
    for key, (source, kwargs, _) in UNIVERSAL_CASES.items():
        tag = None if key.endswith("2to2") else "step5_universal"  # None: the latest_universal file
        cases.append((key, "universal_resume", dict(folder=converted[source], tag=tag, **kwargs)))
    folder = converted["resume-SMMF-2"]
    cases.append(("plain-load", "plain_load_on_other_size", dict(name="SMMF", stage=2, folder=folder, tag="step5")))
    cases.append(("wrong-optimizer", "universal_resume", dict(name="Alada", stage=2, folder=folder, tag="step5_universal")))
    return run_distributed(run_cases, 3, cases, workdir, env=DS_ENV, timeout=400)


def _results(ranks: list[dict], key: str) -> list:
    values = [r[key] for r in ranks]
    for rank, value in enumerate(values):
        if isinstance(value, CaseFailure):
            pytest.fail(f"case {key} failed on rank {rank}:\n{value}")
    return values


_REFERENCES: dict = {}


def _reference(name: str, world: int, **kwargs):
    key = (name, world, tuple(sorted(kwargs.items(), key=str)))
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_run(name, [world] * STEPS, **kwargs)[0]
    return _REFERENCES[key]


def _assert_close(results: list, reference, tolerance: float) -> None:
    for rank, result in enumerate(results):
        diffs = max_relative_diff(result["full"], reference)
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] <= tolerance, f"rank {rank}: {worst} differs by {diffs[worst]:.3g} × its scale"


def _assert_covers_awkward_cases(results: list, stage: int) -> None:
    """The layouts really contain split, whole-on-one-rank and empty pieces, and a conv kernel."""
    world = len(results)
    pieces: dict[str, list[tuple[int, int, tuple]]] = {}
    for result in results:
        for layout in result["layouts"]:
            for name, shape, _, start, end in layout["segments"]:
                pieces.setdefault(name, []).append((start, end, shape))
    numel = {name: torch.Size(p[0][2]).numel() for name, p in pieces.items()}
    held = {name: [(s, e) for s, e, _ in p if e > s] for name, p in pieces.items()}
    split = [n for n, h in held.items() if len(h) > 1]
    whole = [n for n, h in held.items() if len(h) == 1 and h[0] == (0, numel[n])]
    for name, ranges in held.items():  # the ranks' pieces tile each parameter exactly
        covered = sorted(ranges)
        assert covered[0][0] == 0 and covered[-1][1] == numel[name], name
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), name
    assert all(len(p) == world for p in pieces.values()), "every rank lists every parameter"
    assert split, "no parameter straddles a partition boundary"
    assert any(len(torch.Size(p[0][2])) == 4 for p in pieces.values()), "no conv kernel"
    if stage in (1, 2):
        assert whole, "no parameter lies entirely inside one rank's partition"
        assert any(end == start for p in pieces.values() for start, end, _ in p), "no rank without a piece"
    else:
        assert len(results[0]["layouts"]) > 1, "ZeRO-3 sub_group_size should give several sub-groups"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("world", (2, 3))
def test_zero_matches_single_process(two_ranks, three_ranks, world, name, stage):
    ranks = two_ranks if world == 2 else three_ranks
    results = _results(ranks, f"exact-{name}-{stage}")
    _assert_covers_awkward_cases(results, stage)
    _assert_close(results, _reference(name, world), FP32_TOLERANCE)


def _assert_cpu_kernels_stepped(results: list, name: str) -> None:
    """Every rank's optimizer stepped its partitions with the fused CPU kernels of ``name``."""
    for rank, result in enumerate(results):
        kernels = result["kernels"]
        assert kernels and all(k.startswith((f"cpu.{name.lower()}", "cpu.finite_check")) for k in kernels), f"rank {rank} ran {kernels}"


@pytest.mark.parametrize("key, name, stage", OFFLOAD_CASES)
def test_zero_offload_matches_single_process(two_ranks, key, name, stage):
    """ZeRO-Offload: DeepSpeed hands the optimizer its fp32 host partitions (ZeRO-3: one sub-group
    at a time, swapped into param_groups); the fused CPU kernels step them, exact as without it."""
    results = _results(two_ranks, key)
    assert all(result["offload"] for result in results), "the engine must offload the optimizer"
    _assert_cpu_kernels_stepped(results, name)
    _assert_close(results, _reference(name, 2), FP32_TOLERANCE)


@pytest.mark.parametrize("key, name, stage", OFFLOAD_INSTANCE_CASES)
def test_zero_offload_with_an_optimizer_instance(two_ranks, key, name, stage):
    results = _results(two_ranks, key)
    assert results[0]["basic"] == name and all(result["offload"] for result in results)
    _assert_cpu_kernels_stepped(results, name)
    _assert_close(results, _reference(name, 2), FP32_TOLERANCE)


def test_stage0_matches_single_process(two_ranks):
    results = _results(two_ranks, "exact-SMMF-0")
    assert results[0]["layouts"] == [] and results[0]["wrapper"] == "SMMF"
    _assert_close(results, _reference("SMMF", 2), FP32_TOLERANCE)


@pytest.mark.parametrize("name, stage", [("Alada", 2), ("SMMF", 3)])
def test_optimizer_instance_works_the_same(two_ranks, name, stage):
    results = _results(two_ranks, f"by-instance-{name}-{stage}")
    assert results[0]["basic"] == name
    _assert_close(results, _reference(name, 2), FP32_TOLERANCE)


def test_unknown_param_names_the_valid_ones(two_ranks):
    message = _results(two_ranks, "bad-params")[0]
    assert "unknown params ['betas']" in message
    for valid in ("lr", "beta", "eps", "weight_decay", "decay_rate", "growth_rate", "vector_reshape"):
        assert valid in message


def test_without_layouts_the_comparison_fails(two_ranks):
    results = _results(two_ranks, "without-layouts")
    diffs = max_relative_diff(results[0]["full"], _reference("SMMF", 2))
    assert max(diffs.values()) > 100 * FP32_TOLERANCE


@pytest.mark.parametrize("name", ("AdamW", "SMMF", "Alada"))
def test_accumulation_clipping_and_scheduler_as_with_adam(two_ranks, name):
    from deepspeed.runtime.lr_schedules import WarmupLR

    results = _results(two_ranks, f"accumulate-{name}")
    schedule = lambda opt: WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1e-2, warmup_num_steps=4)  # noqa: E731
    reference, optimizer = reference_run(name, [2] * 8, accumulation=2, clip=0.05, scheduler=schedule)
    assert results[0]["lr"] == [group["lr"] for group in optimizer.param_groups]
    assert results[0]["norm"] > 0.05, "clipping must actually act in this test"
    _assert_close(results, reference, FP32_TOLERANCE)


@pytest.mark.parametrize("key", BF16_CASES)
def test_bf16_matches_single_process_with_the_same_roundings(two_ranks, key):
    """bf16 at the fp32 tolerance: the reference rounds where DeepSpeed does — its fp32 master
    weights start from the bf16 model, forward/backward run on bf16 weights rounded from the
    master, and the rank-averaged gradient is rounded to bf16 where ZeRO keeps bf16 gradients (with
    fp32 accumulation and fp32 communication it is not). With two ranks the bf16 sum of two
    gradients rounds once whatever the order, so nothing else differs; a reference without
    these roundings is ~1e-2 away after 10 steps, far above any tolerance that would still
    catch a misplaced fragment."""
    name, stage, _, grad_dtype = BF16_CASES[key]
    results = _results(two_ranks, key)
    expected = {"bf16opt": "BF16_Optimizer", "-0": "FP16_UnfusedOptimizer"}
    for marker, wrapper in expected.items():
        if marker in key:
            assert results[0]["wrapper"] == wrapper
    if "offload" in key:
        assert all(result["offload"] for result in results)
        _assert_cpu_kernels_stepped(results, name)
    reference = _reference(name, 2, dtype=torch.bfloat16, grad_dtype=grad_dtype)
    _assert_close(results, reference, FP32_TOLERANCE)


@pytest.mark.parametrize("key", RESUME_CASES)
def test_save_load_continue_equals_uninterrupted(two_ranks, key):
    """Bit-identical: the resumed run's weights equal the uninterrupted run's (offload included)."""
    for result in _results(two_ranks, key):
        assert result["offload"] == ("offload" in key)
        for name, value in result["uninterrupted"].items():
            assert torch.equal(result["resumed"][name], value), name


@pytest.mark.parametrize("key", ["overflow-Alada-0", "overflow-SMMF-2", "overflow-Alada-3"])
def test_fp16_overflow_step_leaves_optimizer_state_untouched(two_ranks, key):
    for result in _results(two_ranks, key):
        assert result["state_unchanged"] and result["weights_unchanged"]
        assert result["skipped"] == 1 and result["skipped_after"] == 1
        assert result["scale"] == (256, 128), "dynamic loss scaling halves the scale on overflow"
        assert result["moved_on"], "training goes on after the skipped step"


@pytest.mark.parametrize("stage", STAGES)
def test_full_optimizer_state_helpers_return_per_element_state(two_ranks, stage):
    results = _results(two_ranks, f"state-Alada-{stage}")
    reference, optimizer = reference_run("Alada", [2] * STEPS)
    for result in results:
        assert result["set_then_get"]
        for name, p in reference.named_parameters():
            expected = optimizer.state[p]["exp_avg"].view(p.shape)
            assert (result["state"][name] - expected).abs().max().item() <= 1e-6 * max(1.0, expected.abs().max().item())
        for key in ("row", "v0"):
            assert "not laid out per element" in result["errors"][key] and "['exp_avg']" in result["errors"][key]


def test_factor_state_is_refused_on_every_rank(two_ranks):
    for result in _results(two_ranks, "state-SMMF-2"):
        assert all(message and "not laid out per element" in message for message in result["errors"].values())


@pytest.mark.parametrize("key", UNIVERSAL_CASES)
def test_universal_checkpoint_resumes_on_another_dp_size_and_stage(three_ranks, key):
    _, engine_kwargs, reference_kwargs = UNIVERSAL_CASES[key]
    name = engine_kwargs["name"]
    results = _results(three_ranks, key)
    assert all(result["global_steps"] == 5 for result in results)
    if "bf16opt" in key:
        assert results[0]["wrapper"] == "BF16_Optimizer"
    worlds = [2] * 5 + [3] * 5  # 5 steps on 2 ranks' data, 5 on 3 ranks'
    reference = reference_run(name, worlds, **reference_kwargs)[0]
    _assert_close(results, reference, FP32_TOLERANCE)
    without_state = reference_run(name, worlds, fresh_state_at=5, **reference_kwargs)[0]
    diffs = max_relative_diff(results[0]["full"], without_state)
    assert max(diffs.values()) > 100 * FP32_TOLERANCE, "the loaded optimizer state must matter here"


def test_plain_checkpoint_on_another_dp_size_says_how_to_convert(three_ranks):
    message = _results(three_ranks, "plain-load")[0]
    assert "DP world size of 2" in message and "dist_memopt.integrations.deepspeed.universal" in message
    assert '"load_universal": true' in message


def test_universal_checkpoint_of_another_optimizer_is_refused(three_ranks):
    for ranks in three_ranks:  # a case that raised on every rank: its traceback is the result
        message = ranks["wrong-optimizer"]
        assert isinstance(message, CaseFailure) and "holds SMMF state, this engine runs Alada" in message


@pytest.mark.parametrize("ep_size", (1, 2))
def test_moe_experts_are_reduced_over_their_own_group(two_ranks, ep_size):
    for result in _results(two_ranks, f"moe-ep{ep_size}"):
        dense, experts = result["groups"]
        assert not any(dense[0]) and dense[1] is False and dense[2] == 2
        assert all(experts[0]) and experts[1] is True and experts[2] == 2 // ep_size
        diffs = {n: (result[2][n] - w).abs().max().item() / max(1.0, w.abs().max().item()) for n, w in result[0].items()}
        assert max(diffs.values()) <= FP32_TOLERANCE, diffs


def test_a_wrong_deepspeed_mapping_fails_on_every_rank(two_ranks):
    """DeepSpeed 0.19.8 maps fragments in the original parameter order while round_robin_gradients
    flattens them reordered; the layout check catches it, on every rank (none is left hanging)."""
    for ranks in two_ranks:
        message = ranks["round-robin"]
        assert isinstance(message, CaseFailure) and "round_robin_gradients=true; turn it off" in message


def test_elastic_checkpoints_are_refused(two_ranks):
    for ranks in two_ranks:
        message = ranks["elastic"]
        assert isinstance(message, CaseFailure) and "elastic_checkpoint=true" in message and "universal" in message
