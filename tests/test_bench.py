"""The benchmark package on tiny models: exact byte counts, table contents, CLI dispatch.

Timings are measured but never asserted (the machine is shared); byte counts are exact.
"""

from __future__ import annotations

import json
import re
import math
import os
import subprocess
import sys

import pytest
import torch

from dist_memopt.bench import Benchmark, benchmarks, registry
from dist_memopt.bench.cli import main
from dist_memopt.bench.memory import DEFAULT_OPTIMIZERS, _model_result, format_memory, measure_state_bytes, memory_benchmark
from dist_memopt.bench.models import ModelShapes, model_shapes, shapes_of
from dist_memopt.bench.optimizers import OPTIMIZERS, OptimizerSpec, build_optimizer
from dist_memopt.bench.step import STEPS_PER_SAMPLE, _summary, format_step, step_benchmark, time_steps
from models import AwkwardModel

MIB = 2**20


def _square(numel: int) -> tuple[int, int]:
    """SMMF Algorithm 2, written out here independently: (N // i, i), i the largest divisor <= sqrt(N)."""
    i = max(d for d in range(1, math.isqrt(numel) + 1) if numel % d == 0)
    return numel // i, i


def _smmf_bytes(shapes: ModelShapes) -> int:
    total = 0
    for _, shape in shapes.params:
        n, m = _square(shape.numel())
        total += math.ceil(shape.numel() / 8) + 4 * (2 * n + 2 * m) + 4  # signs, r/c of M and V, step
    return total


@pytest.fixture(scope="module")
def tiny() -> ModelShapes:
    return model_shapes("tiny")


def test_tiny_shapes_count_the_tied_head_once(tiny):
    assert ("lm_head.weight", "transformer.wte.weight") in tiny.tied
    assert "lm_head.weight" not in dict(tiny.params)
    from transformers import GPT2Config, GPT2LMHeadModel

    real = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=101))
    assert tiny.numel == sum(p.numel() for p in real.parameters())  # parameters() deduplicates too
    assert all(shape == dict(real.named_parameters())[name].shape for name, shape in tiny.params)


def test_smmf_and_adamw_state_bytes_match_the_formulas(tiny):
    measured = measure_state_bytes(tiny, ["AdamW", "SMMF"])
    assert measured["SMMF"] == _smmf_bytes(tiny)
    assert measured["AdamW"] == 8 * tiny.numel + 4 * len(tiny.params)  # exp_avg, exp_avg_sq, fp32 step


def test_baselines_step_on_scalar_vector_and_conv_parameters():
    shapes = shapes_of("awkward", "AwkwardModel", AwkwardModel())
    assert any(len(shape) == 0 for _, shape in shapes.params) and any(len(s) == 4 for _, s in shapes.params)
    measured = measure_state_bytes(shapes, list(DEFAULT_OPTIMIZERS))
    assert measured["SMMF"] == _smmf_bytes(shapes)
    # the baselines with a first moment keep one fp32 value per element, plus their statistics
    for name in ("Adafactor-b1", "CAME", "SM3", "Alada"):
        assert measured[name] > 4 * shapes.numel
    assert measured["Adafactor"] < 4 * shapes.numel and measured["Alada-M-in-grad"] < 4 * shapes.numel


def test_memory_table_has_every_optimizer_and_the_paper_column(tiny):
    stand_in = ModelShapes("gpt2", "tiny stand-in for GPT-2", tiny.params, tiny.tied)
    results = memory_benchmark([stand_in], list(DEFAULT_OPTIMIZERS))
    text = format_memory(results)
    for name in DEFAULT_OPTIMIZERS:
        assert f"\n{name} " in text
    assert "paper MiB (source)" in text
    assert "861–973 (Table 4)" in text and "16 (Table 4)" in text
    row = results["models"]["gpt2"]["optimizers"]["SMMF"]
    assert row["bits_per_param"] == pytest.approx(row["bytes"] * 8 / tiny.numel)
    assert results["verdicts"] == [
        {
            "check": "SMMF state for gpt2 <= paper's 16 MiB (Table 4)",
            "measured": row["bytes"] / MIB,
            "limit": 16,
            "ok": True,
        }
    ]
    assert "OK: SMMF state for gpt2" in text


