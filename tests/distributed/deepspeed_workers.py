"""What each rank runs in the DeepSpeed tests: real engines, one process launch per world size.

``run_cases(rank, world, cases, workdir)`` builds one engine after another in the same process
(DeepSpeed's first ``initialize`` costs seconds, later ones milliseconds) and returns, per case,
what the test asserts on; an exception in a case is returned as its traceback so that the other
cases still report.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from deepspeed_cases import OPTIMIZER_PARAMS, ds_config, ds_model, make_optimizer, rank_loss
from kernel_cases import KernelNames


def _observe(engine) -> KernelNames:
    engine.basic_optimizer.kernel_observer = observer = KernelNames()
    return observer


def _offloads(engine) -> bool:
    """Whether ZeRO keeps the optimizer's partitions and step on the host (ZeRO-Offload)."""
    return bool(getattr(engine.optimizer, "cpu_offload", False) or getattr(engine.optimizer, "offload_optimizer", False))


def _engine(config: dict, optimizer: Any = None):
    import deepspeed

    import dist_memopt.integrations.deepspeed  # noqa: F401  (registers SMMF / Alada)

    model = ds_model()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config, optimizer=optimizer
    )
    return engine, model


def _train(engine, rank: int, steps: range, accumulation: int = 1) -> None:
    for step in steps:
        for micro in range(accumulation):
            engine.backward(rank_loss(engine, step, rank, micro))
            engine.step()


def _full_fp32(engine, model) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master weights, through DeepSpeed's own helper."""
    from deepspeed.utils import safe_get_full_fp32_param

    wrapper = engine.optimizer  # stage 0 fp16/bf16: FP16_UnfusedOptimizer keeps whole fp32 copies
    masters = {id(lp): hp for lps, hps in zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", [])) for lp, hp in zip(lps, hps)}
    out = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (masters.get(id(p), p) if full is None else full).detach().float().clone()
    return out


def _layout_facts(engine) -> list[dict[str, Any]]:
    return [
        {
            "group_index": layout.group_index,
            "numel": layout.tensor.numel(),
            "segments": [(s.name, tuple(s.spec.global_shape), s.offset, s.spec.start, s.spec.end) for s in layout.segments],
        }
        for layout in getattr(engine, "dist_memopt_layouts", [])
    ]


# --- cases ----------------------------------------------------------------------------------


def exact(rank: int, world: int, workdir: str, name: str, stage: int, **extra: Any) -> dict:
    """10 steps by name from ds_config; full fp32 weights, the declared layouts, the kernels run."""
    engine, model = _engine(ds_config(stage, name, **extra))
    observer = _observe(engine)
    _train(engine, rank, range(10))
    result = {"full": _full_fp32(engine, model), "layouts": _layout_facts(engine), "wrapper": type(engine.optimizer).__name__}
    result.update(kernels=sorted(observer.names), offload=_offloads(engine))
    engine.destroy()
    return result


def by_instance(rank: int, world: int, workdir: str, name: str, stage: int, **extra: Any) -> dict:
    """The client passes an optimizer instance; no zero_allow_untested_optimizer anywhere."""
    model_for_params = ds_model()
    config = ds_config(stage, **extra)
    import deepspeed

    import dist_memopt.integrations.deepspeed  # noqa: F401

    optimizer = make_optimizer(name, model_for_params.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model_for_params, config=config, optimizer=optimizer)
    observer = _observe(engine)
    _train(engine, rank, range(10))
    result = {"full": _full_fp32(engine, model_for_params), "basic": type(engine.basic_optimizer).__name__}
    result.update(kernels=sorted(observer.names), offload=_offloads(engine))
    engine.destroy()
    return result


def bad_params(rank: int, world: int, workdir: str) -> str:
    """A ds_config optimizer param SMMF does not have: the error must name the valid ones."""
    config = ds_config(2, "SMMF")
    config["optimizer"]["params"] = {"lr": 1e-3, "betas": [0.9, 0.99]}
    try:
        _engine(config)
    except ValueError as error:
        return str(error)
    return "no error"


def without_layouts(rank: int, world: int, workdir: str, name: str, stage: int) -> dict:
    """Negative control: what ``zero_allow_untested_optimizer`` would do (factorize each flat
    partition as one 1-D parameter). The comparison must fail by far for the test to mean anything."""
    from dist_memopt.shard.spec import Segment, ShardSpec, set_layout

    engine, model = _engine(ds_config(stage, name))
    for layout in engine.dist_memopt_layouts:
        set_layout(layout.tensor, [Segment(0, ShardSpec.full(layout.tensor.shape))])
    _train(engine, rank, range(10))
    result = {"full": _full_fp32(engine, model)}
    engine.destroy()
    return result


def accumulate_clip_schedule(rank: int, world: int, workdir: str, name: str, stage: int) -> dict:
    """Gradient accumulation, clipping and a ds_config scheduler, as for DeepSpeed's Adam."""
    config = ds_config(
        stage,
        gradient_accumulation_steps=2,
        gradient_clipping=0.05,
        scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 4}},
    )
    if name == "AdamW":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}}
    else:
        config["optimizer"] = {"type": name, "params": OPTIMIZER_PARAMS[name]}
    engine, model = _engine(config)
    _train(engine, rank, range(8), accumulation=2)
    lrs = [group["lr"] for group in engine.optimizer.param_groups]
    result = {"full": _full_fp32(engine, model), "lr": lrs, "norm": engine.get_global_grad_norm()}
    engine.destroy()
    return result


