"""torchtitan 0.3.0: our OptimizersContainer builds groups as torchtitan does, refuses what it would
ignore, and its DCP checkpoint flow (warm-up step, save, load, continue) is exact under FSDP2."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchtitan")

import dist_memopt as dm  # noqa: E402
from dist_memopt.integrations import torchtitan as tt  # noqa: E402
from harness import run_distributed  # noqa: E402

STEPS, SAVE_AT = 6, 3
TOLERANCE = 1e-6


def tiny_llama3() -> torch.nn.Module:
    """torchtitan's own Llama 3 (its debug model shrunk): real parameter names and shapes."""
    from torchtitan.models import llama3 as L

    dim, heads, vocab = 32, 4, 64
    torch.manual_seed(0)
    return L.Llama3Model.Config(
        dim=dim, vocab_size=vocab,
        tok_embeddings=L.Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=L._EMBEDDING_INIT),
        norm=L.RMSNorm.Config(normalized_shape=dim, param_init=L._NORM_INIT),
        lm_head=L.Linear.Config(in_features=dim, out_features=vocab, param_init=L._output_linear_init(dim)),
        layers=L._build_llama3_layers(
            fuse_qkv=True, n_layers=2, dim=dim, n_heads=heads, hidden_dim=L.compute_ffn_hidden_dim(dim, multiple_of=16),
            rope=L.ComplexRoPE.Config(dim=dim // heads, max_seq_len=64, theta=500000, scaling="llama"), attn_backend="flex",
        ),
    ).build()


def _group(name: str, pattern: str = r".*", **kwargs) -> tt.ParamGroupConfig:
    return tt.ParamGroupConfig(pattern=pattern, optimizer_name=name, optimizer_kwargs={"lr": 1e-3, **kwargs})


def test_container_resolves_our_names_next_to_torchtitans():
    model = tiny_llama3()
    config = tt.OptimizersContainer.Config(
        param_groups=[_group("AdamW", r"^tok_embeddings\.", betas=(0.9, 0.95), weight_decay=0.1, fused=False),
                      _group("Alada", r"norm", weight_decay=0.0), _group("SMMF", beta=0.9, weight_decay=0.1)])
    container = config.build(model_parts=[model])
    adamw, alada, smmf = container.optimizers
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["foreach"] is True
    assert isinstance(alada, dm.Alada) and isinstance(smmf, dm.SMMF)
    names = alada.param_groups[0]["param_names"]
    assert names and all("norm" in n for n in names) and alada.param_groups[0]["foreach"] is None
    assert smmf.param_groups[0]["param_names"][:2] == ["layers.0.attention.qkv_linear.wqkv.weight", "layers.0.attention.wo.weight"]
    assert smmf.param_groups[0]["lr"] == 1e-3 and "lm_head.weight" in smmf.param_groups[0]["param_names"]
    loop = tt.OptimizersContainer.Config(implementation="for-loop", param_groups=[_group("SMMF")]).build(model_parts=[model])
    assert loop.optimizers[0].param_groups[0]["foreach"] is False and "fused" not in loop.optimizers[0].param_groups[0]


def test_default_configs_do_not_decay_norms():
    model = tiny_llama3()
    for config, cls in ((tt.default_smmf(lr=1e-3), dm.SMMF), (tt.default_alada(lr=1e-3), dm.Alada)):
        (optimizer,) = config.build(model_parts=[model]).optimizers
        assert isinstance(optimizer, cls)
        rest, decayed = optimizer.param_groups
        assert rest["weight_decay"] == 0.0 and all("norm" in n for n in rest["param_names"])
        assert decayed["weight_decay"] == 0.1 and not any("norm" in n for n in decayed["param_names"])
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.9) and optimizer.param_groups[0]["eps"] == 1e-16


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(implementation="fused", param_groups=[_group("SMMF")]), "no fused kernel.*implementation='foreach'"),
        (dict(param_groups=[_group("SMMF", fused=True)]), "no fused kernel"),
        (dict(param_groups=[_group("SMMF", betas=(0.9, 0.95))]), "\\['betas'\\] would be ignored \\(SMMF has one beta"),
        (dict(param_groups=[_group("Alada", weight_decya=0.1)]), "\\['weight_decya'\\] would be ignored; Alada accepts lr, betas"),
        (dict(param_groups=[_group("Alada", momentum_in_grad=True)]), "momentum_in_grad=True cannot work under torchtitan"),
        (dict(param_groups=[_group("SMMF")], optimizer_factory_kwargs_by_name={"SMMF": {"beta": 0.9}}), "takes no factory arguments"),
        (dict(param_groups=[_group("Lion")]), "Optimizer Lion not added: dist_memopt's container knows \\['Alada', 'SMMF'\\]"),
    ],
)
def test_kwargs_that_would_be_ignored_are_refused(config, message):
    with pytest.raises((ValueError, NotImplementedError), match=message):
        tt.OptimizersContainer.Config(**config).build(model_parts=[tiny_llama3()])


