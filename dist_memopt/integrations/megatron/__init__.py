"""Megatron-core integration: SMMF and Alada inside Megatron's optimizers, and CPU shims.

``get_megatron_optimizer`` (:mod:`.factory`) is a drop-in for
``megatron.core.optimizer.get_megatron_optimizer`` that also accepts ``optimizer='smmf'`` and
``'alada'``; with ``use_distributed_optimizer=True`` they step Megatron's data-parallel shards
(:mod:`.optimizers`), tensor-parallel pieces placed in the TP=1 parameter (:mod:`.tensor_parallel`),
and checkpoint through Megatron's distributed checkpointing
(:mod:`.sharded_state`). :mod:`.cpu_shims` replaces megatron-core's CUDA assumptions on CPU-only
machines. Importing this package needs megatron-core only when ``get_megatron_optimizer`` is used.
"""

from dist_memopt.integrations.megatron import checkpoint_style  # noqa: F401  (registers "megatron")
from dist_memopt.integrations.megatron.factory import OPTIMIZERS, get_megatron_optimizer, optimizer_arguments

__all__ = ["get_megatron_optimizer", "optimizer_arguments", "OPTIMIZERS"]
