"""SMMF and Alada in Megatron-core's DDP + DistributedOptimizer on CUDA (NCCL): megatron-core's own
CUDA code paths, no shims. Skipped without CUDA; on CPU the same checks run in test_megatron.py.

One rank per GPU: 1 rank (the distributed optimizer's shards are whole parameters) and, with two
GPUs, 2 ranks (Megatron's byte-range shards, statistics reduced over NCCL), and the tensor-parallel
GPT of megatron_tp_setup at TP=2 against TP=1 x DP=2 on the same injected main gradients. After 10 steps the fp32
weights equal one process running the same optimizer on the same GPU (tolerance 1e-6 of the
parameter scale); a distributed checkpoint written at step 5 resumes to the same weights; bf16
parameters with fp32 main shards equal the bf16 single-process run. Run it with ``pytest -s`` to see
the measured differences.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core")

import megatron_setup as ms  # noqa: E402
import megatron_tp_setup as mt  # noqa: E402
from harness import run_distributed  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (megatron-core's CUDA/NCCL paths); the CPU checks are in test_megatron.py"
)

STEPS = 10
SAVE_AT = 5
TOLERANCE = 1e-6


def _error(got: dict, expected: dict) -> float:
    """Largest difference relative to the parameter scale (1 for small parameters)."""
    return max((got[n] - v).abs().max().item() / max(1.0, v.abs().max().item()) for n, v in expected.items())


def _build(name: str, dtype: torch.dtype = torch.float32, **fields):
    from dist_memopt.integrations.megatron import get_megatron_optimizer

    ddp = ms.wrap_ddp(ms.megatron_model(dtype, device="cuda"))
    return ddp, get_megatron_optimizer(ms.optimizer_config(name, **fields), [ddp], **ms.OPTIMIZERS[name][1])


def _cuda_runs(rank: int, world_size: int, root: str) -> dict:
    from megatron.core import dist_checkpointing

    ms.init_parallel()  # the CPU shims stay out of the way: CUDA is present
    torch.backends.cudnn.deterministic = True  # the conv kernel's backward, for the resume comparison
    errors: dict = {}
    for name in ms.OPTIMIZERS:
        reference, norms = ms.train_reference(name, STEPS, device="cuda")
        ddp, optimizer = _build(name)
        returned = ms.train_megatron(ddp, optimizer, range(SAVE_AT), device="cuda")
        path = f"{root}/{name}"
        os.makedirs(path, exist_ok=True)
        model_state = ddp.module.sharded_state_dict()
        dist_checkpointing.save({"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state)}, path)
        returned += ms.train_megatron(ddp, optimizer, range(SAVE_AT, STEPS), device="cuda")
        straight = ms.model_weights(ddp)

        ddp, optimizer = _build(name)
        model_state = ddp.module.sharded_state_dict()
        loaded = dist_checkpointing.load(
            {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True)}, path
        )
        ddp.module.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        ms.train_megatron(ddp, optimizer, range(SAVE_AT, STEPS), device="cuda")
        resumed = ms.model_weights(ddp)
        errors[name] = dict(
            single_process=_error(straight, reference),
            resume=_error(resumed, straight),
            norms=max(abs(r[1] - n) / n for r, n in zip(returned, norms)),
            success=all(r[0] is True for r in returned),
        )
    for name in ("smmf-adamw", "alada"):
        reference, _ = ms.train_reference(name, STEPS, torch.bfloat16, device="cuda")
        ddp, optimizer = _build(name, torch.bfloat16, bf16=True)
        ms.train_megatron(ddp, optimizer, range(STEPS), torch.bfloat16, device="cuda")
        errors[f"{name}-bf16"] = dict(single_process=_error(ms.main_weights(ddp, optimizer), reference))
    return errors


@pytest.mark.parametrize("world_size", [1, 2])
def test_cuda_distributed_optimizer_equals_single_process(world_size, tmp_path):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"{world_size} ranks need {world_size} GPUs (NCCL runs one rank per GPU)")
    for rank, errors in enumerate(run_distributed(_cuda_runs, world_size, str(tmp_path), timeout=600, daemon=False, backend="nccl")):
        for name, error in errors.items():
            print(f"rank {rank} {name}: {error}")  # the numbers for the record (pytest -s)
            assert error["single_process"] <= TOLERANCE, (rank, name, error)
            if "resume" in error:
                # exact on CPU (test_megatron.py); on GPUs kernels may round differently run to run
                assert error["resume"] <= TOLERANCE and error["norms"] <= 1e-5 and error["success"], (rank, name, error)


TP_RUNS = (("smmf", True), ("alada", False))  # (optimizer, distributed optimizer)


def _cuda_tensor_parallel(rank: int, world_size: int) -> dict:
    """TP=1 x DP=2, then TP=2 x DP=1: each rank's final weights per run (megatron's CUDA paths)."""
    out: dict = {}
    for tp in (1, 2):
        mt.init_parallel(tp)
        for name, distributed in TP_RUNS:
            ddp, optimizer = mt.build(name, distributed, device="cuda")
            mt.train(ddp, optimizer, range(STEPS))
            out[tp, name, distributed] = mt.local_weights(ddp)
    return out


def test_cuda_tensor_parallel_equals_tp1():
    """Megatron TP=2 on two GPUs (NCCL) gives TP=1's parameters (CPU checks: test_megatron_tensor_parallel.py)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("TP=2 needs 2 GPUs (NCCL runs one rank per GPU)")
    results = run_distributed(_cuda_tensor_parallel, 2, timeout=600, daemon=False, backend="nccl")
    for name, distributed in TP_RUNS:
        expected, _ = mt.assemble([results[0][1, name, distributed]])
        got, disagreement = mt.assemble([r[2, name, distributed] for r in results])
        errors = mt.max_errors(got, expected)
        worst = max(errors, key=errors.get)
        print(f"CUDA TP=2 {name} distributed={distributed}: {errors[worst]:.3g} ({worst}), replicas {disagreement:.3g}")
        assert errors[worst] <= TOLERANCE and disagreement <= TOLERANCE, (name, distributed, worst, errors[worst])
