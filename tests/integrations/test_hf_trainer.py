"""HF Trainer (transformers 5.24, accelerate 1.15): SMMF and Alada through optimizer_cls_and_kwargs,
in one process, under DDP, under accelerate's FSDP2 and with DeepSpeed ZeRO-2 by name, equal a plain
one-process loop."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dist_memopt as dm  # noqa: E402
from harness import Launch  # noqa: E402
from trainer_models import TOLERANCE, max_error, reference, samples, state, tiny_gpt2  # noqa: E402

STEPS, PER_DEVICE, LR, WD = 4, 4, 1e-3, 0.1  # at lr 1e-2 AdamW itself is 2.6e-5 off under DDP (summation order)
KWARGS = {"SMMF": dict(lr=LR, beta=0.9, eps=1e-8), "Alada": dict(lr=LR, betas=(0.9, 0.9), eps=1e-16)}


def _args(folder: str, per_device: int, **extra) -> "transformers.TrainingArguments":
    return transformers.TrainingArguments(
        output_dir=folder, per_device_train_batch_size=per_device, max_steps=STEPS, learning_rate=LR,
        weight_decay=WD, lr_scheduler_type="constant", max_grad_norm=0.0, train_sampling_strategy="sequential",
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, **{"use_cpu": True, **extra},
    )


def _trainer(folder: str, per_device: int, optimizer: tuple | None = None, **extra) -> "transformers.Trainer":
    return transformers.Trainer(model=tiny_gpt2(), args=_args(folder, per_device, **extra), train_dataset=samples(),
                                optimizer_cls_and_kwargs=optimizer)


def _reference(name: str, world: int, grouped: bool = True) -> dict[str, torch.Tensor]:
    cls = getattr(dm, name)
    if grouped:  # Trainer's two groups: no decay on biases and norms
        return reference(lambda m: cls(dm.decay_param_groups(m, WD), **KWARGS[name]), PER_DEVICE * world, STEPS)
    return reference(lambda m: cls(m.parameters(), weight_decay=WD, **KWARGS[name]), PER_DEVICE * world, STEPS)


@pytest.mark.parametrize("name", ["SMMF", "Alada"])
def test_trainer_one_process_equals_plain_loop(name, tmp_path):
    trainer = _trainer(str(tmp_path), 2 * PER_DEVICE, (getattr(dm, name), KWARGS[name]))
    start = state(trainer.model)
    trainer.train()
    error = max_error(state(trainer.model), _reference(name, 2), start)
    assert error <= TOLERANCE, error


def test_alada_momentum_in_grad_is_refused_under_trainer(tmp_path):
    """Trainer clears .grad with model.zero_grad() and clips it: the momentum kept there would be lost."""
    trainer = _trainer(str(tmp_path), PER_DEVICE, (dm.Alada, dict(KWARGS["Alada"], momentum_in_grad=True)))
    start = state(trainer.model)
    with pytest.raises(RuntimeError, match="without optimizer.zero_grad\\(\\) since the start.*model.zero_grad\\(\\).*momentum_in_grad=False"):
        trainer.train()
    assert all(torch.equal(v, start[n]) for n, v in state(trainer.model).items())


def _distributed(rank: int, world: int, folder: str, variant: str) -> dict:
    # HF reads ACCELERATE_USE_CPU when TrainingArguments are built; with it, HF would drop DeepSpeed
    if variant == "ddp":
        os.environ["ACCELERATE_USE_CPU"] = "true"
        trainer = _trainer(folder, PER_DEVICE, (dm.SMMF, KWARGS["SMMF"]))
    else:  # "optimizer" named in the ds_config, as the HF docs show ("auto" lr, weight decay and clipping are safe)
        os.environ.pop("ACCELERATE_USE_CPU", None)
        import dist_memopt.integrations.deepspeed  # noqa: F401  registers "SMMF" with DeepSpeed

        config = {
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "optimizer": {"type": "SMMF", "params": {"lr": "auto", "weight_decay": "auto", "beta": 0.9, "eps": 1e-8}},
            "zero_optimization": {"stage": 2},
        }
        trainer = _trainer(folder, PER_DEVICE, deepspeed=config, use_cpu=False)  # use_cpu=True would drop DeepSpeed
    trainer.train()
    engine = trainer.model_wrapped
    if variant == "ddp":
        return dict(params=state(trainer.model), data_ranks=trainer.accelerator.num_processes, engine=type(engine).__name__)
    (partition,) = engine.optimizer.optimizer.param_groups[0]["params"]  # ZeRO-2: this rank's flat fp32 partition
    return dict(params={n: p.detach().clone() for n, p in engine.module.named_parameters()}, engine=type(engine).__name__,
                data_ranks=trainer.accelerator.num_processes, partition=partition.numel(), optimizer=type(engine.optimizer.optimizer).__name__)


@pytest.mark.parametrize("variant", ["ddp", "deepspeed-zero2"])
def test_trainer_distributed_equals_one_process(variant, two_ranks):
    results = two_ranks.case(variant)
    numel = sum(p.numel() for p in tiny_gpt2().parameters())
    if variant == "ddp":
        assert results[0]["engine"] == "DistributedDataParallel" and results[0]["data_ranks"] == 2
    else:
        assert results[0]["engine"] == "DeepSpeedEngine" and results[0]["optimizer"] == "SMMF"
        assert sum(r["partition"] for r in results) >= numel > results[0]["partition"]  # the state is partitioned
    # accelerate 1.15 runs DeepSpeed on a CPU-only machine with no data parallelism (each rank draws the
    # same batches, data_ranks == 1) while ZeRO still partitions the optimizer: the reference follows it.
    # HF hands a ds_config optimizer one group of all parameters: biases and norms are decayed too.
    expected = _reference("SMMF", results[0]["data_ranks"], grouped=variant == "ddp")
    for got in results:
        error = max_error(got["params"], expected)
        print(f"{variant}: {error:.3g}")
        assert error <= TOLERANCE, error


class _Recording:
    """Records the type of every parameter the optimizer was built with (FSDP2 swaps them later)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.built_with = sorted({type(p).__name__ for g in self.param_groups for p in g["params"]})


