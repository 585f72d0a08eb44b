"""Configs: Table 18 values, composition, overrides, and errors raised before any process group."""

import pytest

from paths import MEGATRON_CONFIGS, TINY_CONFIGS
from dist_memopt.train.config import ConfigError, config_to_dict, load_config, to_yaml

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
        (["parallel.backend=megatron"], r"not available in this build"),
        (["train.global_batch_size=6"], r"not a multiple of train.micro_batch_size"),
        (["model.decoder_seq_length=64"], r"only for model.type t5"),
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
