"""decay_param_groups: HF Trainer's decay rule, as param groups for our optimizers."""

import pytest
from torch import nn

import dist_memopt as dm

transformers = pytest.importorskip("transformers")


def _tiny(kind: str) -> nn.Module:
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=64, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_groups_are_hf_trainers(kind):
    model = _tiny(kind)
    groups = dm.decay_param_groups(model, 0.1, names=True)
    hf = set(transformers.Trainer.get_decay_parameter_names(None, model))
    by_id = {id(p): n for n, p in model.named_parameters()}  # tied weights: one name
    decayed, rest = groups
    assert decayed["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert {by_id[id(p)] for p in decayed["params"]} == {n for n in hf if n in by_id.values()}
    assert not {by_id[id(p)] for p in rest["params"]} & hf
    assert len({id(p) for g in groups for p in g["params"]}) == len(list(model.parameters()))
    assert any("norm" in n or "ln_" in n for n in rest["param_names"])
    optimizer = dm.SMMF(groups, lr=1e-3)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_norm_layers_by_type_and_frozen_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2, bias=False))
    model[0].bias.requires_grad_(False)
    decayed, rest = dm.decay_param_groups(model, 0.01)
    assert decayed["params"] == [model[0].weight, model[3].weight]
    assert rest["params"] == [model[1].weight, model[1].bias]
    (only,) = dm.decay_param_groups(nn.Linear(2, 2, bias=False), 0.1)  # empty groups are left out
    assert only["weight_decay"] == 0.1 and "param_names" not in only
