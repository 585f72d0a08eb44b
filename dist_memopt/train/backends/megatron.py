"""Megatron-core DDP + DistributedOptimizer backend: the next issue's (see ``BACKENDS``)."""

from __future__ import annotations


def build(model, config, context):
    raise NotImplementedError("parallel.backend megatron is not available in this build (see dist_memopt.train.backends)")