def _optimizer_state(optimizer) -> list[dict[str, torch.Tensor]]:
    optimizer.synchronize()  # SMMF completes its last reduction lazily
    # by optimizer.state, not param_groups: ZeRO-3 puts its tensors there only during step()
    return [{k: v.clone() for k, v in state.items()} for state in optimizer.state.values()]


def fp16_overflow(rank: int, world: int, workdir: str, name: str, stage: int) -> dict:
    """fp16 with dynamic loss scaling; rank 0's gradients overflow at step 3 (inf loss)."""
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels (not on this
    # machine's CPU), though torch computes fp16 on any CPU: lift that capability probe. All of
    # DeepSpeed's fp16 code (loss scaler, overflow check, skipped step) runs unchanged.
    get_accelerator().is_fp16_supported = lambda: True
    engine, model = _engine(ds_config(stage, name, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1}))
    optimizer = engine.basic_optimizer
    _train(engine, rank, range(3))
    state_before = _optimizer_state(optimizer)
    weights_before = _full_fp32(engine, model)
    scale_before = engine.optimizer.loss_scale
    loss = rank_loss(engine, 3, rank)
    engine.backward(loss * float("inf") if rank == 0 else loss)
    engine.step()
    result = {
        "state_unchanged": _same(state_before, _optimizer_state(optimizer)),
        "weights_unchanged": _same([weights_before], [_full_fp32(engine, model)]),
        "skipped": engine.skipped_steps,
        "scale": (scale_before, engine.optimizer.loss_scale),
    }
    _train(engine, rank, range(4, 7))
    result["moved_on"] = not _same(state_before, _optimizer_state(optimizer))
    result["skipped_after"] = engine.skipped_steps
    result["state_keys"] = [sorted(s) for s in state_before]
    engine.destroy()
    return result


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def resume(rank: int, world: int, workdir: str, name: str, stage: int, **extra: Any) -> dict:
    """save at step 5 → new engine loads → steps 5..9, against the same engine going on."""
    config = ds_config(stage, name, **extra)
    folder = os.path.join(workdir, f"ckpt-{name}-{stage}-{'-'.join(sorted(extra))}")
    engine, model = _engine(config)
    _train(engine, rank, range(5))
    engine.save_checkpoint(folder, tag="step5")
    _train(engine, rank, range(5, 10))
    uninterrupted = _full_fp32(engine, model)
    engine.destroy()
    engine, model = _engine(config)
    engine.load_checkpoint(folder, tag="step5")
    _train(engine, rank, range(5, 10))
    resumed = _full_fp32(engine, model)
    offload = _offloads(engine)
    engine.destroy()
    return {"uninterrupted": uninterrupted, "resumed": resumed, "folder": folder, "offload": offload}


