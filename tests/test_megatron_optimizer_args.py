"""How get_megatron_optimizer maps Megatron's OptimizerConfig onto SMMF and Alada, and what it rejects."""

import pytest

pytest.importorskip("megatron.core")
from megatron.core.optimizer import OptimizerConfig  # noqa: E402

from dist_memopt.integrations.megatron import get_megatron_optimizer, optimizer_arguments  # noqa: E402
from dist_memopt.integrations.megatron.factory import _requested  # noqa: E402


def test_smmf_takes_adams_names_from_the_config():
    config = OptimizerConfig(optimizer="smmf", lr=3e-4, weight_decay=0.1, adam_beta1=0.8, adam_eps=1e-7)
    assert optimizer_arguments(config) == dict(lr=3e-4, weight_decay=0.1, beta=0.8, eps=1e-7, weight_decay_mode="adamw")
    coupled = OptimizerConfig(optimizer="SMMF", lr=1e-3, decoupled_weight_decay=False)
    assert optimizer_arguments(coupled, decay_rate=-0.8, beta=None)["weight_decay_mode"] == "adam"
    assert optimizer_arguments(coupled, decay_rate=-0.8, beta=None)["beta"] is None  # keyword arguments win


def test_alada_takes_both_betas_and_keyword_overrides():
    config = OptimizerConfig(optimizer="alada", lr=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95)
    assert optimizer_arguments(config) == dict(lr=1e-3, weight_decay=0.0, eps=1e-8, betas=(0.9, 0.95))
    assert optimizer_arguments(config, betas=(0.9, 0.9), eps=1e-16)["eps"] == 1e-16


@pytest.mark.parametrize(
    "fields, kwargs, error, match",
    [
        (dict(optimizer="alada", lr=1e-3, decoupled_weight_decay=False), {}, ValueError, "decoupled"),
        (dict(optimizer="smmf"), {}, ValueError, "OptimizerConfig.lr is None"),
        (dict(optimizer="smmf", lr=1e-3), dict(betas=(0.9, 0.9)), TypeError, "SMMF does not take betas"),
        (dict(optimizer="alada", lr=1e-3), dict(momentum_in_grad=True), ValueError, "momentum_in_grad"),
    ],
)
def test_bad_arguments_are_named(fields, kwargs, error, match):
    with pytest.raises(error, match=match):
        optimizer_arguments(OptimizerConfig(**fields), **kwargs)


def test_keyword_arguments_are_refused_for_megatrons_own_optimizers():
    with pytest.raises(TypeError, match="for optimizer 'smmf' or 'alada', not 'adam'"):
        get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), [], beta=0.9)


def test_environment_names_the_optimizer_in_place_of_adam(monkeypatch):
    """Megatron-LM's parser knows only its own names: --optimizer adam plus DIST_MEMOPT_OPTIMIZER."""
    adam = OptimizerConfig(optimizer="adam", lr=1e-3)
    assert _requested(adam, {}) == ("adam", {})
    monkeypatch.setenv("DIST_MEMOPT_OPTIMIZER", "SMMF")
    monkeypatch.setenv("DIST_MEMOPT_OPTIMIZER_ARGS", '{"decay_rate": -0.8, "growth_rate": 0.99}')
    assert _requested(adam, {"growth_rate": 0.9}) == ("smmf", {"decay_rate": -0.8, "growth_rate": 0.9})
    monkeypatch.setenv("DIST_MEMOPT_OPTIMIZER", "alada")
    monkeypatch.setenv("DIST_MEMOPT_OPTIMIZER_ARGS", '{"betas": [0.9, 0.9]}')
    assert _requested(adam, {}) == ("alada", {"betas": (0.9, 0.9)})
    with pytest.raises(ValueError, match="replaces optimizer 'adam'.*not 'sgd'"):
        _requested(OptimizerConfig(optimizer="sgd", lr=1e-3), {})
    monkeypatch.setenv("DIST_MEMOPT_OPTIMIZER", "lion")
    with pytest.raises(ValueError, match="expected one of smmf, alada"):
        _requested(adam, {})
    monkeypatch.setenv("DIST_MEMOPT_OPTIMIZER", "smmf")
    monkeypatch.setenv("DIST_MEMOPT_OPTIMIZER_ARGS", "decay_rate=-0.8")
    with pytest.raises(ValueError, match="DIST_MEMOPT_OPTIMIZER_ARGS is not JSON"):
        _requested(adam, {})


@pytest.mark.parametrize("optimizer", ["smmf", "alada"])
def test_optimizer_cpu_offload_is_refused_before_anything_is_built(optimizer):
    """Megatron's HybridDeviceOptimizer builds torch Adam/SGD on the host, not a given class."""
    config = OptimizerConfig(optimizer=optimizer, lr=1e-3, optimizer_cpu_offload=True)
    with pytest.raises(ValueError, match=f"optimizer='{optimizer}': optimizer_cpu_offload .*Adam/SGD only"):
        get_megatron_optimizer(config, [])
