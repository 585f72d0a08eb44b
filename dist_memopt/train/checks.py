"""Cross-field rules of a run configuration, checked before any process group exists.

:func:`validate` checks sizes, ranges, the T5 span-corruption lengths, the parallel layout
(:mod:`dist_memopt.train.layout`), what the backend can build, and the optimizer's constructor
arguments (filling in the paper's defaults).
"""

from __future__ import annotations

from typing import Optional

from dist_memopt.train import backends, optimizers
from dist_memopt.train.errors import ConfigError, require_positive as _positive
from dist_memopt.train.layout import check_model_parallel, check_world_size
from dist_memopt.train.schema import RunConfig

__all__ = ["validate"]


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
    check_model_parallel(config)
    if p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: must be 1, 2 or 3, got {p.zero_stage!r}")
    _positive("data.mean_noise_span_length", d.mean_noise_span_length)
    _positive("data.corpus_max_bytes", d.corpus_max_bytes)
    if config.log.log_interval < 1:
        raise ConfigError(f"log.log_interval: must be >= 1, got {config.log.log_interval!r}")
    _positive("checkpoint.save_interval", config.checkpoint.save_interval, allow_zero=True)

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
