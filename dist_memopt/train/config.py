"""The run configuration: schema, YAML composition, ``--set`` overrides, validation.

A run is one YAML file with sections ``model``, ``train``, ``optimizer``, ``parallel``, ``data``,
``checkpoint`` and ``log``; names follow Megatron-LM's arguments where one exists. A file may
start with ``base: other.yaml`` (relative to itself): it is the base's settings with this file's
merged on top. Changing ``optimizer.type`` (in a file or with ``--set``) drops the inherited
``optimizer.params``, since constructor arguments belong to one optimizer.

Everything is checked here, before any process group exists: unknown keys, wrong types, values
outside their choices, cross-field rules, and the optimizer's constructor arguments.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dist_memopt.train.errors import ConfigError

__all__ = [
    "ConfigError",
    "RunConfig",
    "ModelConfig",
    "TrainConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "DataConfig",
    "CheckpointConfig",
    "LogConfig",
    "load_config",
    "check_world_size",
    "to_yaml",
    "config_to_dict",
]


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class ModelConfig:
    """Megatron-core model shape (Megatron-LM argument names)."""

    type: str = field(default="gpt2", metadata=_choices("gpt2", "bert", "t5"))
    num_layers: int = 12
    encoder_num_layers: Optional[int] = None  # T5; default num_layers
    decoder_num_layers: Optional[int] = None  # T5; default num_layers
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    kv_channels: Optional[int] = None  # default hidden_size / num_attention_heads
    seq_length: int = 1024  # T5: the encoder's sequence length
    decoder_seq_length: Optional[int] = None  # T5 only (required there)
    max_position_embeddings: Optional[int] = None  # default max(seq_length, decoder_seq_length)
    vocab_size: Optional[int] = None  # default: the tokenizer's; padded like Megatron
    make_vocab_size_divisible_by: int = 128
    vocab_extra_ids: int = 0  # T5 sentinel tokens
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    position_embedding_type: str = field(default="learned_absolute", metadata=_choices("learned_absolute", "rope"))
    untie_embeddings_and_output_weights: bool = False


@dataclass
class TrainConfig:
    """Iterations, batch sizes and the learning-rate schedule (Megatron-LM argument names)."""

    train_iters: int = 1000
    micro_batch_size: int = 4
    global_batch_size: int = 32
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = field(default="linear", metadata=_choices("constant", "linear", "cosine", "inverse-square-root"))
    lr_decay_iters: Optional[int] = None  # default train_iters
    weight_decay: float = 0.01  # not applied to biases and 1-D parameters (Megatron's rule)
    clip_grad: float = 1.0  # 0 disables clipping
    seed: int = 1234
    bf16: bool = False  # bf16 compute (FSDP mixed precision / DeepSpeed bf16); fp32 master weights


@dataclass
class OptimizerConfig:
    """Which optimizer, and its constructor arguments beyond ``train.lr``/``train.weight_decay``."""

    type: str = field(default="SMMF", metadata=_choices("SMMF", "Alada", "AdamW", "Adafactor", "CAME", "SM3"))
    params: dict = field(default_factory=dict)


@dataclass
class ParallelConfig:
    """How the model is sharded and how processes are started."""

    backend: str = field(default="fsdp2", metadata=_choices("fsdp2", "fsdp1", "deepspeed", "ddp", "megatron"))
    launcher: str = field(default="torchrun", metadata=_choices("torchrun", "deepspeed", "mpirun", "none"))
    nproc: int = 1  # processes started by launch/run.py
    tensor_model_parallel_size: int = 1  # megatron backend only (Megatron-LM's --tensor-model-parallel-size)
    pipeline_model_parallel_size: int = 1  # megatron backend only; the training loop has no pipeline schedule yet
    sequence_parallel: bool = False  # megatron backend with tensor_model_parallel_size > 1
    zero_stage: int = 2  # DeepSpeed ZeRO stage (1, 2 or 3)
    use_orig_params: bool = True  # FSDP1
    reshard_after_forward: bool = True  # FSDP2
    deepspeed_config: dict = field(default_factory=dict)  # merged into the generated ds_config
    dist_timeout_s: int = 600


@dataclass
class DataConfig:
    """Megatron indexed dataset (``data_path`` prefix) or the built-in standard-library corpus."""

    data_path: Optional[str] = None  # .bin/.idx prefix; None: build the stdlib corpus
    tokenizer_type: str = field(default="byte", metadata=_choices("byte"))
    cache_dir: Optional[str] = None  # default $DIST_MEMOPT_CACHE or ~/.cache/dist_memopt
    corpus_max_bytes: Optional[int] = None  # cap on the stdlib corpus (None: all of it)
    mask_prob: float = 0.15  # BERT masked fraction, T5 noise density
    mean_noise_span_length: float = 3.0  # T5


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written (Megatron: ``--save``, ``--save-interval``)."""

    save: Optional[str] = None  # default <run_dir>/checkpoints
    save_interval: int = 0  # 0: only at the end
    save_final: bool = True


