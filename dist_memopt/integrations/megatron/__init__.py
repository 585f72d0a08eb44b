"""Megatron-core integration: CPU shims for megatron-core's CUDA assumptions (``cpu_shims``).

Megatron's own DDP + DistributedOptimizer support (the inner optimizer on
``param_range_map`` shards) belongs in this package too.
"""
