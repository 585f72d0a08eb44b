"""Megatron's optimizer wrappers around SMMF and Alada: where each shard lies, and checkpoints.

Megatron-core wraps an inner ``torch.optim.Optimizer`` in ``DistributedOptimizer`` (data-parallel
sharding of fp32 main parameters), ``Float16OptimizerWithFloat16Params`` (bf16/fp16 model, fp32
main copies) or ``FP32Optimizer``. Those wrappers do grad copies, loss scaling, clipping and the
parameter all-gather; the subclasses here keep all of that and only (1) tell SMMF/Alada where each
tensor they step lies in its model parameter and over which process group, and (2) save and load
their state with Megatron's distributed checkpointing (:mod:`.sharded_state`).

The distributed optimizer gives each rank one contiguous range of every parameter (its part of
each bucket's data-parallel shard), skipping parameters whose range is empty there. SMMF and Alada
complete row/column statistics with one all_reduce over the buffer's data-parallel group, which
every rank of that group must join with the same statistic layout. So every parameter is stepped on
every rank, in the model's parameter order: a rank that holds none of a parameter steps an empty
tensor in its place.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from dist_memopt.integrations.megatron.sharded_state import (
    SHARDING_TYPE,
    StateEntry,
    group_settings,
    load_param_state,
    restore_group_settings,
    sharded_param_state,
)
from dist_memopt.integrations.megatron.tensor_parallel import TPPiece, piece_spec
from dist_memopt.optim.base import FactoredOptimizer
from dist_memopt.shard.spec import Segment, set_layout

from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

__all__ = ["FactoredDistributedOptimizer", "FactoredFloat16Optimizer", "FactoredFP32Optimizer"]

_TORCH_FORMAT_UNSUPPORTED = (
    "the distributed optimizer's torch-format parameter state (save_parameter_state / "
    "get_parameter_state_dp_zero) is laid out for Adam's exp_avg/exp_avg_sq; checkpoint SMMF and "
    "Alada with Megatron's distributed checkpointing (sharded_state_dict, --ckpt-format torch_dist)"
)


class _TensorParallel:
    """What every wrapper knows about tensor parallelism: each parameter's piece and the group."""

    pieces: dict[int, TPPiece] = {}
    tp_group: Any = None
    expert_tp_group: Any = None

    def _tp_setup(self, pieces: Optional[dict[int, TPPiece]], tp_group: Any, expert_tp_group: Any = None) -> None:
        self.pieces, self.tp_group, self.expert_tp_group = pieces or {}, tp_group, expert_tp_group

    def _spec(self, model_param: Tensor, window: Optional[tuple[int, int]], dp_group: Any) -> Any:
        """The shard description of (``window`` of) ``model_param``'s piece, statistics over its groups."""
        return piece_spec(model_param.shape, self.pieces.get(id(model_param)), window, self.tp_group, dp_group, self.expert_tp_group)

    def _declare_whole(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        """(stepped tensor, model parameter): each stepped tensor is its parameter's whole TP piece."""
        for tensor, model_param in pairs:
            spec = self._spec(model_param, None, None)
            set_layout(tensor, [Segment(0, spec)], checkpoint="megatron")

    def _tp_rank(self) -> int:
        return self.tp_group.rank() if self.tp_group is not None else 0

    def _entry(self, tensor: Tensor, model_param: Tensor, elements: Optional[tuple[int, int]]) -> StateEntry:
        piece = self.pieces.get(id(model_param))
        tp_rank = None  # the wrapper's tensor-parallel rank
        if piece is not None and piece.expert:
            tp_rank = self.expert_tp_group.rank() if self.expert_tp_group is not None else 0
        return StateEntry(tensor, model_param, elements, piece, tp_rank)


class _FactoredCheckpointing(_TensorParallel):
    """``sharded_state_dict``/``load_state_dict`` for a Megatron wrapper of SMMF or Alada."""

    optimizer: Optional[FactoredOptimizer]
    grad_scaler: Any
    is_stub_optimizer: bool

    def _state_entries(self) -> list[StateEntry]:
        raise NotImplementedError

    def _instance_id(self) -> int:
        return 0

    def _common_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"optimizer": {"param_groups": group_settings(self.optimizer)}}
        if self.grad_scaler:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False, metadata: Optional[dict] = None, **_: Any) -> dict:
        """The optimizer part of a Megatron distributed checkpoint (any requested sharding type
        gives this model-space format; see :mod:`dist_memopt.integrations.megatron.sharded_state`)."""
        if self.is_stub_optimizer:
            return {}
        state = self._common_state()
        state["param_state"] = sharded_param_state(
            self.optimizer, self._state_entries(), model_sharded_state_dict, self._instance_id(), self._tp_rank()
        )
        state["param_state_sharding_type"] = SHARDING_TYPE
        return state

    def _load_factored_state(self, state_dict: dict) -> None:
        if self.is_stub_optimizer:
            return
        restore_group_settings(self.optimizer, state_dict["optimizer"]["param_groups"])
        if self.grad_scaler and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        if "param_state" in state_dict:
            load_param_state(self.optimizer, self._state_entries(), state_dict["param_state"])

    @staticmethod
    def _is_factored_checkpoint(state_dict: Any) -> bool:
        return isinstance(state_dict, dict) and state_dict.get("param_state_sharding_type") == SHARDING_TYPE


