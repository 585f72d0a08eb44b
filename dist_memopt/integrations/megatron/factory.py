"""``get_megatron_optimizer`` that also builds SMMF and Alada: a drop-in for megatron-core 0.16's.

Megatron-LM builds its optimizer with ``megatron.core.optimizer.get_megatron_optimizer(config,
model_chunks, ...)``, which accepts ``config.optimizer`` 'adam' or 'sgd'. This one has the same
signature, accepts 'smmf' and 'alada' as well, and hands every other name to Megatron unchanged.

For SMMF and Alada, Megatron's own function still runs: it forms the parameter groups (weight-decay
and learning-rate overrides, the dense/expert-parallel split), the process groups and the
``ChainedOptimizer``. Only its step from one set of parameter groups to a ``MegatronOptimizer``
is replaced, for the duration of the call, by :func:`_build`, which wraps SMMF/Alada in the
subclasses of :mod:`.optimizers` exactly where Megatron would wrap Adam.

Hyperparameters come from the ``OptimizerConfig`` where the names mean the same thing, and from
keyword arguments (which win):

=====================  ===========================================  ===============================
OptimizerConfig        SMMF                                         Alada
=====================  ===========================================  ===============================
lr                     lr                                           lr
weight_decay           weight_decay                                 weight_decay
adam_beta1             beta (first-moment coefficient)              betas[0]
adam_beta2             (none: β2,t = 1 − t^decay_rate)              betas[1]
adam_eps               eps                                          eps
decoupled_weight_decay weight_decay_mode "adamw" (True) / "adam"    must be True (decoupled only)
=====================  ===========================================  ===============================

Megatron-LM's ``--optimizer`` accepts only Megatron's names, so a launch can also name the
optimizer in the environment: ``DIST_MEMOPT_OPTIMIZER=smmf`` (or ``alada``) builds it where the
config says 'adam' (the config's Adam fields still map as above), and
``DIST_MEMOPT_OPTIMIZER_ARGS='{"decay_rate": -0.8}'`` adds keyword arguments (explicit keyword
arguments win).

Keyword arguments only: SMMF ``decay_rate``, ``growth_rate``, ``vector_reshape``, ``weight_decay_mode``,
``beta`` (None: no first moment); Alada ``betas``, ``eps``; both ``check_finite``. Megatron's
defaults (adam_beta2 0.999, adam_eps 1e-8) are Adam's: Alada's paper recommends
``betas=(0.9, 0.9)`` and ``eps=1e-16``, which must be passed (or set in the config) explicitly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any, Iterator, Optional

import torch

from dist_memopt.optim import SMMF, Alada
from dist_memopt.optim.arguments import constructor_arguments

__all__ = ["get_megatron_optimizer", "OPTIMIZERS", "optimizer_arguments", "check_supported", "ENV_OPTIMIZER", "ENV_ARGUMENTS"]

OPTIMIZERS: dict[str, type] = {"smmf": SMMF, "alada": Alada}
ENV_OPTIMIZER = "DIST_MEMOPT_OPTIMIZER"  # smmf or alada, built where the config says 'adam'
ENV_ARGUMENTS = "DIST_MEMOPT_OPTIMIZER_ARGS"  # JSON object of keyword arguments for it


def optimizer_arguments(config: Any, name: Optional[str] = None, /, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of optimizer ``name`` (default ``config.optimizer``: smmf or alada)
    from the config's Adam-named fields and ``overrides``."""
    cls = OPTIMIZERS[(name or config.optimizer).lower()]
    if config.lr is None and "lr" not in overrides:
        raise ValueError("OptimizerConfig.lr is None: set the learning rate (Megatron-LM's --lr)")
    arguments: dict[str, Any] = dict(lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_eps)
    if cls is SMMF:
        arguments.update(beta=config.adam_beta1, weight_decay_mode="adamw" if config.decoupled_weight_decay else "adam")
    else:
        if not config.decoupled_weight_decay:
            raise ValueError("Alada applies weight decay decoupled only: set OptimizerConfig.decoupled_weight_decay=True")
        arguments.update(betas=(config.adam_beta1, config.adam_beta2))
    accepted = set(constructor_arguments(cls))
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(f"{cls.__name__} does not take {', '.join(unknown)} (it takes {', '.join(sorted(accepted))})")
    if overrides.get("momentum_in_grad"):
        raise ValueError("momentum_in_grad is not supported with Megatron: its gradient buffers are zeroed every step")
    arguments.update(overrides)
    return arguments