@dataclass
class LogConfig:
    """Run directory, console output, JSON log and loss-curve plot."""

    run_dir: Optional[str] = None  # default runs/<config dir>-<config name>-<optimizer>
    log_interval: int = 10
    progress_bar: bool = True
    plot: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    name: str = "run"  # set from the config file's path

    # --- derived values, used throughout -------------------------------------------------------

    def num_microbatches(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.data_parallel_size(world_size))

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks that see different data: the world over the model-parallel layout."""
        p = self.parallel
        return max(1, world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size))

    @property
    def run_dir(self) -> Path:
        return Path(self.log.run_dir or Path("runs") / f"{self.name}-{self.optimizer.type.lower()}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.save) if self.checkpoint.save else self.run_dir / "checkpoints"


# --- YAML ------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None


def _read_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The file's settings with its ``base:`` chain merged underneath."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: 'base' chain loops: {' -> '.join(str(p) for p in chain + (path,))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
    return _merge(_read_file(path.parent / base, chain + (path,)), data)


def _merge(base: dict, top: dict) -> dict:
    """Recursive merge; a changed ``optimizer.type`` replaces ``optimizer.params`` instead."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            merged = _merge(out[key], value)
            if "type" in value and value.get("type") != out[key].get("type") and "params" in out[key]:
                merged["params"] = dict(value.get("params") or {})
            out[key] = merged
        else:
            out[key] = value
    return out


# --- typing ------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str, choices: Optional[tuple] = None) -> Any:
    """``value`` as ``annotation`` (int, float, str, bool, dict, Optional[...]) or a ConfigError."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, choices)
    kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            if choices and value not in choices:
                raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
            return value
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
        kind = "mapping"
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported schema type {annotation!r} at {where}")
    raise ConfigError(f"{where}: expected {kind}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = _field_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} "
            f"(known: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        annotation = types[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, path)
        else:
            kwargs[name] = _coerce(value, annotation, path, fields[name].metadata.get("choices"))
    return cls(**kwargs)


# --- overrides -----------------------------------------------------------------------------------


def _apply_override(data: dict, item: str) -> None:
    """Apply one ``section.key=value`` (value parsed as YAML) to the raw settings."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: KEY must be section.name, e.g. train.lr (sections: {', '.join(_SECTIONS)})")
    value = _parse_yaml(text, f"--set {key}") if text.strip() else None
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    if parts == ["optimizer", "type"] and node.get("type") != value:
        node.pop("params", None)
    node[parts[-1]] = value


_SECTIONS = [f.name for f in dataclasses.fields(RunConfig) if f.name != "name"]


def _config_name(path: Path) -> str:
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None, world_size: Optional[int] = None) -> RunConfig:
    """Read, compose, override, type and validate a run configuration.

    ``world_size`` (when known) also checks that the global batch divides into micro-batches.
    Raises :class:`ConfigError` with the offending key for anything invalid.
    """
    path = Path(path)
    data = _read_file(path)
    for item in overrides or []:
        _apply_override(data, item)
    if "name" in data:
        raise ConfigError(f"{path}: unknown key 'name' (the run's name comes from the file name)")
    config = _build(RunConfig, data, "")
    config.name = _config_name(path)
    validate(config, world_size)
    return config


# --- cross-field checks --------------------------------------------------------------------------