def test_memory_verdict_fails_over_the_paper_figure(tiny):
    result = _model_result(ModelShapes("t5", "stand-in", tiny.params), {"SMMF": int(8.4 * MIB)})
    assert [v["ok"] for v in result["verdicts"]] == [False]
    assert "Tables 10–11" in result["verdicts"][0]["check"]


def test_step_benchmark_interleaves_and_reports_ratios(tiny):
    results = step_benchmark([tiny], ["AdamW", "SMMF", "Alada"], repeats=2, warmup=1)
    rows = results["models"]["tiny"]["optimizers"]
    assert list(rows) == ["AdamW", "SMMF", "Alada"]
    assert all(len(r["samples_ms"]) == 2 and r["min_ms"] > 0 for r in rows.values())
    assert rows["AdamW"]["ratio_to_adamw"] == 1.0 and rows["AdamW"]["min_ratio_to_adamw"] == 1.0
    assert results["verdicts"] == []  # the 1.5x target is for GPT-2-small shapes only
    text = format_step(results)
    assert "Transformer-base" in text and "1.33x" in text  # Table 5: 171 / 129
    # the processor and the CPU kernels' blocks, which decide whether a step is bound by memory
    assert f"CPU kernels: {results['cpu_kernels_simd']}" in text and results["cpu_kernels_simd"] in ("avx512", "avx2", "scalar")


def test_a_sample_is_an_odd_and_an_even_step(tiny, monkeypatch):
    """Alada's steps alternate between two passes (odd t) and one (even t): each timed sample takes
    STEPS_PER_SAMPLE = 2 consecutive steps of every optimizer, whatever the warm-up's parity."""
    from dist_memopt.bench import step as step_module

    assert STEPS_PER_SAMPLE == 2
    counts: dict[str, int] = {}

    def counted(name, params):
        optimizer = build_optimizer(name, params)
        counts[name] = 0
        optimizer.register_step_post_hook(lambda *_: counts.__setitem__(name, counts[name] + 1))
        return optimizer

    monkeypatch.setattr(step_module, "build_optimizer", counted)
    samples = time_steps(tiny, ["AdamW", "Alada"], repeats=3, warmup=1)
    assert counts == {"AdamW": 1 + 3 * STEPS_PER_SAMPLE, "Alada": 1 + 3 * STEPS_PER_SAMPLE}
    assert all(len(times) == 3 for times in samples.values())


def test_step_limit_pairs_each_step_with_its_rounds_bandwidth(tiny):
    """The memory's speed is measured in every round; a step is compared with its own round's."""
    bandwidths: list[float] = []
    samples = time_steps(tiny, ["AdamW", "SMMF"], repeats=3, warmup=0, bandwidths=bandwidths)
    assert len(bandwidths) == 3 and all(b > 0 for b in bandwidths)
    assert all(len(times) == 3 for times in samples.values())
    # the memory runs at 10 then 5 bytes/s, and the step of 10 bytes takes 1 then 2 s: at its limit in both
    rows = _summary({"AdamW": [1.0, 2.0]}, {"AdamW": 10.0}, 10, [10.0, 5.0])
    assert rows["AdamW"]["fraction_of_limit"] == pytest.approx(1.0)
    assert rows["AdamW"]["limit_ms"] == pytest.approx(1e3 * 10 / 7.5)


def test_step_rounds_pools_rounds_by_their_bandwidth(tmp_path):
    """tools/step_rounds.py: each round's ratio lands in the band of that round's bandwidth."""
    from tools.step_rounds import by_band, rounds

    def run(bandwidths, adamw, smmf):
        rows = {"AdamW": {"samples_ms": adamw}, "SMMF": {"samples_ms": smmf}}
        return {"benchmarks": {"step": {"models": {"gpt2": {"bandwidth_gb_per_s": bandwidths, "optimizers": rows}}}}}

    files = [tmp_path / "a.json", tmp_path / "b.json"]
    files[0].write_text(json.dumps(run([50.0, 100.0], [60.0, 40.0], [42.0, 40.0])))
    files[1].write_text(json.dumps(run([55.0], [50.0], [35.0])))
    pooled = rounds(files, "gpt2")
    assert [b for b, _ in pooled] == [50.0, 100.0, 55.0]
    header, slow, fast = by_band(pooled, [90.0])
    assert slow.split()[:4] == ["<", "90", "2", "55.0"] and slow.endswith("0.70x")  # 42/60 and 35/50
    assert fast.split()[:4] == [">=", "90", "1", "40.0"] and fast.endswith("1.00x")
    # --pair: a file of one-step rounds joins each round with the next (an odd last round left out);
    # a file whose rounds already take two steps is left as it is
    paired = rounds(files, "gpt2", pair=True)
    assert paired == [(75.0, {"AdamW": 50.0, "SMMF": 41.0})]
    two_step_rounds = run([55.0], [50.0], [35.0])
    two_step_rounds["benchmarks"]["step"]["steps_per_sample"] = 2
    files[1].write_text(json.dumps(two_step_rounds))
    assert rounds(files, "gpt2", pair=True)[1] == (55.0, {"AdamW": 50.0, "SMMF": 35.0})


