"""Megatron's checkpoint form for SMMF/Alada state (the layouts' ``checkpoint="megatron"``).

Per-element state is laid out like the optimizer tensor's local data (signs as int8, one per
element), so it maps onto the model parameter's elements as Adam's moments do; the factors,
identical on every rank of the group, are kept as they are (see :mod:`.sharded_state`).
"""

from __future__ import annotations

import torch

from dist_memopt.optim.checkpoint import CheckpointStyle, register_checkpoint_style

register_checkpoint_style(CheckpointStyle("megatron", torch.int8))
