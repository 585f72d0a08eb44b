"""A Megatron GPT with MoE layers (SequentialMLP experts) at any TP / expert-TP / EP layout.

Two transformer layers, each an MoE MLP of NUM_EXPERTS gated (SwiGLU) experts with biases, on top
of megatron_tp_setup's attention (grouped-query, TP-split). Megatron's expert weights are split
over the expert tensor-parallel group (``linear_fc1``: a gate and an up block per rank;
``linear_fc2``: a column block; ``linear_fc2.bias`` replicated) and, with expert parallelism, each
EP rank holds NUM_EXPERTS / EP of the experts. Full TP=1 weights and gradients are drawn per global
parameter name (a local expert's name carries its *global* index) and each rank takes its piece, so
every layout starts from the same weights and steps on the same gradients; megatron_tp_setup's
helpers (positions, assemble, max_errors) put the pieces back together.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import megatron_tp_setup as mt

NUM_EXPERTS, MOE_FFN, TOPK = 4, 10, 2  # 5 of the 10 per expert-TP rank


def init_parallel(tp: int = 1, etp: int = 1, ep: int = 1) -> None:
    from megatron.core import parallel_state

    from dist_memopt.integrations.megatron.cpu_shims import install_cpu_shims

    install_cpu_shims()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)


def gpt_moe(num_layers: int = 2) -> nn.Module:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from dist_memopt.integrations.megatron.cpu_shims import model_parallel_manual_seed

    torch.manual_seed(0)
    model_parallel_manual_seed(0)
    config = TransformerConfig(
        num_layers=num_layers, hidden_size=mt.HIDDEN, num_attention_heads=mt.HEADS, num_query_groups=mt.GROUPS,
        ffn_hidden_size=mt.FFN, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        num_moe_experts=NUM_EXPERTS, moe_ffn_hidden_size=MOE_FFN, moe_router_topk=TOPK, moe_grouped_gemm=False,
        moe_token_dispatcher_type="allgather", add_bias_linear=False,  # Megatron: MoE biases need ETP=1
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
    )
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False),
        vocab_size=mt.VOCAB, max_sequence_length=mt.SEQ, share_embeddings_and_output_weights=False,
    )


def global_name(name: str) -> str:
    """A parameter's name at EP=1: a local expert's index replaced by its global one."""
    from megatron.core import parallel_state

    parts = name.split(".")
    if "local_experts" in parts:
        at = parts.index("local_experts") + 1
        local = NUM_EXPERTS // parallel_state.get_expert_model_parallel_world_size()
        parts[at] = str(parallel_state.get_expert_model_parallel_rank() * local + int(parts[at]))
    return ".".join(parts)


def named_pieces(ddp: nn.Module) -> list[tuple[str, nn.Parameter, Any]]:
    """(EP=1 name, parameter, its piece) for every parameter, pieces as get_megatron_optimizer finds them."""
    from dist_memopt.integrations.megatron.factory import tensor_parallel_pieces
    from dist_memopt.integrations.megatron.tensor_parallel import Box, TPPiece

    pieces = tensor_parallel_pieces([ddp])
    out = []
    for name, param in ddp.module.named_parameters():
        piece = pieces.get(id(param)) or TPPiece(param.shape, (Box((0,) * param.dim(), tuple(param.shape)),))
        out.append((global_name(name), param, piece))
    return out


def initial_weight(name: str, shape: torch.Size) -> torch.Tensor:
    seed = (sum(map(ord, name)) * 7919 + 17) % (1 << 31)
    return 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def build(name: str, distributed_optimizer: bool) -> tuple[nn.Module, Any, list]:
    """The MoE model in Megatron DDP (every rank's piece of the same full weights), its optimizer,
    and its named pieces."""
    from megatron.core.optimizer import OptimizerConfig

    from dist_memopt.integrations.megatron import get_megatron_optimizer

    ddp = mt.wrap_ddp(gpt_moe(), distributed_optimizer)
    named = named_pieces(ddp)
    with torch.no_grad():
        for param_name, param, piece in named:
            full = initial_weight(param_name, piece.global_shape).reshape(-1)
            param.copy_(full[mt.positions(piece)].view(param.shape))
    fields, kwargs = mt.CONFIGS[name]
    config = OptimizerConfig(lr=mt.LR, clip_grad=mt.CLIP, use_distributed_optimizer=distributed_optimizer, **fields)
    return ddp, get_megatron_optimizer(config, [ddp], **kwargs), named


def train(ddp: nn.Module, optimizer: Any, named: list, steps: range) -> list:
    returned = []
    for step in steps:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        mt.inject(named, step)
        returned.append(optimizer.step())
    return returned


def local_weights(named: list) -> dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]:
    """EP=1 name -> (TP=1 shape, global flat positions, local values) on this rank."""
    return {
        name: (tuple(piece.global_shape), mt.positions(piece), param.detach().float().reshape(-1).clone())
        for name, param, piece in named
    }
