"""The run configuration's schema: one dataclass per section, with Megatron-LM's argument names.

A run is one YAML file with sections ``model``, ``train``, ``optimizer``, ``parallel``, ``data``,
``checkpoint`` and ``log`` (read by :mod:`dist_memopt.train.config`). Each field's type is what
the reader coerces to; ``metadata["choices"]`` lists a string field's allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = [
    "RunConfig",
    "ModelConfig",
    "TrainConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "DataConfig",
    "CheckpointConfig",
    "LogConfig",
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
    nproc: int = 1  # processes started by the launcher (dist_memopt.train.run)
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
    """One run: the sections of a config file, each a dataclass of this module."""

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
