"""Framework adapters: each says where parameter shards lie and over which process group.

They hold no optimizer math. ``fsdp`` (FSDP2 DTensors, FSDP1 flat parameters) is loaded
automatically; ``deepspeed``, ``megatron`` and ``torchtitan`` (a container that resolves our names)
are imported by their users. HF Trainer, accelerate and Lightning need no adapter: they take the
optimizers as they are (README, *Trainers*).
"""
