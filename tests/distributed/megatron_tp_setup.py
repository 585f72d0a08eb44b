"""A Megatron GPT (grouped-query attention, SwiGLU MLP, untied embeddings) at any TP/PP layout.

Shared by the tensor/pipeline-parallel tests and the CUDA test. Sizes do not divide evenly where
Megatron allows it (hidden 18 over 6 heads in 2 query groups, ffn 22: 11 per TP rank, vocab 50).
Gradients are injected as main gradients: every rank draws the same full TP=1 gradient per
parameter and step and places its piece into the parameter's ``main_grad`` (the reduced gradient
Megatron's optimizer reads), so the forward's reduction order cannot blur a TP=2-vs-TP=1 comparison.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

HIDDEN, HEADS, GROUPS, FFN, VOCAB, SEQ = 18, 6, 2, 22, 50, 9
LR, CLIP = 1e-2, 1.0
CONFIGS = {
    # name: (OptimizerConfig fields, keyword arguments of get_megatron_optimizer)
    "smmf": (dict(optimizer="smmf", weight_decay=0.1), {}),
    "alada": (dict(optimizer="alada", weight_decay=0.05, adam_beta2=0.9), dict(eps=1e-16)),
}


def init_parallel(tp: int = 1, pp: int = 1) -> None:
    from megatron.core import parallel_state

    from dist_memopt.integrations.megatron.cpu_shims import install_cpu_shims

    install_cpu_shims()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, pp)


def gpt(num_layers: int = 2, dtype: torch.dtype = torch.float32, sequence_parallel: bool = False) -> nn.Module:
    """The model for the current parallel state, initialized from seed 0 (Megatron's CPU
    initialization draws each full TP=1 weight and keeps this rank's piece: equal across layouts)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from dist_memopt.integrations.megatron.cpu_shims import model_parallel_manual_seed
    from dist_memopt.train.models import gpt_layer_spec  # sequence parallelism: norms that support it

    torch.manual_seed(0)
    model_parallel_manual_seed(0)
    config = TransformerConfig(
        num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        ffn_hidden_size=FFN, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        use_cpu_initialization=True, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel, hidden_dropout=0.0, attention_dropout=0.0, pipeline_dtype=dtype,
    )
    return GPTModel(
        config=config, transformer_layer_spec=gpt_layer_spec(num_layers, sequence_parallel), vocab_size=VOCAB, max_sequence_length=SEQ,
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
    )


def wrap_ddp(model: nn.Module, distributed_optimizer: bool, bucket_size: Optional[int] = 900) -> nn.Module:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=True,
        overlap_grad_reduce=bucket_size is not None, bucket_size=bucket_size,
    )
    return DistributedDataParallel(model.config, ddp_config, model)


def build(name: str, distributed_optimizer: bool, dtype: torch.dtype = torch.float32, num_layers: int = 2,
          sequence_parallel: bool = False, initial: Optional[dict[str, torch.Tensor]] = None,
          device: str = "cpu") -> tuple[nn.Module, Any]:
    """The model in Megatron DDP and its optimizer; ``initial``: full TP=1 weights by PP=1 name."""
    from megatron.core.optimizer import OptimizerConfig

    from dist_memopt.integrations.megatron import get_megatron_optimizer

    ddp = wrap_ddp(gpt(num_layers, dtype, sequence_parallel).to(device), distributed_optimizer)
    if initial is not None:
        with torch.no_grad():
            for param_name, param, piece in named_pieces(ddp):
                param.copy_(initial[param_name].reshape(-1)[positions(piece)].view(param.shape))
    fields, kwargs = CONFIGS[name]
    config = OptimizerConfig(lr=LR, clip_grad=CLIP, use_distributed_optimizer=distributed_optimizer,
                             bf16=dtype == torch.bfloat16, **fields)
    return ddp, get_megatron_optimizer(config, [ddp], **kwargs)


