"""Lightning 2.6.6: SMMF from configure_optimizers under strategy="ddp" and ModelParallelStrategy
(FSDP2 over the data-parallel mesh) on 2 gloo ranks equals a plain one-process loop."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import dist_memopt as dm  # noqa: E402
from harness import Launch  # noqa: E402
from trainer_models import TOLERANCE, max_error, reference, samples, state, tiny_gpt2  # noqa: E402

STEPS, PER_DEVICE, LR, WD = 4, 4, 1e-3, 0.1
KWARGS = dict(lr=LR, beta=0.9, eps=1e-8)


class TinyGPT2(pl.LightningModule):
    """The user's module: Trainer groups (no decay on biases and norms) for SMMF."""

    def __init__(self, fsdp2: bool = False) -> None:
        super().__init__()
        self.model = tiny_gpt2()
        self.fsdp2 = fsdp2

    def configure_model(self) -> None:  # ModelParallelStrategy: shard over the data-parallel mesh
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return dm.SMMF(dm.decay_param_groups(self.model, WD), **KWARGS)


def _fit(rank: int, world: int, folder: str, variant: str) -> dict[str, torch.Tensor]:
    from torch.utils.data import DataLoader

    if variant == "ddp":
        strategy = "ddp"
    else:
        strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    module = TinyGPT2(fsdp2=variant != "ddp")
    from torch.utils.data.distributed import DistributedSampler

    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=folder, use_distributed_sampler=False)
    # Lightning's own sampler shuffles here; rank r takes samples r, r + 2, ...: step k covers [8k, 8k + 8)
    sampler = DistributedSampler(samples(), num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(samples(), batch_size=PER_DEVICE, sampler=sampler)
    trainer.fit(module, loader)
    sharded = any(hasattr(p, "full_tensor") for p in module.model.parameters())
    return dict(params=state(module.model), sharded=sharded)


VARIANTS = ["ddp", "model-parallel-fsdp2"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank launch fitting each variant in turn."""
    folder = str(tmp_path_factory.mktemp("lightning"))
    return Launch({variant: (_fit, (f"{folder}/{variant}", variant)) for variant in VARIANTS}, 2, timeout=400)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lightning_equals_one_process(variant, two_ranks):
    results = two_ranks.case(variant)
    expected = reference(lambda m: dm.SMMF(dm.decay_param_groups(m, WD), **KWARGS), 2 * PER_DEVICE, STEPS)
    for result in results:
        assert result["sharded"] == (variant != "ddp")
        error = max_error(result["params"], expected)
        print(f"{variant}: {error:.3g}")
        assert error <= TOLERANCE, error
