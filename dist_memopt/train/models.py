"""Megatron-core GPTModel, BertModel and T5Model from a config, and their pre-training losses.

Local layer specs (no Transformer Engine), ``use_cpu_initialization=True`` (weights are created
on the CPU from the seeded generator, identically on every rank, then moved to the device).
Megatron's parallel state is initialized with the configured tensor- and pipeline-parallel sizes
(the megatron backend; 1 otherwise): data parallelism belongs to the backend (FSDP, DeepSpeed or
Megatron DDP). Under the megatron backend each pipeline stage builds its own layers
(``pre_process``/``post_process``), and each transformer layer draws its weights from a seed of
its global layer number, so that every pipeline (and tensor-parallel) layout starts from the same
weights. On CPU, :mod:`dist_memopt.integrations.megatron.cpu_shims` replaces megatron-core's CUDA
assumptions.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from dist_memopt.integrations.megatron.cpu_shims import install_cpu_shims, model_parallel_manual_seed
from dist_memopt.train.data import ByteTokenizer

__all__ = [
    "padded_vocab_size",
    "init_megatron",
    "build_model",
    "token_losses",
    "masked_mean",
    "compute_loss",
    "gpt_layer_spec",
    "seeded_layer",
    "SequenceParallelLayerNorm",
]


def padded_vocab_size(config) -> int:
    """Megatron's rule: the vocabulary rounded up to ``make_vocab_size_divisible_by`` x TP size."""
    m = config.model
    size = m.vocab_size or ByteTokenizer(m.vocab_extra_ids).vocab_size
    multiple = m.make_vocab_size_divisible_by * config.parallel.tensor_model_parallel_size
    return int(math.ceil(size / multiple) * multiple)


def init_megatron(seed: int, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """Megatron's parallel state (``tensor_parallel`` x ``pipeline_parallel``) and seeded RNGs;
    needs the default process group."""
    from megatron.core import parallel_state

    install_cpu_shims()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
    torch.manual_seed(seed)
    model_parallel_manual_seed(seed)


def _transformer_config(config, num_layers: int) -> Any:
    from megatron.core.transformer import TransformerConfig

    m = config.model
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.kv_channels,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        use_cpu_initialization=True,
        bf16=config.train.bf16,
        params_dtype=torch.float32,
        tensor_model_parallel_size=config.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.parallel.pipeline_model_parallel_size,
        pipeline_dtype=torch.bfloat16 if config.train.bf16 else torch.float32,  # what stages send (Float16Module casts)
        sequence_parallel=config.parallel.sequence_parallel,
    )


class SequenceParallelLayerNorm(nn.LayerNorm):
    """torch's LayerNorm with Megatron's mark for sequence parallelism, as Apex's FusedLayerNorm sets
    it (megatron-core's torch fallback refuses sequence parallelism; Apex and TE are absent on CPU)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def _layer_seed(seed: int, layer_number: int) -> int:
    return int(np.random.SeedSequence([seed, layer_number]).generate_state(1)[0])


def seeded_layer(seed: int) -> type:
    """Megatron's TransformerLayer that seeds the CPU generator from (``seed``, its global layer
    number) before it creates its weights: a layer starts the same on whichever pipeline stage
    builds it, and what follows the last layer (final norm, output layer) too."""
    from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

    class SeededTransformerLayer(TransformerLayer):
        def __init__(self, config: Any, submodules: Any, layer_number: int = 1, **kwargs: Any) -> None:
            offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"))  # layer_number is stage-local
            torch.manual_seed(_layer_seed(seed, layer_number + offset))
            super().__init__(config, submodules, layer_number, **kwargs)

    return SeededTransformerLayer


def gpt_layer_spec(num_layers: int, sequence_parallel: bool, layer_seed: Optional[int] = None) -> Any:
    """The local GPT layer spec; with sequence parallelism, with norms that support it (then
    ``num_layers`` is the number of layers on this pipeline stage); with ``layer_seed``, layers
    seeded by their global number (:func:`seeded_layer`)."""
    import copy
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = get_gpt_layer_local_spec()
    if layer_seed is not None:
        spec = dataclasses.replace(spec, module=seeded_layer(layer_seed))
    if not sequence_parallel:
        return spec
    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=SequenceParallelLayerNorm)


def build_model(config) -> nn.Module:
    """The configured megatron-core model, in fp32 on the CPU."""
    m = config.model
    vocab = padded_vocab_size(config)
    max_positions = m.max_position_embeddings or max(m.seq_length, m.decoder_seq_length or 0)
    common = dict(
        vocab_size=vocab,
        max_sequence_length=max_positions,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
    )
    if m.type == "gpt2":
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from megatron.core.transformer.transformer_block import get_num_layers_to_build

        transformer_config = _transformer_config(config, m.num_layers)
        seed = config.train.seed if config.parallel.backend == "megatron" else None  # the backend with pipeline stages
        spec = gpt_layer_spec(get_num_layers_to_build(transformer_config), config.parallel.sequence_parallel, seed)
        return GPTModel(
            config=transformer_config, transformer_layer_spec=spec, pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(), **common,
        )
    if m.type == "bert":
        from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
        from megatron.core.models.bert.bert_model import BertModel

        return BertModel(
            config=_transformer_config(config, m.num_layers),
            num_tokentypes=0,
            transformer_layer_spec=bert_layer_local_spec,
            add_binary_head=False,  # masked LM only: the corpus has no sentence-order pairs
            **common,
        )
    from megatron.core.models.T5 import T5Model
    from megatron.core.models.T5.t5_spec import get_t5_decoder_with_local_block_spec, get_t5_encoder_with_local_block_spec

    encoder_layers = m.encoder_num_layers or m.num_layers
    decoder_layers = m.decoder_num_layers or m.num_layers
    return T5Model(
        config=_transformer_config(config, decoder_layers),
        encoder_config=_transformer_config(config, encoder_layers),
        transformer_encoder_layer_spec=get_t5_encoder_with_local_block_spec(encoder_layers),
        transformer_decoder_layer_spec=get_t5_decoder_with_local_block_spec(decoder_layers),
        **common,
    )


def token_losses(forward: Callable[..., Any], kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's per-token losses of one micro-batch (before the last pipeline stage: the
    stage's output hidden states)."""
    if kind == "gpt2":
        tokens = batch["tokens"]
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return forward(tokens, positions, batch["attention_mask"], labels=batch["labels"])
    if kind == "bert":
        losses, _ = forward(batch["tokens"], batch["padding_mask"], lm_labels=batch["labels"])
        return losses
    return forward(
        batch["encoder_tokens"],
        batch["decoder_tokens"],
        None,  # encoder self-attention: no padding
        batch["decoder_attention_mask"],
        None,  # cross-attention: no padding
        lm_labels=batch["labels"],
    )


def masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token loss over the masked tokens (all of them for GPT-2; masked ones for BERT/T5, as Megatron's)."""
    return (losses.float() * mask).sum() / mask.sum()


def compute_loss(engine, kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token loss of one micro-batch."""
    return masked_mean(token_losses(engine.forward, kind, batch), batch["loss_mask"])