def _requested(config: Any, optimizer_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The optimizer to build and its keyword arguments: ``config.optimizer``, or SMMF/Alada named by
    :data:`ENV_OPTIMIZER` in place of 'adam' (with :data:`ENV_ARGUMENTS`, JSON, under the keywords)."""
    name = config.optimizer.lower()
    chosen = os.environ.get(ENV_OPTIMIZER, "").strip().lower()
    if not chosen:
        return name, optimizer_kwargs
    if chosen not in OPTIMIZERS:
        raise ValueError(f"{ENV_OPTIMIZER}={chosen!r}: expected one of {', '.join(OPTIMIZERS)}")
    if name not in ("adam", chosen):
        raise ValueError(f"{ENV_OPTIMIZER}={chosen} replaces optimizer 'adam' (Megatron-LM's --optimizer adam), not {config.optimizer!r}")
    try:
        from_env = json.loads(os.environ.get(ENV_ARGUMENTS) or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"{ENV_ARGUMENTS} is not JSON: {error}") from None
    if not isinstance(from_env, dict):
        raise ValueError(f"{ENV_ARGUMENTS} must be a JSON object of keyword arguments, got {from_env!r}")
    from_env = {k: tuple(v) if isinstance(v, list) else v for k, v in from_env.items()}
    return chosen, {**from_env, **optimizer_kwargs}


def _group_size(group: Any) -> int:
    return 1 if group is None else group.size()


def check_supported(config: Any, model_chunks: list, pg_collection: Any = None) -> None:
    """Raise ValueError for Megatron settings SMMF/Alada do not support (before anything is built)."""
    from megatron.core.fp8_utils import is_float8tensor

    name = config.optimizer
    if config.optimizer_cpu_offload:
        raise ValueError(
            f"optimizer={name!r}: optimizer_cpu_offload (HybridDeviceOptimizer) is Adam/SGD only; the "
            "factored state is small enough to keep on the GPU (DeepSpeed ZeRO-Offload runs SMMF/Alada on the host)"
        )
    if config.use_precision_aware_optimizer:
        raise ValueError(f"optimizer={name!r}: use_precision_aware_optimizer needs TransformerEngine's FusedAdam")
    if any(chunk.ddp_config.use_megatron_fsdp for chunk in model_chunks):
        raise ValueError(f"optimizer={name!r}: Megatron FSDP (use_megatron_fsdp) is not supported; use DDP with use_distributed_optimizer")
    if any(is_float8tensor(p) for chunk in model_chunks for p in chunk.parameters()):
        raise ValueError(f"optimizer={name!r}: fp8 parameters are not supported")
    if _group_size(_tp_group(pg_collection)) > 1 or _group_size(_expert_tp_group(pg_collection)) > 1:
        from dist_memopt.integrations.megatron.tensor_parallel import refuse_grouped_experts

        refuse_grouped_experts(model_chunks)


def _tp_group(pg_collection: Any) -> Any:
    from megatron.core import parallel_state

    if pg_collection is not None and hasattr(pg_collection, "tp"):
        return pg_collection.tp
    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


def _expert_tp_group(pg_collection: Any) -> Any:
    """The group MoE expert weights are split over (Megatron's expert tensor-parallel group)."""
    from megatron.core import parallel_state

    if pg_collection is not None and hasattr(pg_collection, "expt_tp"):
        return pg_collection.expt_tp
    return parallel_state.get_expert_tensor_parallel_group(check_initialized=False)


def tensor_parallel_pieces(model_chunks: list, pg_collection: Any = None) -> dict:
    """id(parameter) -> its piece of the TP=1 parameter; empty without (expert) tensor parallelism."""
    from dist_memopt.integrations.megatron.tensor_parallel import tp_pieces

    group, expert_group = _tp_group(pg_collection), _expert_tp_group(pg_collection)
    if _group_size(group) == 1 and _group_size(expert_group) == 1:
        return {}

    def rank_size(g: Any) -> tuple[int, int]:
        return (0, 1) if g is None else (g.rank(), g.size())

    return tp_pieces(model_chunks, *rank_size(group), *rank_size(expert_group))


def _grad_scaler(config: Any) -> Any:
    """Megatron's choice: a constant scale if given, a dynamic one for fp16, else none."""
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(
            initial_scale=config.initial_loss_scale,
            min_scale=config.min_loss_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=config.loss_scale_window,
            hysteresis=config.hysteresis,
        )
    return None


def _no_state_init(optimizer: Any, config: Any = None) -> None:
    """SMMF/Alada create their state on the first step; checkpoints do not need it earlier."""


def _build(
    cls: type,
    arguments: dict[str, Any],
    pieces: dict,
    config: Any,
    model_chunks: list,
    param_groups: list,
    per_model_buffers: Optional[dict] = None,
    model_parallel_group: Optional[torch.distributed.ProcessGroup] = None,
    data_parallel_group: Optional[torch.distributed.ProcessGroup] = None,
    data_parallel_group_gloo: Optional[torch.distributed.ProcessGroup] = None,
    data_parallel_group_idx: Optional[int] = None,
    intra_dist_opt_group: Optional[torch.distributed.ProcessGroup] = None,
    distributed_optimizer_instance_id: Optional[int] = 0,
    pg_collection: Any = None,
) -> Any:
    """``_get_megatron_optimizer_based_on_param_groups`` for SMMF/Alada (same arguments)."""
    from dist_memopt.integrations.megatron.optimizers import (
        FactoredDistributedOptimizer,
        FactoredFloat16Optimizer,
        FactoredFP32Optimizer,
    )

    inner = cls(param_groups, **arguments) if param_groups else None
    tp = dict(pieces=pieces, tp_group=_tp_group(pg_collection), expert_tp_group=_expert_tp_group(pg_collection))
    if config.use_distributed_optimizer:
        optimizer = FactoredDistributedOptimizer(
            inner, config, _grad_scaler(config), _no_state_init,
            model_chunks=model_chunks,
            per_model_buffers=per_model_buffers,
            data_parallel_group=data_parallel_group,
            data_parallel_group_gloo=data_parallel_group_gloo,
            data_parallel_group_idx=data_parallel_group_idx,
            distributed_optimizer_instance_id=distributed_optimizer_instance_id,
            **tp,
        )
        optimizer.grad_stats_parallel_group = intra_dist_opt_group
    elif config.fp16 or config.bf16:
        optimizer = FactoredFloat16Optimizer(inner, config, _grad_scaler(config), _no_state_init, **tp)
        optimizer.grad_stats_parallel_group = model_parallel_group
    else:
        optimizer = FactoredFP32Optimizer(inner, config, _no_state_init, **tp)
        optimizer.grad_stats_parallel_group = model_parallel_group
    return optimizer


@contextlib.contextmanager
def _building_with(build: Any) -> Iterator[None]:
    """Megatron's per-group-set optimizer builder replaced by ``build`` while the block runs."""
    import megatron.core.optimizer as megatron_optimizer

    original = megatron_optimizer._get_megatron_optimizer_based_on_param_groups
    megatron_optimizer._get_megatron_optimizer_based_on_param_groups = build
    try:
        yield
    finally:
        megatron_optimizer._get_megatron_optimizer_based_on_param_groups = original


def get_megatron_optimizer(
    config: Any,
    model_chunks: list,
    config_overrides: Optional[dict] = None,
    use_gloo_process_groups: bool = True,
    pg_collection: Any = None,
    dump_param_to_param_group_map: Optional[str] = None,
    **optimizer_kwargs: Any,
) -> Any:
    """``megatron.core.optimizer.get_megatron_optimizer``, plus ``config.optimizer`` 'smmf' and 'alada'.

    ``optimizer_kwargs`` are SMMF/Alada constructor arguments that override those taken from
    ``config`` (see the module docstring for the mapping); they are an error for other optimizers.
    The environment variable ``DIST_MEMOPT_OPTIMIZER=smmf|alada`` builds that optimizer in place of
    'adam', for training scripts whose argument parser only knows Megatron's names.
    With ``config.use_distributed_optimizer`` SMMF/Alada step Megatron's fp32 main-parameter
    shards, their statistics completed over each buffer's data-parallel group; without it, whole
    parameters. With tensor parallelism each TP rank's piece is placed in the TP=1 parameter
    (:mod:`.tensor_parallel`) and a split parameter's statistics are completed over the
    tensor-parallel group too (an MoE expert's over the expert tensor-parallel group), so the
    update does not depend on the layout. Returns what Megatron
    returns (a ``ChainedOptimizer``).
    """
    import megatron.core.optimizer as megatron_optimizer

    megatron_arguments = (config, model_chunks, config_overrides, use_gloo_process_groups, pg_collection, dump_param_to_param_group_map)
    name, optimizer_kwargs = _requested(config, optimizer_kwargs)
    if name not in OPTIMIZERS:
        if optimizer_kwargs:
            raise TypeError(f"keyword arguments {sorted(optimizer_kwargs)} are for optimizer 'smmf' or 'alada', not {config.optimizer!r}")
        return megatron_optimizer.get_megatron_optimizer(*megatron_arguments)
    check_supported(config, model_chunks, pg_collection)
    arguments = optimizer_arguments(config, name, **optimizer_kwargs)
    OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(2, 3))], **arguments)  # invalid values fail here, by name
    pieces = tensor_parallel_pieces(model_chunks, pg_collection)
    with _building_with(functools.partial(_build, OPTIMIZERS[name], arguments, pieces)):
        return megatron_optimizer.get_megatron_optimizer(*megatron_arguments)