def test_step_benchmark_times_half_precision_parameters(tiny):
    """`bench step --step-dtype bfloat16`: the parameters and gradients every optimizer steps are bf16."""
    results = step_benchmark([tiny], ["AdamW", "SMMF", "Alada"], repeats=1, warmup=1, dtype=torch.bfloat16)
    assert results["dtype"] == "bfloat16"
    assert "bfloat16 parameters" in format_step(results)
    assert all(r["min_ms"] > 0 for r in results["models"]["tiny"]["optimizers"].values())


def test_step_benchmark_rejects_optimizers_that_change_gradients(tiny, monkeypatch):
    class GradScaling(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad.mul_(2.0)

    monkeypatch.setitem(OPTIMIZERS, "GradScaling", OptimizerSpec("GradScaling", lambda p: GradScaling(p, lr=0.1), "test"))
    with pytest.raises(RuntimeError, match="changed the shared gradients"):
        time_steps(tiny, ["AdamW", "GradScaling"], repeats=1, warmup=0)


def test_cli_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in list(benchmarks()) + ["all"]:
        assert re.search(rf"^ +{name}\b", out, re.MULTILINE), name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nonsense"], "invalid choice: 'nonsense' (choose from 'memory', 'step'"),
        (["memory", "--models", "gpt2,gpt5"], "unknown model(s) gpt5"),
        (["step", "--optimizers", "Adam"], "unknown optimizer(s) ['Adam']"),
        (["step", "--repeats", "0"], "must be an integer >= 1, got '0'"),
        (["step", "--threads", "two"], "must be an integer >= 1, got 'two'"),
        (["all", "--warmup", "-1"], "must be an integer >= 0"),
    ],
)
def test_cli_bad_input_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sharded_2d_case_checks_its_mesh_before_starting_ranks():
    with pytest.raises(SystemExit, match="must be a multiple of --tp"):
        main(["sharded", "--world-sizes", "2", "--tp-ranks", "3", "--tp", "2"])


def test_all_runs_every_registered_benchmark_and_writes_json(tmp_path, monkeypatch, capsys):
    seen = []

    def plugged_in(options):
        seen.append((options.models, options.repeats))
        print("plugged-in benchmark ran")
        return {"verdicts": []}

    # the light benchmarks plus a plugged-in one (the multi-process ones take minutes)
    registry.load_builtin_benchmarks()
    light = {name: registry._REGISTRY[name] for name in ("memory", "step")}
    monkeypatch.setattr(registry, "_REGISTRY", {**light, "plugin": Benchmark("plugin", "a later benchmark", plugged_in)})
    path = tmp_path / "out" / "results.json"
    threads = torch.get_num_threads()
    argv = ["all", "--models", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(path)]
    assert main(argv) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert "=== memory" in out and "=== step" in out and "plugged-in benchmark ran" in out
    assert seen == [(["tiny"], 1)]
    document = json.loads(path.read_text())
    assert set(document["benchmarks"]) == {"memory", "step", "plugin"}
    assert document["environment"]["torch"] == torch.__version__
    assert document["environment"]["cpu_kernels_simd"] in ("avx512", "avx2", "scalar") and document["environment"]["processor"]
    memory = document["benchmarks"]["memory"]["models"]["tiny"]["optimizers"]
    assert list(memory) == list(DEFAULT_OPTIMIZERS)


