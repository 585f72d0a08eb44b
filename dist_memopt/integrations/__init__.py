"""Framework adapters: each says where parameter shards lie and over which process group.

They hold no optimizer math. ``dtensor`` (FSDP2, HSDP, tensor parallelism) and ``fsdp`` (FSDP1
flat parameters) register their layout resolvers and checkpoint styles when ``dist_memopt`` is
imported; ``deepspeed``, ``megatron`` and ``torchtitan`` (a container that resolves our names) are
imported by their users. HF Trainer, accelerate and Lightning need no adapter: they take the
optimizers as they are (docs/frameworks/).
"""

from dist_memopt.integrations import dtensor, fsdp  # noqa: F401  (register their layout resolvers)
