"""The quality study's machinery on seconds-sized runs: held-out split, cache, rerun, planning, rendering.

No test here checks the numbers themselves (they are what the study measures).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from dist_memopt.bench import quality, quality_train
from dist_memopt.bench.cli import main

#: a 0.02M-parameter model, 3 steps, one validation batch: a run takes about a second
_SMALL = [
    "--steps", "3", "--eval-every", "2", "--eval-batches", "1",
    "--set", "model.hidden_size=32", "--set", "model.ffn_hidden_size=64", "--set", "data.corpus_max_bytes=2000000",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_MEMOPT_CACHE", str(tmp_path / "cache"))


def _study(path, *extra: str) -> dict:
    assert main(["quality", *_SMALL, "--json", str(path), "--out", str(path.parent / "out"), *extra]) == 0
    return json.loads(path.read_text())["benchmarks"]["quality"]


def test_validation_documents_are_never_in_the_training_dataset(tmp_path):
    """Each corpus document lands in exactly one half, and each half's dataset holds exactly its documents."""
    from dist_memopt.train.data import TokenStream

    root, train, held = quality_train._corpus_files(2_000_000)
    assert held and train and not set(train) & set(held)
    train_prefix, valid_prefix = quality_train.split_corpus(2_000_000, str(tmp_path))
    for prefix, files in ((train_prefix, train), (valid_prefix, held)):
        stream = TokenStream(prefix)
        assert len(stream.dataset) == len(files)
        for doc, path in enumerate(files):
            assert np.array_equal(stream.dataset.get(doc)[:-1], np.frombuffer(path.read_bytes(), np.uint8))
    train_bytes = {p.read_bytes() for p in train}
    assert not any(p.read_bytes() in train_bytes for p in held)


def test_a_cached_cell_is_not_rerun_and_a_widened_study_runs_only_new_cells(tmp_path, monkeypatch):
    path = tmp_path / "q.json"
    first = _study(path, "--models", "gpt2", "--optimizers", "SMMF", "--lrs", "0.003", "--seeds", "0")
    ran = []
    real = quality.train_one
    monkeypatch.setattr(quality, "train_one", lambda settings, log=None: ran.append(settings) or real(settings, log))
    again = _study(path, "--models", "gpt2", "--optimizers", "SMMF", "--lrs", "0.003", "--seeds", "0")
    assert ran == [] and again["records"] == first["records"]
    wider = _study(path, "--models", "gpt2", "--optimizers", "SMMF", "--lrs", "0.003,0.01", "--seeds", "0")
    assert [s.lr for s in ran] == [0.01] and len(wider["records"]) == 2


