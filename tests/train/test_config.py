"""Configs: Table 18 values, composition, overrides, and errors raised before any process group."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from paths import MEGATRON_CONFIGS, REPO, TINY_CONFIGS
from dist_memopt.train.config import ConfigError, config_to_dict, load_config, to_yaml
from dist_memopt.train import pretrain

MEGATRON = MEGATRON_CONFIGS
TINY = TINY_CONFIGS

# Table 18 of the SMMF paper: scheduler, iterations, micro-batch, global batch, warmup, lr, weight decay.
TABLE_18 = {
    "bert": ("linear", 1_000_000, 4, 32, 10_000, 1e-4, 0.01),
    "gpt2": ("cosine", 500_000, 4, 64, 5_000, 1.5e-4, 0.01),
    "t5": ("linear", 1_000_000, 16, 128, 10_000, 1e-4, 0.01),
}
SMMF_TABLE_18 = {"beta": 0.9, "decay_rate": -0.5, "growth_rate": 0.999, "eps": 1e-8}
# BERT-base, GPT-2 124M, T5-base: layers, hidden, heads, ffn, sequence length, vocabulary.
MODEL_SIZES = {
    "bert": (12, 768, 12, 3072, 512, 30522),
    "gpt2": (12, 768, 12, 3072, 1024, 50257),
    "t5": (12, 768, 12, 3072, 512, 32128),
}


@pytest.mark.parametrize("model", sorted(TABLE_18))
def test_megatron_configs_reproduce_table_18(model):
    config = load_config(MEGATRON / f"{model}.yaml")
    t = config.train
    assert (t.lr_decay_style, t.train_iters, t.micro_batch_size, t.global_batch_size, t.lr_warmup_iters, t.lr, t.weight_decay) == TABLE_18[model]
    assert config.optimizer.type == "SMMF"
    assert config.optimizer.params == SMMF_TABLE_18
    m = config.model
    assert (m.type, m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.seq_length, m.vocab_size) == (model, *MODEL_SIZES[model])
    if model == "t5":
        assert (m.encoder_num_layers, m.decoder_num_layers, m.decoder_seq_length, m.vocab_extra_ids) == (12, 12, 128, 100)


def test_megatron_models_have_the_papers_sizes():
    """megatron-core builds BERT-base (110M), GPT-2 (124M) and T5-base (224M with tied embeddings)."""
    import torch

    from dist_memopt.train.distributed import free_port
    from dist_memopt.train.models import build_model, init_megatron
    from megatron.core import parallel_state

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)  # Megatron's parallel state needs one
    try:
        init_megatron(0)
        millions = {}
        for model in ("bert", "gpt2", "t5"):
            with torch.device("meta"):  # shapes only: no memory, no initialization cost
                built = build_model(load_config(MEGATRON / f"{model}.yaml"))
            millions[model] = round(sum(p.numel() for p in built.parameters()) / 1e6)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    assert millions == {"bert": 110, "gpt2": 124, "t5": 224}


@pytest.mark.parametrize("model", sorted(TABLE_18))
@pytest.mark.parametrize("variant, optimizer", [("alada", "Alada"), ("adamw", "AdamW")])
def test_variants_differ_only_in_the_optimizer(model, variant, optimizer):
    base = config_to_dict(load_config(MEGATRON / f"{model}.yaml"))
    other = config_to_dict(load_config(MEGATRON / f"{model}-{variant}.yaml"))
    assert other["optimizer"]["type"] == optimizer
    assert "decay_rate" not in other["optimizer"]["params"]  # SMMF's arguments are not inherited
    base.pop("optimizer"), other.pop("optimizer")
    assert base == other
    text = (MEGATRON / f"{model}-{variant}.yaml").read_text()
    assert "base:" in text and "model:" not in text and "train:" not in text  # composed, not copied


@pytest.mark.parametrize("model", sorted(TABLE_18))
def test_tiny_configs_are_the_same_models_shrunk(model):
    tiny, full = load_config(TINY / f"{model}.yaml"), load_config(MEGATRON / f"{model}.yaml")
    assert tiny.model.type == full.model.type and tiny.optimizer == full.optimizer
    assert tiny.train.lr_decay_style == full.train.lr_decay_style
    assert tiny.model.hidden_size < full.model.hidden_size and tiny.train.train_iters == 100
    assert tiny.parallel.nproc == 2


def test_overrides_are_typed_from_the_schema():
    config = load_config(TINY / "gpt2.yaml", ["train.lr=3e-4", "train.train_iters=1e3", "parallel.backend=deepspeed", "model.vocab_size=null"])
    assert config.train.lr == 3e-4 and isinstance(config.train.lr, float)
    assert config.train.train_iters == 1000 and isinstance(config.train.train_iters, int)
    assert config.parallel.backend == "deepspeed" and config.model.vocab_size is None
    alada = load_config(TINY / "gpt2.yaml", ["optimizer.type=Alada"])
    assert alada.optimizer.params == {"betas": [0.9, 0.9], "eps": 1e-16}  # SMMF's params dropped, Alada's defaults
    tuned = load_config(TINY / "gpt2.yaml", ["optimizer.params.beta=0.95"])
    assert tuned.optimizer.params["beta"] == 0.95 and tuned.optimizer.params["decay_rate"] == -0.5


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(TINY / "t5.yaml", ["train.seed=7"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(config))
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1e-3"], r"train: unknown key 'lrr'"),
        (["train.train_iters=many"], r"train.train_iters: expected int, got str 'many'"),
        (["train.lr=[1, 2]"], r"train.lr: expected float, got list"),
        (["train.clip_grad=true"], r"train.clip_grad: expected float, got bool"),
        (["train.lr"], r"expected KEY=VALUE"),
        (["lr=1e-3"], r"KEY must be section.name"),
        (["nosuch.key=1"], r"unknown key 'nosuch'"),
        (["train.lr_decay_style=exponential"], r"'exponential' is not one of constant, linear, cosine"),
        (["optimizer.params.betas=[0.9, 0.99]"], r"'betas' not accepted by SMMF"),
        (["optimizer.params.decay_rate=0.5"], r"optimizer.params for SMMF: Invalid decay_rate"),
        (["optimizer.params.lr=1.0"], r"set train.lr instead"),
        (["parallel.backend=megatron", "optimizer.type=CAME"], r"parallel.backend megatron builds Megatron's optimizers"),
        (["train.global_batch_size=6"], r"not a multiple of train.micro_batch_size"),
        (["model.decoder_seq_length=64"], r"only for model.type t5"),
        (["parallel.tensor_model_parallel_size=2"], r"for parallel.backend megatron only \(this is fsdp2\)"),
        (["parallel.backend=megatron", "parallel.tensor_model_parallel_size=3"], r"model.num_attention_heads \(4\) is not divisible by parallel.tensor_model_parallel_size \(3\)"),
        (["parallel.backend=megatron", "parallel.sequence_parallel=true"], r"parallel.sequence_parallel: needs parallel.tensor_model_parallel_size > 1"),
        (["parallel.pipeline_model_parallel_size=2"], r"for parallel.backend megatron only \(this is fsdp2\)"),
        (["parallel.backend=megatron", "parallel.pipeline_model_parallel_size=3"], r"model.num_layers \(2\) is not divisible by parallel.pipeline_model_parallel_size \(3\)"),
        (["parallel.backend=megatron", "parallel.pipeline_model_parallel_size=0"], r"parallel.pipeline_model_parallel_size: must be > 0"),
        (["parallel.backend=megatron", "parallel.tensor_model_parallel_size=0"], r"parallel.tensor_model_parallel_size: must be > 0"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY / "gpt2.yaml", overrides)


def test_unknown_key_in_a_file_and_broken_base(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {TINY / 'gpt2.yaml'}\nmodel:\n  hiden_size: 32\n")
    with pytest.raises(ConfigError, match=r"model: unknown key 'hiden_size'"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="chain loops"):
        load_config(loop)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_pretrain_rejects_bad_config_before_any_process_group(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = pretrain.main(["--config", str(TINY / "gpt2.yaml"), "--set", "train.lr=fast", "--set", f"log.run_dir={run_dir}"])
    assert code == 2
    assert "config error: train.lr: expected float, got str 'fast'" in capsys.readouterr().err
    assert not dist.is_initialized() and not run_dir.exists()


def test_torchrun_fails_fast_on_a_bad_override(tmp_path):
    """Two ranks under torchrun stop at validation: exit code 2, no run directory, no hang.

    Both ranks validate, but torchrun stops the other rank as soon as the first one exits, so
    under load the second may be gone before it prints: at least one message is required."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = subprocess.run(
        [torchrun, "--nproc_per_node=2", "-m", "launch.pretrain", "--config", str(TINY / "bert.yaml"),
         "--set", "model.nheads=4", "--set", f"log.run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode != 0
    assert 1 <= result.stderr.count("config error: model: unknown key 'nheads'") <= 2
    assert not (tmp_path / "run").exists()


def test_print_config_prints_yaml_and_exits(capsys):
    assert pretrain.main(["--config", str(TINY / "bert.yaml"), "--print-config", "--set", "train.seed=5"]) == 0
    out = capsys.readouterr().out
    assert "seed: 5" in out and "type: bert" in out and not dist.is_initialized()
    assert pretrain.main(["--config", str(TINY / "gpt2-tp2.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "tensor_model_parallel_size: 2" in out and "pipeline_model_parallel_size: 1" in out and "sequence_parallel: true" in out


def test_tensor_parallel_layout_is_checked_against_the_process_count(capsys):
    """Before any process starts: the world must hold the layout; DP size = world / TP."""
    from dist_memopt.train import run

    config = load_config(TINY / "gpt2-tp2.yaml")
    assert config.data_parallel_size(2) == 1 and config.num_microbatches(2) == 2  # 8 = 2 x 4 x DP 1
    assert run.main(["--config", str(TINY / "gpt2-tp2.yaml"), "--set", "parallel.nproc=3", "--dry-run"]) == 2
    assert "3 process(es) do not hold tensor x pipeline parallel size (2 x 1)" in capsys.readouterr().err
    assert run.main(["--config", str(TINY / "gpt2-tp2.yaml"), "--set", "parallel.nproc=4", "--dry-run"]) == 0


def test_pipeline_layout_is_checked_before_any_process_starts(capsys):
    """PP for the megatron backend's GPT-2: the world must hold tp x pp, every stage the same number
    of layers; --print-config shows it. No process starts for any of these."""
    from dist_memopt.train import run

    config = load_config(TINY / "gpt2-pp2.yaml")
    assert config.parallel.pipeline_model_parallel_size == 2 and config.parallel.backend == "megatron"
    assert config.data_parallel_size(2) == 1 and config.num_microbatches(2) == 2  # 8 = 2 x 4 x DP 1
    assert pretrain.main(["--config", str(TINY / "gpt2-pp2.yaml"), "--print-config"]) == 0
    assert "pipeline_model_parallel_size: 2" in capsys.readouterr().out and not dist.is_initialized()
    pp2 = ["--config", str(TINY / "gpt2-pp2.yaml"), "--dry-run"]
    assert run.main([*pp2, "--set", "parallel.nproc=3"]) == 2
    assert "3 process(es) do not hold tensor x pipeline parallel size (1 x 2)" in capsys.readouterr().err
    assert run.main([*pp2, "--set", "parallel.tensor_model_parallel_size=2"]) == 2  # 2 x 2 on 2 processes
    assert "2 process(es) do not hold tensor x pipeline parallel size (2 x 2)" in capsys.readouterr().err
    assert run.main([*pp2, "--set", "parallel.tensor_model_parallel_size=2", "parallel.nproc=4"]) == 0
    assert run.main([*pp2, "--set", "model.num_layers=3"]) == 2
    assert "model.num_layers (3) is not divisible by parallel.pipeline_model_parallel_size (2)" in capsys.readouterr().err
    for model in ("bert", "t5"):
        with pytest.raises(ConfigError, match=rf"pipeline stages for model.type gpt2 only \(this is {model}"):
            load_config(TINY / f"{model}.yaml", ["parallel.backend=megatron", "parallel.pipeline_model_parallel_size=2"])


def test_one_set_flag_takes_several_overrides(capsys):
    argv = ["--config", str(TINY / "bert.yaml"), "--print-config", "--set", "train.seed=5", "train.lr=3e-4", "--set=log.log_interval=7"]
    assert pretrain.main(argv) == 0
    out = capsys.readouterr().out
    assert "seed: 5" in out and "lr: 0.0003" in out and "log_interval: 7" in out
    from dist_memopt.train import run

    assert run.main(["--config", str(TINY / "gpt2.yaml"), "--set", "parallel.launcher=mpirun", "parallel.nproc=1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mpirun -n 1" in out and "--set=parallel.launcher=mpirun --set=parallel.nproc=1" in out


def test_progress_bar_only_on_a_terminal(tmp_path):
    from dist_memopt.train.report import show_progress

    leader, follower = os.openpty()
    with open(follower, "w") as terminal, open(tmp_path / "run.log", "w") as log:
        assert show_progress(True, terminal) and not show_progress(False, terminal)
        assert not show_progress(True, log)
    os.close(leader)


def test_run_wrapper_builds_each_launchers_command(capsys):
    from dist_memopt.train import run

    args = ["--config", "c.yaml", "--set=train.lr=1e-3"]
    torchrun = run.launch_command("torchrun", 2, args, port=1234)
    assert torchrun[0].endswith("torchrun") and torchrun[1:5] == ["--nproc_per_node=2", "--master_port=1234", "-m", "dist_memopt.train.pretrain"]
    deepspeed = run.launch_command("deepspeed", 2, args, port=1234)
    assert deepspeed[0].endswith("deepspeed") and "--num_gpus=2" in deepspeed and "--module" in deepspeed
    mpirun = run.launch_command("mpirun", 3, args)
    assert mpirun[0].endswith("mpirun") and mpirun[1:] == ["-n", "3", sys.executable, "-m", "dist_memopt.train.pretrain", *args]
    assert run.main(["--config", str(TINY / "gpt2.yaml"), "--set", "parallel.launcher=mpirun", "--dry-run"]) == 0
    assert "mpirun -n 2" in capsys.readouterr().out
    assert run.main(["--config", str(TINY / "gpt2.yaml"), "--set", "parallel.nproc=3", "--dry-run"]) == 2  # 8 % (4 x 3)