def _positive(where: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(config: RunConfig, world_size: Optional[int] = None) -> None:
    """Cross-field rules; fills the optimizer's paper defaults into ``optimizer.params``."""
    m, t, p, d = config.model, config.train, config.parallel, config.data
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "make_vocab_size_divisible_by"):
        _positive(f"model.{name}", getattr(m, name))
    for name in ("encoder_num_layers", "decoder_num_layers", "ffn_hidden_size", "kv_channels", "vocab_size", "decoder_seq_length"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.vocab_extra_ids", m.vocab_extra_ids, allow_zero=True)
    if m.hidden_size % m.num_attention_heads and m.kv_channels is None:
        raise ConfigError(
            f"model.hidden_size ({m.hidden_size}) is not divisible by model.num_attention_heads "
            f"({m.num_attention_heads}); set model.kv_channels"
        )
    for name in ("hidden_dropout", "attention_dropout", "mask_prob"):
        section = m if hasattr(m, name) else d
        value = getattr(section, name)
        if not 0 <= value < 1:
            raise ConfigError(f"{'model' if section is m else 'data'}.{name}: must be in [0, 1), got {value!r}")
    if m.type == "t5":
        if m.decoder_seq_length is None:
            raise ConfigError("model.decoder_seq_length: required for model.type t5")
        _check_t5_lengths(config)
    else:
        for name in ("encoder_num_layers", "decoder_num_layers", "decoder_seq_length"):
            if getattr(m, name) is not None:
                raise ConfigError(f"model.{name}: only for model.type t5 (this is {m.type})")
    if m.type == "bert" and m.seq_length < 3:
        raise ConfigError(f"model.seq_length: BERT needs room for [CLS] text [SEP], got {m.seq_length}")
    if m.max_position_embeddings is not None and m.max_position_embeddings < max(m.seq_length, m.decoder_seq_length or 0):
        raise ConfigError(f"model.max_position_embeddings ({m.max_position_embeddings}) is shorter than the sequence length")

    for name in ("train_iters", "micro_batch_size", "global_batch_size"):
        _positive(f"train.{name}", getattr(t, name))
    for name in ("lr", "min_lr", "weight_decay", "clip_grad", "lr_warmup_iters"):
        _positive(f"train.{name}", getattr(t, name), allow_zero=True)
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr ({t.min_lr}) is larger than train.lr ({t.lr})")
    decay_iters = t.lr_decay_iters or t.train_iters
    if t.lr_warmup_iters > decay_iters:
        raise ConfigError(f"train.lr_warmup_iters ({t.lr_warmup_iters}) exceeds the decay iterations ({decay_iters})")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) is not a multiple of train.micro_batch_size ({t.micro_batch_size})"
        )
    if world_size is not None:
        check_world_size(config, world_size)

    _positive("parallel.nproc", p.nproc)
    _positive("parallel.dist_timeout_s", p.dist_timeout_s)
    _check_model_parallel(config)
    if p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: must be 1, 2 or 3, got {p.zero_stage!r}")
    _positive("data.mean_noise_span_length", d.mean_noise_span_length)
    _positive("data.corpus_max_bytes", d.corpus_max_bytes)
    if config.log.log_interval < 1:
        raise ConfigError(f"log.log_interval: must be >= 1, got {config.log.log_interval!r}")
    _positive("checkpoint.save_interval", config.checkpoint.save_interval, allow_zero=True)

    from dist_memopt.train import backends, optimizers  # light imports: registries only

    backends.check(config)
    if t.bf16 and p.backend == "ddp":
        raise ConfigError("train.bf16: not supported with parallel.backend ddp (use fsdp2, fsdp1 or deepspeed)")
    config.optimizer.params = optimizers.resolve_params(config.optimizer.type, config.optimizer.params, t.lr)


def _check_t5_lengths(config: RunConfig) -> None:
    """Span corruption must fit: sentinels in the vocabulary, targets in the decoder length."""
    from dist_memopt.train.batches import t5_lengths

    m, d = config.model, config.data
    if d.mask_prob <= 0:
        raise ConfigError(f"data.mask_prob: T5 span corruption needs a noise density > 0, got {d.mask_prob}")
    try:
        lengths = t5_lengths(m.seq_length, d.mask_prob, d.mean_noise_span_length)
    except ValueError as e:
        raise ConfigError(f"model.seq_length: {e}") from None
    if lengths.spans > m.vocab_extra_ids:
        raise ConfigError(
            f"model.vocab_extra_ids ({m.vocab_extra_ids}): span corruption of {m.seq_length} tokens uses "
            f"{lengths.spans} sentinels"
        )
    if lengths.target > m.decoder_seq_length:
        raise ConfigError(
            f"model.decoder_seq_length ({m.decoder_seq_length}) is shorter than the span-corruption "
            f"targets ({lengths.target} tokens); raise it or lower data.mask_prob"
        )


def _check_model_parallel(config: RunConfig) -> None:
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
    if pp > 1:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size ({pp}): the launcher's training loop runs no pipeline "
            "schedule yet; get_megatron_optimizer supports pipeline stages (use Megatron-LM's pretrain_gpt.py)"
        )
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel: needs parallel.tensor_model_parallel_size > 1")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    for name, value in (("model.num_attention_heads", m.num_attention_heads), ("model.ffn_hidden_size", ffn)):
        if value % tp:
            raise ConfigError(f"{name} ({value}) is not divisible by parallel.tensor_model_parallel_size ({tp})")
    if m.num_layers % pp:
        raise ConfigError(f"model.num_layers ({m.num_layers}) is not divisible by parallel.pipeline_model_parallel_size ({pp})")


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


# --- output --------------------------------------------------------------------------------------


def config_to_dict(config: RunConfig) -> dict:
    data = dataclasses.asdict(config)
    data.pop("name")
    return data


def _represent_tuple(dumper: yaml.SafeDumper, value: tuple) -> Any:
    return dumper.represent_list(list(value))


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(tuple, _represent_tuple)


def to_yaml(config: RunConfig) -> str:
    """The resolved configuration as YAML that :func:`load_config` reads back unchanged."""
    return yaml.dump(config_to_dict(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