@pytest.mark.parametrize("timing, status", [(False, 1), (True, 0)])
def test_exit_status_reports_failed_exact_checks_only(timing, status, monkeypatch, capsys):
    verdict = {"check": "a check", "measured": 2.0, "limit": 1.0, "ok": False, "timing": timing}
    plugin = Benchmark("plugin", "a benchmark with a failing check", lambda options: {"verdicts": [verdict]})
    monkeypatch.setitem(registry._REGISTRY, "plugin", plugin)
    assert main(["plugin"]) == status
    assert "a check" in capsys.readouterr().err


def test_registry_refuses_duplicates_and_the_reserved_name():
    def run(options):
        return {}

    with pytest.raises(ValueError, match="already registered"):
        registry.register(Benchmark("memory", "another memory benchmark", run))
    with pytest.raises(ValueError, match="reserved"):
        registry.register(Benchmark("all", "x", run))


def test_module_entry_point_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "dist_memopt.bench", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "memory" in done.stdout and "step" in done.stdout


def test_interleaved_steps_step_every_optimizer_its_sample_per_round(tmp_path):
    """`bench sharded`'s timing on a one-rank gloo group: each optimizer takes STEPS_PER_SAMPLE
    consecutive steps per round (a reduction left in flight included), and the ratios are taken
    within rounds."""
    import torch.distributed as dist

    import dist_memopt as dm
    from dist_memopt.bench.ranks import interleaved_steps

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        weights = {name: torch.nn.Parameter(torch.randn(12, 10)) for name in ("AdamW", "SMMF")}
        optimizers = {"AdamW": torch.optim.AdamW([weights["AdamW"]]), "SMMF": dm.SMMF([weights["SMMF"]])}
        steps = {name: 0 for name in optimizers}
        for name, optimizer in optimizers.items():
            weights[name].grad = torch.randn(12, 10)
            optimizer.register_step_post_hook(lambda *_, name=name: steps.__setitem__(name, steps[name] + 1))
        timing = interleaved_steps(optimizers, repeats=3)
    finally:
        dist.destroy_process_group()
    assert steps == {"AdamW": 3 * STEPS_PER_SAMPLE, "SMMF": 3 * STEPS_PER_SAMPLE}
    assert timing["AdamW"]["vs_baseline"] == 1.0
    assert all(t["step_seconds"] > 0 and t["vs_baseline"] > 0 for t in timing.values())


@pytest.mark.parametrize("offload", [False, True])
def test_deepspeed_baseline_is_what_a_user_gets(offload):
    """Without offload DeepSpeed's torch_adam path with fused=True (AdamW(fused=True)); with
    ZeRO-Offload plain "AdamW", for which DeepSpeed builds DeepSpeedCPUAdam."""
    from dist_memopt.bench.deepspeed_bench import _config

    adamw, smmf = _config(3, "AdamW", offload), _config(3, "SMMF", offload)
    assert ("offload_optimizer" in adamw["zero_optimization"]) == offload == ("offload_optimizer" in smmf["zero_optimization"])
    params = adamw["optimizer"]["params"]
    assert adamw["optimizer"]["type"] == "AdamW" and params.get("torch_adam", False) == params.get("fused", False) == (not offload)
    assert smmf["optimizer"]["type"] == "SMMF"


def test_deepspeed_shm_buffers_of_a_run_are_removed_and_no_others(tmp_path):
    """DeepSpeed's CPU all_reduce leaves a 66 MiB buffer per rank in /dev/shm; the DeepSpeed bench and
    the test harness remove those of their own runs (by port, or by creation time) and no others."""
    import time

    from dist_memopt.train.distributed import remove_deepspeed_shm_buffers

    uid = os.getuid()
    ours = [tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_4242_{rank}" for rank in (0, 1)]
    other_port = tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_4243_0"
    other_kind = tmp_path / "mpich_shm_1_0"
    for path in ours + [other_port, other_kind]:
        path.write_bytes(b"x")
    removed = remove_deepspeed_shm_buffers(port=4242, directory=str(tmp_path))
    assert sorted(removed) == sorted(map(str, ours))
    assert other_port.exists() and other_kind.exists()
    assert remove_deepspeed_shm_buffers(since=time.time() + 60, directory=str(tmp_path)) == []
    assert remove_deepspeed_shm_buffers(since=0, directory=str(tmp_path)) == [str(other_port)]
    assert other_kind.exists()