RECORDING = {name: type(name, (_Recording, getattr(dm, name)), {}) for name in KWARGS}


def _allow_fsdp_on_cpu() -> None:
    """accelerate 1.15 keeps an FSDP plugin only for accelerator devices: in ``AcceleratorState.__init__``
    the branch that sets ``distributed_type = FSDP`` and ``fsdp_plugin`` is reached only when the
    distributed type is in a list of MULTI_GPU/NPU/XPU/... that lacks MULTI_CPU, so on CPU the plugin
    is dropped without a word and Trainer trains DDP. This does what that skipped branch does; the
    FSDP2 wrapping, the optimizer's parameter swap and the training stay accelerate's own."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.state.AcceleratorState.__init__ = __init__


def _accelerate_fsdp2(rank: int, world: int, folder: str) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "true"
    _allow_fsdp_on_cpu()
    out = {}
    for name in KWARGS:
        trainer = _trainer(f"{folder}/{name}", PER_DEVICE, (RECORDING[name], KWARGS[name]), fsdp=True, fsdp_config={"fsdp_version": 2})
        trainer.train()
        optimizer = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer around ours
        out[name] = dict(params=state(trainer.model), built_with=optimizer.built_with, distributed=str(trainer.accelerator.distributed_type),
                         stepped_on=sorted({type(p).__name__ for g in optimizer.param_groups for p in g["params"]}),
                         local=sum(p.to_local().numel() for p in trainer.model.parameters()))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank launch: DDP, accelerate's FSDP2 (SMMF, then Alada), DeepSpeed ZeRO-2 (last: it is
    launched without ACCELERATE_USE_CPU, which would make HF drop DeepSpeed)."""
    folder = str(tmp_path_factory.mktemp("hf"))
    cases = {
        "ddp": (_distributed, (f"{folder}/ddp", "ddp")),
        "accelerate-fsdp2": (_accelerate_fsdp2, (f"{folder}/fsdp2",)),
        "deepspeed-zero2": (_distributed, (f"{folder}/ds", "deepspeed-zero2")),
    }
    return Launch(cases, 2, timeout=400, env={"DS_ACCELERATOR": "cpu"})


@pytest.mark.parametrize("name", ["SMMF", "Alada"])
def test_trainer_accelerate_fsdp2_equals_one_process(name, two_ranks):
    """The optimizer is built on the plain parameters; accelerate swaps them for DTensor shards."""
    numel = sum(p.numel() for p in tiny_gpt2().parameters())
    expected = _reference(name, 2)
    for got in (run[name] for run in two_ranks.case("accelerate-fsdp2")):
        assert got["distributed"] == "DistributedType.FSDP", got["distributed"]
        assert got["built_with"] == ["Parameter"] and got["stepped_on"] == ["DTensor"], (got["built_with"], got["stepped_on"])
        assert got["local"] < numel  # each rank holds a shard
        error = max_error(got["params"], expected)
        print(f"accelerate FSDP2 {name}: {error:.3g}")
        assert error <= TOLERANCE, error
