"""Optimizers by name: ours (SMMF, Alada) and the SMMF paper's baselines, with Table 18's settings.

``optimizer.params`` in a config holds constructor arguments; anything not given takes the value
the SMMF paper's Table 18 lists for that optimizer (BERT/GPT-2/T5 pre-training), or for Alada its
paper's recommendation. ``lr`` and ``weight_decay`` always come from ``train``.

Baselines and what Table 18's rows map to:
- AdamW (torch): β1 0.9, β2 0.999, ε 1e-8.
- Adafactor (torch.optim.Adafactor): γ (beta2_decay) −0.8, d 1, ε (None, 1e-3). Torch's Adafactor
  has no first moment, so Table 18's β1 = 0.9 has no counterpart; ε1 = 1e-30 is its ``None`` default.
- CAME (came-pytorch): betas (0.9, 0.999, 0.9999), ε (1e-30, 1e-16), clip threshold 1.
- SM3 (pytorch-optimizer): momentum 0.9, β 0.999, ε 1e-30.
- SMMF (ours): beta 0.9, decay_rate −0.5, growth_rate 0.999, ε 1e-8.
- Alada (ours, not in Table 18): betas (0.9, 0.9), ε 1e-16 (the Alada paper's recommendation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from dist_memopt.optim.arguments import as_call_arguments, constructor_arguments

__all__ = ["OPTIMIZERS", "resolve_params", "build_optimizer", "param_groups"]


def _smmf() -> type:
    from dist_memopt import SMMF

    return SMMF


def _alada() -> type:
    from dist_memopt import Alada

    return Alada


def _came() -> type:
    from came_pytorch import CAME

    return CAME


def _sm3() -> type:
    from pytorch_optimizer import SM3

    return SM3


@dataclass(frozen=True)
class OptimizerSpec:
    load: Callable[[], type]  # imported lazily: baselines are optional extras
    paper_params: dict


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "SMMF": OptimizerSpec(_smmf, dict(beta=0.9, eps=1e-8, decay_rate=-0.5, growth_rate=0.999)),
    "Alada": OptimizerSpec(_alada, dict(betas=[0.9, 0.9], eps=1e-16)),
    "AdamW": OptimizerSpec(lambda: torch.optim.AdamW, dict(betas=[0.9, 0.999], eps=1e-8)),
    "Adafactor": OptimizerSpec(lambda: torch.optim.Adafactor, dict(beta2_decay=-0.8, d=1.0, eps=[None, 1e-3])),
    "CAME": OptimizerSpec(_came, dict(betas=[0.9, 0.999, 0.9999], eps=[1e-30, 1e-16], clip_threshold=1.0)),
    "SM3": OptimizerSpec(_sm3, dict(momentum=0.9, beta=0.999, eps=1e-30)),
}

_FROM_TRAIN = ("lr", "weight_decay")


def resolve_params(name: str, params: dict, lr: float) -> dict:
    """Table 18 defaults overlaid with ``params``; checked by building the optimizer on a dummy tensor.

    Raises ConfigError for unknown or invalid constructor arguments (naming them).
    """
    from dist_memopt.train.errors import ConfigError

    spec = OPTIMIZERS[name]
    try:
        cls = spec.load()
    except ImportError as e:
        raise ConfigError(f"optimizer.type {name}: cannot import it ({e}); install the 'bench' extra") from None
    for key in _FROM_TRAIN:
        if key in params:
            raise ConfigError(f"optimizer.params.{key}: set train.{key} instead (it drives the schedule)")
    known = set(constructor_arguments(cls))
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"optimizer.params: {', '.join(repr(k) for k in unknown)} not accepted by {name} "
            f"(accepted: {', '.join(sorted(known - set(_FROM_TRAIN)))})"
        )
    if params.get("momentum_in_grad"):
        raise ConfigError(
            "optimizer.params.momentum_in_grad: not supported by the launcher (gradient clipping, "
            "accumulation and DeepSpeed rewrite .grad, which would hold the momentum)"
        )
    resolved = {**spec.paper_params, **params}
    try:
        cls([torch.nn.Parameter(torch.zeros(2, 3))], lr=lr, **as_call_arguments(resolved))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer.params for {name}: {e}") from None
    return resolved


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, no_decay: set[str]) -> list[dict]:
    """Megatron's two groups: decay for weights, none for biases and 1-D parameters (``no_decay``)."""
    decay, plain = [], []
    for name, p in named_params:
        if p.requires_grad:
            (plain if name in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(name: str, params: dict, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """The named optimizer over ``groups`` (each carries its own weight_decay)."""
    return OPTIMIZERS[name].load()(groups, lr=lr, **as_call_arguments(params))