def state_helpers(rank: int, world: int, workdir: str, name: str, stage: int) -> dict:
    """deepspeed.utils.safe_get/set_full_optimizer_state on per-element and factor keys."""
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    engine, model = _engine(ds_config(stage, name))
    _train(engine, rank, range(10))
    element_key = {"Alada": "exp_avg", "SMMF": None}[name]
    result: dict[str, Any] = {"full": _full_fp32(engine, model), "state": {}, "errors": {}}
    if element_key:
        for pname, p in model.named_parameters():
            result["state"][pname] = safe_get_full_optimizer_state(p, element_key).clone()
        target = model.proj.weight
        value = torch.arange(target.numel(), dtype=torch.float32).view(target.shape)
        safe_set_full_optimizer_state(target, value, element_key)
        result["set_then_get"] = torch.equal(safe_get_full_optimizer_state(target, element_key), value)
    for key in {"Alada": ("row", "v0"), "SMMF": ("row_v", "sign", "exp_avg")}[name]:
        try:
            safe_get_full_optimizer_state(model.proj.weight, key)
            result["errors"][key] = None
        except ValueError as error:
            result["errors"][key] = str(error)
    engine.destroy()
    return result


def universal_resume(rank: int, world: int, workdir: str, name: str, stage: int, folder: str, tag: str, **extra: Any) -> dict:
    """Load a universal checkpoint written from another DP size (and ZeRO stage); steps 5..9."""
    engine, model = _engine(ds_config(stage, name, checkpoint={"load_universal": True}, **extra))
    engine.load_checkpoint(folder, tag=tag)
    loaded_step = engine.global_steps
    _train(engine, rank, range(5, 10))
    result = {"full": _full_fp32(engine, model), "global_steps": loaded_step, "wrapper": type(engine.optimizer).__name__}
    engine.destroy()
    return result


def plain_load_on_other_size(rank: int, world: int, workdir: str, name: str, stage: int, folder: str, tag: str) -> str:
    """A plain ZeRO checkpoint of another DP size: the error must say how to convert it."""
    engine, _ = _engine(ds_config(stage, name))
    try:
        engine.load_checkpoint(folder, tag=tag)
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return f"{type(error).__name__}: {error}"
    finally:
        engine.destroy()
    return "no error"


def moe(rank: int, world: int, workdir: str, name: str, stage: int, ep_size: int) -> dict:
    """A DeepSpeed MoE layer: experts in their own param group, partitioned over the expert
    data-parallel group. Stage ``stage`` against stage 0 (whole parameters, plain data parallel)."""
    import deepspeed
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.utils import groups

    import dist_memopt.integrations.deepspeed  # noqa: F401

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(8, 16)
            self.moe = MoE(hidden_size=16, expert=torch.nn.Linear(16, 16), num_experts=2, ep_size=ep_size, k=1, min_capacity=16)
            self.out = torch.nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.moe(torch.tanh(self.inp(x)))[0]).squeeze(-1)

    result: dict[str, Any] = {}
    for zero_stage in (0, stage):
        torch.manual_seed(0)
        model = Net()
        params = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "dense"})
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config(zero_stage, name))
        for step in range(6):
            generator = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(16, 8, generator=generator), torch.randn(16, generator=generator)
            engine.backward((engine(x) - y).pow(2).mean())
            engine.step()
        result[zero_stage] = _full_fp32(engine, model)
        if zero_stage:
            expert_group = groups._get_expert_data_parallel_group(f"ep_size_{ep_size}")
            result["groups"] = []
            for layout in engine.dist_memopt_layouts:  # (which are experts, reduced over, its size)
                group = layout.segments[0].spec.group
                experts = ["experts" in segment.name for segment in layout.segments]
                result["groups"].append((experts, group is expert_group, dist.get_world_size(group)))
        engine.destroy()
    return result


CASES: dict[str, Callable[..., Any]] = {
    "moe": moe,
    "universal_resume": universal_resume,
    "plain_load_on_other_size": plain_load_on_other_size,
    "fp16_overflow": fp16_overflow,
    "resume": resume,
    "state_helpers": state_helpers,
    "exact": exact,
    "by_instance": by_instance,
    "bad_params": bad_params,
    "without_layouts": without_layouts,
    "accumulate_clip_schedule": accumulate_clip_schedule,
}


def run_cases(rank: int, world: int, cases: list[tuple[str, str, dict]], workdir: str) -> dict[str, Any]:
    """Run ``(key, case name, kwargs)`` cases in order; ``{key: result or traceback string}``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results: dict[str, Any] = {}
    for key, case, kwargs in cases:
        try:
            results[key] = CASES[case](rank, world, workdir, **kwargs)
        except Exception:  # noqa: BLE001 - reported by the test that asserts on this case
            results[key] = CaseFailure(traceback.format_exc())
        dist.barrier()
    return results


class CaseFailure(str):
    """A case's traceback (a str, so it pickles)."""