def global_name(name: str, layer_offset: int) -> str:
    """A parameter's name in the PP=1 model (a later stage numbers its layers from 0)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + layer_offset)
    return ".".join(parts)


def named_pieces(ddp: nn.Module) -> list[tuple[str, nn.Parameter, Any]]:
    """(PP=1 name, parameter, its TP piece) for every parameter of this rank's model."""
    from megatron.core import parallel_state

    from dist_memopt.integrations.megatron.tensor_parallel import TPPiece, Box, tp_pieces

    group = parallel_state.get_tensor_model_parallel_group()
    pieces = tp_pieces([ddp], group.rank(), group.size())
    offset = _layer_offset(ddp.module)
    out = []
    for name, param in ddp.module.named_parameters():
        piece = pieces.get(id(param)) or TPPiece(param.shape, (Box((0,) * param.dim(), tuple(param.shape)),))
        out.append((global_name(name, offset), param, piece))
    return out


def _layer_offset(model: nn.Module) -> int:
    layers = getattr(model.decoder, "layers", [])
    return layers[0].layer_number - 1 if len(layers) else 0


def full_grad(name: str, shape: torch.Size, step: int) -> torch.Tensor:
    seed = (sum(map(ord, name)) * 1009 + step) % (1 << 31)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def positions(piece: Any) -> torch.Tensor:
    """The piece's global flat positions, in local order."""
    from dist_memopt.shard.spec import ShardSpec

    return ShardSpec.of_runs(piece.global_shape, piece.runs()).take(torch.arange(math.prod(piece.global_shape)))


def inject(named: list, step: int) -> None:
    """Each parameter's piece of the step's full gradient, as its main gradient."""
    for name, param, piece in named:
        full = full_grad(name, piece.global_shape, step).reshape(-1)
        param.main_grad.copy_(full[positions(piece)].view(param.shape).to(param.main_grad.device))


def train(ddp: nn.Module, optimizer: Any, steps: range) -> list:
    named = named_pieces(ddp)
    returned = []
    for step in steps:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        inject(named, step)
        returned.append(optimizer.step())
    return returned


def local_weights(ddp: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]:
    """PP=1 name -> (TP=1 shape, global flat positions, local values in fp32) on this rank."""
    return {
        name: (tuple(piece.global_shape), positions(piece), param.detach().float().reshape(-1).cpu().clone())
        for name, param, piece in named_pieces(ddp)
    }


def assemble(per_rank: list[dict]) -> tuple[dict[str, torch.Tensor], float]:
    """Full parameters from every rank's pieces, and the largest disagreement between replicas."""
    full: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    disagreement = 0.0
    for weights in per_rank:
        for name, (shape, where, values) in weights.items():
            if name not in full:
                shapes[name] = shape
                full[name] = torch.full((math.prod(shape),), float("nan"))
                seen[name] = torch.zeros(math.prod(shape), dtype=torch.bool)
            already = seen[name][where]
            if already.any():
                disagreement = max(disagreement, (full[name][where][already] - values[already]).abs().max().item())
            full[name][where] = values
            seen[name][where] = True
    for name, mask in seen.items():
        assert mask.all(), f"{name}: no rank holds {int((~mask).sum())} of its elements"
    return {n: v.view(shapes[n]) for n, v in full.items()}, disagreement


def max_errors(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter, the largest difference relative to the parameter's scale (at least 1)."""
    assert set(got) == set(reference), set(got) ^ set(reference)
    return {n: (got[n].reshape(-1) - ref.reshape(-1)).abs().max().item() / max(1.0, ref.abs().max().item())
            for n, ref in reference.items()}


def bf16_spacings(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest difference, in units of the reference element's own bf16 spacing.

    bf16 weights are the fp32 main weights rounded. Main weights equal to fp32 rounding of the
    step's scale (1e-7 of the largest element) still round apart, by one spacing, wherever an
    element straddles a rounding boundary, and small elements have fine spacings: so bf16 layouts
    are held to one spacing per element (a wrong statistic moves updates by percent, many spacings).
    """
    worst = 0.0
    for name, ref in reference.items():
        ref, value = ref.reshape(-1).float(), got[name].reshape(-1).float()
        spacing = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0**-100))) - 7)
        worst = max(worst, ((value - ref).abs() / spacing).max().item())
    return worst


def save(ddp: nn.Module, optimizer: Any, path: str) -> None:
    """A Megatron distributed checkpoint (torch_dist) of the model and the optimizer."""
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    model_state = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state)}, path)


def load(ddp: nn.Module, optimizer: Any, path: str) -> None:
    from megatron.core import dist_checkpointing

    model_state = ddp.module.sharded_state_dict()
    wanted = {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True)}
    loaded = dist_checkpointing.load(wanted, path)
    ddp.module.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
