"""Param groups with the usual weight-decay rule: none on biases and normalization weights.

HF Trainer builds these two groups itself, but a ds_config optimizer (HF hands DeepSpeed one
group of all parameters), a custom loop or torchtitan does not; this gives them the same groups.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = ["decay_param_groups", "is_no_decay"]

#: HF Trainer's name patterns (transformers 5.x ``get_decay_parameter_names``) for no decay.
NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer: torch's own, or any class named like one (LlamaRMSNorm, FusedLayerNorm)."""
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def is_no_decay(name: str, owner: nn.Module) -> bool:
    """Whether parameter ``name`` (its full name), held directly by ``owner``, gets no weight decay."""
    return _is_norm(owner) or NO_DECAY_NAMES.search(name.lower()) is not None


def decay_param_groups(model: nn.Module, weight_decay: float, *, names: bool = False) -> list[dict[str, Any]]:
    """``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]``.

    Biases and the weights of normalization layers get no decay; everything else does (HF
    Trainer's rule; for transformers it matches Megatron's "1-D or bias"). Only parameters that
    require grad are included, each once (tied weights too); empty groups are left out.
    ``names=True`` adds ``param_names`` (not for DeepSpeed or FSDP1, which replace ``params``).
    """
    decay: list[tuple[str, nn.Parameter]] = []
    rest: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local_name}" if module_name else local_name
            (rest if is_no_decay(name, module) else decay).append((name, param))
    groups = []
    for members, wd in ((decay, weight_decay), (rest, 0.0)):
        if members:
            group: dict[str, Any] = {"params": [p for _, p in members], "weight_decay": wd}
            if names:
                group["param_names"] = [n for n, _ in members]
            groups.append(group)
    return groups