def test_alada_with_adamw_values_warns_and_other_versions_are_refused():
    with pytest.warns(UserWarning, match="Alada got torchtitan.s default_adamw .* Adam values \\(betas=\\(0.9, 0.95\\), eps=1e-08\\); its paper uses betas=\\(0.9, 0.9\\), eps=1e-16"):
        tt.OptimizersContainer.Config(param_groups=[_group("Alada", betas=(0.9, 0.95), eps=1e-8)]).build(model_parts=[tiny_llama3()])
    with pytest.raises(tt.UnsupportedVersion, match="supports torchtitan 0.3.0, found 0.2.1.*pip install torchtitan==0.3.0"):
        tt.check_torchtitan_version("0.2.1")
    assert tt.check_torchtitan_version() == "0.3.0"


# --- FSDP2 on 2 gloo ranks: torchtitan's CheckpointManager around our container ---------------

def _grads(model: torch.nn.Module, step: int) -> None:
    """The same full gradient on every rank for every parameter (sharded like the parameter)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    generator = torch.Generator().manual_seed(1000 + step)
    for _, p in sorted(model.named_parameters()):
        full = torch.randn(p.shape, generator=generator) * 1e-2
        p.grad = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full


def _build(sharded: bool):
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama3()
    if sharded:
        for layer in model.layers.values():
            fully_shard(layer)
        fully_shard(model)
    optimizers = tt.default_smmf(lr=1e-2, weight_decay=0.1).build(model_parts=[model])
    from torchtitan.components.optimizer import LRSchedulersContainer

    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.5).build(optimizers=optimizers, training_steps=STEPS)
    return model, optimizers, schedulers


def _train(model, optimizers, schedulers, steps) -> None:
    for step in steps:  # torchtitan's train_step: zero_grad, backward (here: given grads), clip, step, lr step
        optimizers.zero_grad()
        _grads(model, step)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizers.step()
        schedulers.step()


def _full(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def _checkpointer(folder: str, model, optimizers, schedulers):
    from torchtitan.components.checkpoint import CheckpointManager

    config = CheckpointManager.Config(enable=True, folder="checkpoint", interval=1, last_save_model_only=False, keep_latest_k=0)
    return config.build(dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers, states={},
                        sd_adapter=None, base_folder=folder)


def _resume_run(rank: int, world_size: int, folder: str) -> dict:
    model, optimizers, schedulers = _build(sharded=True)
    before = _full(model)
    optimizers.state_dict()  # torchtitan's warm-up: a zero-gradient, lr=0 step to create the state
    warmed = _full(model)
    model, optimizers, schedulers = _build(sharded=True)
    _train(model, optimizers, schedulers, range(SAVE_AT))
    checkpointer = _checkpointer(folder, model, optimizers, schedulers)
    checkpointer.save(curr_step=SAVE_AT)
    checkpointer.close()
    _train(model, optimizers, schedulers, range(SAVE_AT, STEPS))
    uninterrupted = _full(model)

    model, optimizers, schedulers = _build(sharded=True)  # a fresh job: build, load (warm-up inside), continue
    checkpointer = _checkpointer(folder, model, optimizers, schedulers)
    assert checkpointer.load(step=SAVE_AT)
    checkpointer.close()
    _train(model, optimizers, schedulers, range(SAVE_AT, STEPS))
    return dict(before=before, warmed=warmed, uninterrupted=uninterrupted, resumed=_full(model))


def test_fsdp2_checkpoint_resume_equals_uninterrupted_and_single_process(tmp_path):
    model, optimizers, schedulers = _build(sharded=False)
    _train(model, optimizers, schedulers, range(STEPS))
    single = _full(model)
    for result in run_distributed(_resume_run, 2, str(tmp_path), timeout=240):
        for name, expected in single.items():
            scale = max(1.0, expected.abs().max().item())
            assert torch.equal(result["warmed"][name], result["before"][name]), name  # lr=0 moves nothing
            assert torch.equal(result["resumed"][name], result["uninterrupted"][name]), name
            error = (result["uninterrupted"][name] - expected).abs().max().item()
            assert error <= TOLERANCE * scale, f"{name}: off by {error:.3g}"
            assert not torch.equal(expected, result["before"][name]), name  # it trained
