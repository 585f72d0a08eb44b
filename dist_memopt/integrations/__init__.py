"""Framework adapters: each says where parameter shards lie and over which process group.

They hold no optimizer math. ``dtensor`` (FSDP2, HSDP, tensor parallelism) and ``fsdp`` (FSDP1
flat parameters) register their layout resolvers when ``dist_memopt`` is imported; ``deepspeed``
and ``megatron`` are imported by their users.
"""

from dist_memopt.integrations import dtensor, fsdp  # noqa: F401  (register their layout resolvers)
