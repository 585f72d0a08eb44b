"""The parallel layout: which backends take model parallelism, and whether the model and the world
hold it (tensor x pipeline x data parallel ranks). Checked while the configuration is read, and
against ``parallel.nproc`` by :mod:`dist_memopt.train.run` before any process starts."""

from __future__ import annotations

from dist_memopt.train.errors import ConfigError, require_positive as _positive
from dist_memopt.train.schema import RunConfig

__all__ = ["check_model_parallel", "check_world_size"]


def check_model_parallel(config: RunConfig) -> None:
    """Tensor/pipeline/sequence parallelism: megatron backend only, and a model they can split."""
    m, p = config.model, config.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _positive("parallel.tensor_model_parallel_size", tp)
    _positive("parallel.pipeline_model_parallel_size", pp)
    if p.backend != "megatron" and (tp > 1 or pp > 1 or p.sequence_parallel):
        raise ConfigError(
            f"parallel.tensor_model_parallel_size / pipeline_model_parallel_size / sequence_parallel: for "
            f"parallel.backend megatron only (this is {p.backend})"
        )
    if pp > 1 and m.type != "gpt2":
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size ({pp}): the launcher builds pipeline stages for model.type "
            f"gpt2 only (this is {m.type}; Megatron-LM's pretrain_{m.type}.py runs its own stages)"
        )
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel: needs parallel.tensor_model_parallel_size > 1")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    for name, value in (("model.num_attention_heads", m.num_attention_heads), ("model.ffn_hidden_size", ffn)):
        if value % tp:
            raise ConfigError(f"{name} ({value}) is not divisible by parallel.tensor_model_parallel_size ({tp})")
    if m.num_layers % pp:
        raise ConfigError(
            f"model.num_layers ({m.num_layers}) is not divisible by parallel.pipeline_model_parallel_size ({pp}): "
            "Megatron gives every pipeline stage the same number of layers"
        )


def check_world_size(config: RunConfig, world_size: int) -> None:
    """The world must hold the model-parallel layout, and the global batch split into
    micro-batches on every data-parallel rank."""
    t, p = config.train, config.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"{world_size} process(es) do not hold tensor x pipeline parallel size "
            f"({p.tensor_model_parallel_size} x {p.pipeline_model_parallel_size}): set parallel.nproc to a multiple"
        )
    dp = world_size // model_parallel
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) is not a multiple of micro_batch_size x "
            f"data-parallel size ({t.micro_batch_size} x {dp})"
        )
