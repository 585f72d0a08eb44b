"""Framework adapters: each says where parameter shards lie and over which process group.

They hold no optimizer math. ``fsdp`` (FSDP2 DTensors, FSDP1 flat parameters) is loaded
automatically; ``deepspeed`` and ``megatron`` are imported by their users.
"""