def test_a_one_cell_rerun_reproduces_its_recorded_val_loss(tmp_path):
    """A study's record and the same cell run alone into another file: the same held-out loss, bit for bit."""
    study = _study(tmp_path / "study.json", "--models", "t5", "--optimizers", "Alada,AdamW", "--lrs", "0.01", "--seeds", "0")
    alone = _study(tmp_path / "alone.json", "--models", "t5", "--optimizers", "Alada", "--lrs", "0.01", "--seeds", "0")
    recorded = next(r for r in study["records"] if r["optimizer"] == "Alada")
    (record,) = alone["records"]
    assert record["key"] == recorded["key"] and record["threads"] == recorded["threads"] == 1
    assert record["val_loss"] == recorded["val_loss"] and math.isfinite(record["val_loss"])
    assert {"model", "optimizer", "lr", "seed", "steps", "val_loss", "val_curve", "state_bytes_per_rank", "wall_seconds"} <= set(record)
    assert [step for step, _ in record["val_curve"]] == [0, 2, 3]
    assert {"date", "machine", "commands"} <= set(alone) and alone["commands"][0] == record["command"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.models, args.optimizers = ["gpt2"], ["AdamW", "Alada", "CAME"]
    return args


def _finish(records: dict, cells, losses: dict[float, float]) -> None:
    for _, settings in cells:
        records[quality.cell_key(settings)] = {"lr": settings.lr, "val_loss": losses.get(settings.lr, 5.0)}


def test_the_plan_sweeps_then_follows_best_rates_then_seeds():
    """Sweeps first; CAME and the extra Alada beta2 at their leader's best lr; a grid whose best rate
    is at its top edge grows by one rate; the second seed runs at the best rate only."""
    args, records = _args("--alada-beta2", "0.9,0.99", "--seeds", "0,1"), {}
    cells = list(quality.study_cells(args, records))
    assert sorted({(label, s.lr) for label, s in cells}) == [(o, lr) for o in ("AdamW", "Alada") for lr in quality._GRID]
    _finish(records, cells, {0.01: 3.0})  # best at the top edge: 3e-2 comes next
    cells = [c for c in quality.study_cells(args, records) if quality.cell_key(c[1]) not in records]
    assert sorted((label, s.lr) for label, s in cells) == [("AdamW", 0.03), ("Alada", 0.03)]
    _finish(records, cells, {0.03: 4.0})
    cells = [c for c in quality.study_cells(args, records) if quality.cell_key(c[1]) not in records]
    assert sorted((label, s.lr, s.seed) for label, s in cells) == [
        ("AdamW", 0.01, 1), ("Alada", 0.01, 1), ("Alada b2=0.99", 0.01, 0), ("CAME", 0.01, 0)
    ]
    assert dict(next(s for label, s in cells if label == "Alada b2=0.99").params)["betas"] == [0.9, 0.99]


def test_the_budget_starts_no_run_that_would_not_fit(tmp_path, monkeypatch):
    path = tmp_path / "q.json"
    _study(path, "--models", "gpt2", "--optimizers", "SMMF", "--lrs", "0.003", "--seeds", "0")
    monkeypatch.setattr(quality, "train_one", lambda settings, log=None: pytest.fail("over budget"))
    study = _study(path, "--models", "gpt2", "--optimizers", "SMMF", "--lrs", "0.003,0.01", "--seeds", "0", "--budget-minutes", "0")
    assert study["not_run_for_budget"] == 1 and len(study["records"]) == 1


def _record(model: str, optimizer: str, lr: float, seed: int, loss: float) -> dict:
    curve = [[0, 5.5], [50, loss + 0.5], [100, loss]]
    return {"key": f"{model}{optimizer}{lr}{seed}", "model": model, "optimizer": optimizer, "lr": lr, "seed": seed,
            "steps": 100, "val_loss": loss, "val_ppl": math.exp(loss), "val_curve": curve, "state_bytes_per_rank": 2**20, "wall_seconds": 1.0}


def test_table_and_plots_render_from_a_results_file(tmp_path):
    records = [_record(m, "AdamW", lr, 0, 3.0 + lr) for m in ("gpt2", "t5") for lr in (0.001, 0.01)]
    records += [_record(m, "SMMF", lr, s, 3.1 + s / 100) for m in ("gpt2", "t5") for lr in (0.001,) for s in (0, 1)]
    records.append(_record("gpt2", "SM3", 0.1, 0, float("nan")))  # a diverged run
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"benchmarks": {"quality": {"date": "d", "machine": {}, "commands": ["c"], "records": records}}}))
    assert main(["quality", "--render", str(path), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "quality.md").read_text()
    assert text.count("| gpt2 |") == 3 and text.count("| t5 |") == 2 and "| 2 |" in text
    assert all((tmp_path / "out" / name).stat().st_size > 1000 for name in ("quality_curves.png", "quality_lr.png"))


def test_an_optimizer_params_override_reaches_the_optimizer_and_names_the_runs():
    args = _args("--lrs", "0.001", "--seeds", "0", "--set", "optimizer.params.eps=1e-8")
    args.optimizers = ["Alada"]
    ((label, settings),) = quality.study_cells(args, {})
    config = settings.config()
    assert label == "Alada eps=1e-8"
    assert config.optimizer.params["eps"] == 1e-8 and list(config.optimizer.params["betas"]) == [0.9, 0.9]


def test_dense_alada_is_algorithm_2_where_the_rank_one_fit_is_exact():
    """Gradients with one value per step keep M̃² a multiple of p qᵀ: the dense diagnostic then steps
    like the paper's factored Algorithm 2 (tests/reference.py)."""
    import torch
    from reference import AladaReference

    from dist_memopt.bench.quality_probe import DenseAlada

    weight = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    reference = AladaReference(weight, lr=1e-2, weight_decay=0.1)
    dense = DenseAlada([weight], lr=1e-2, weight_decay=0.1)
    for value in (0.5, -2.0, 0.1, 1.5, -0.3):
        weight.grad = torch.full((6, 4), value, dtype=torch.float64)
        reference.step(weight.grad)
        dense.step()
        torch.testing.assert_close(weight.detach(), reference.w)