class FactoredDistributedOptimizer(_FactoredCheckpointing, DistributedOptimizer):
    """Megatron's ``DistributedOptimizer`` with SMMF or Alada stepping its fp32 main-param shards.

    Same arguments as ``DistributedOptimizer``; ``optimizer`` is the SMMF/Alada instance built on
    Megatron's parameter groups (or None on a rank without trainable parameters).
    """

    def __init__(
        self,
        optimizer: Optional[FactoredOptimizer],
        config: Any,
        grad_scaler: Any,
        init_state_fn: Optional[Callable],
        model_chunks: list,
        per_model_buffers: dict,
        data_parallel_group: torch.distributed.ProcessGroup,
        data_parallel_group_gloo: Optional[torch.distributed.ProcessGroup],
        data_parallel_group_idx: int,
        distributed_optimizer_instance_id: int,
        pieces: Optional[dict[int, TPPiece]] = None,
        tp_group: Any = None,
        expert_tp_group: Any = None,
    ) -> None:
        # Megatron's constructor accepts only Adam (for its Adam-shaped checkpoints, replaced here).
        # It gets a stand-in over the same groups, builds its ranges and shards, and SMMF/Alada take
        # the stand-in's place on those shards.
        stand_in = None
        if optimizer is not None:
            stand_in = torch.optim.AdamW([{"params": list(group["params"])} for group in optimizer.param_groups])
        super().__init__(
            stand_in, config, grad_scaler, init_state_fn, model_chunks, per_model_buffers,
            data_parallel_group, data_parallel_group_gloo, data_parallel_group_idx, distributed_optimizer_instance_id,
        )
        self._entries: list[StateEntry] = []
        self._tp_setup(pieces, tp_group, expert_tp_group)
        if optimizer is not None:
            self.optimizer = optimizer
            self._seat_on_shards()

    def _seat_on_shards(self) -> None:
        """Replace each group's model parameters by their shards here, declaring each shard's range."""
        shard_of: dict[int, Tensor] = {}
        for model_groups, shard_groups in (
            (self.model_float16_groups, self.shard_fp32_from_float16_groups),
            (self.model_fp32_groups, self.shard_fp32_groups),
        ):
            for models, shards in zip(model_groups, shard_groups):
                shard_of.update((id(model), shard) for model, shard in zip(models, shards))
        dp_group_of = {id(p): buffer.data_parallel_group for buffer in self.buffers for p in buffer.param_index_map}
        for group_index, (group, group_range) in enumerate(zip(self.optimizer.param_groups, self.opt_group_ranges)):
            tensors, names = [], []
            for model_param in group["params"]:  # the model's parameters, in the same order on every rank
                name = self._param_name(model_param)
                dp_group = dp_group_of[id(model_param)]
                shard = shard_of.get(id(model_param))
                if shard is None:  # this rank owns no element of it
                    shard, start, end = _empty_shard(model_param), 0, 0
                else:
                    elements = self._get_model_param_range_map(model_param)["param"]
                    start, end = elements.start, elements.end
                    self.model_param_group_index_map[model_param] = (group_index, len(tensors))
                spec = self._spec(model_param, (start, end), dp_group)
                set_layout(shard, [Segment(0, spec, name)], checkpoint="megatron")
                self._entries.append(self._entry(shard, model_param, (start, end)))
                tensors.append(shard)
                names.append(name)
            group["params"], group["param_names"] = tensors, names
            group_range["orig_group"] = group

    def _state_entries(self) -> list[StateEntry]:
        return self._entries

    def _collect_main_grad_data_for_unscaling(self) -> list[Tensor]:
        """Megatron's list of gradients to unscale, without the empty stand-ins (they have none)."""
        return [p.grad.data for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _instance_id(self) -> int:
        return self.distributed_optimizer_instance_id

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and loss scale; parameter state goes through :meth:`sharded_state_dict`."""
        return {} if self.is_stub_optimizer else self._common_state()

    def load_state_dict(self, state_dict: dict) -> None:
        self._load_factored_state(state_dict)

    def save_parameter_state(self, filename: str) -> None:
        raise NotImplementedError(_TORCH_FORMAT_UNSUPPORTED)

    def load_parameter_state(self, filename: str, *, update_legacy_format: bool = False) -> None:
        raise NotImplementedError(_TORCH_FORMAT_UNSUPPORTED)

    def get_parameter_state_dp_zero(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_TORCH_FORMAT_UNSUPPORTED)


def _empty_shard(model_param: Tensor) -> Tensor:
    """An empty fp32 tensor standing for a parameter of which this rank owns no element.

    It has no gradient (so it stays out of Megatron's norm, clipping and zero counting); SMMF and
    Alada step an empty sharded tensor without one.
    """
    return torch.zeros(0, dtype=torch.float32, device=model_param.device)


class FactoredFloat16Optimizer(_FactoredCheckpointing, Float16OptimizerWithFloat16Params):
    """Megatron's bf16/fp16 optimizer (fp32 main copies of whole parameters) with SMMF or Alada."""

    def __init__(self, optimizer: Optional[FactoredOptimizer], config: Any, grad_scaler: Any, init_state_fn: Callable,
                 pieces: Optional[dict[int, TPPiece]] = None, tp_group: Any = None, expert_tp_group: Any = None) -> None:
        super().__init__(optimizer, config, grad_scaler, init_state_fn)
        self._tp_setup(pieces, tp_group, expert_tp_group)
        if optimizer is not None:
            self._declare_whole([(entry.tensor, entry.model_param) for entry in self._state_entries()])

    def _state_entries(self) -> list[StateEntry]:
        model_of = {
            id(main): model
            for models, mains in zip(self.float16_groups, self.fp32_from_float16_groups)
            for model, main in zip(models, mains)
        }
        return [self._entry(p, model_of.get(id(p), p), None) for group in self.optimizer.param_groups for p in group["params"]]

    def load_state_dict(self, state_dict: dict) -> None:
        if self._is_factored_checkpoint(state_dict):
            self._load_factored_state(state_dict)
        else:  # a torch-format checkpoint written by state_dict()
            super().load_state_dict(state_dict)


class FactoredFP32Optimizer(_FactoredCheckpointing, FP32Optimizer):
    """Megatron's fp32 optimizer (whole model parameters, no main copies) with SMMF or Alada."""

    grad_scaler = None

    def __init__(self, optimizer: Optional[FactoredOptimizer], config: Any, init_state_fn: Callable,
                 pieces: Optional[dict[int, TPPiece]] = None, tp_group: Any = None, expert_tp_group: Any = None) -> None:
        super().__init__(optimizer, config, init_state_fn)
        self._tp_setup(pieces, tp_group, expert_tp_group)
        if optimizer is not None:
            self._declare_whole([(p, p) for group in optimizer.param_groups for p in group["params"]])

    def _state_entries(self) -> list[StateEntry]:
        return [self._entry(p, p, None) for group in self.optimizer.param_groups for p in group["params"]]

    def load_state_dict(self, state_dict: dict) -> None:
        if self._is_factored_checkpoint(state_dict):
            self._load_factored_state(state_dict)
        else:
            super().load_state_dict(state_dict)
