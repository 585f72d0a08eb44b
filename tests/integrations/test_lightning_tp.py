"""Lightning 2.6.6 ModelParallelStrategy with tensor parallelism: SMMF and Alada from
configure_optimizers on FSDP2 × TP DTensors (tp=2 on 2 gloo ranks) equal a one-process loop.

The model is the 2-D tests' (tests/distributed/tp_cases.py: column- and row-wise layers, embeddings
sharded on dim 0 and dim 1, a norm replicated over tp), parallelized in ``configure_model`` the way
Lightning's docs show; every rank sees the same batches (data-parallel size 1).
"""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import dist_memopt as dm  # noqa: E402
from harness import Launch  # noqa: E402
from tp_cases import PLAN, TPModel  # noqa: E402

STEPS, TOLERANCE = 4, 1e-6
OPTIMIZERS = {"SMMF": dict(lr=1e-2, weight_decay=0.1), "Alada": dict(lr=1e-2, weight_decay=0.05)}


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 11, (4, 6), generator=generator) for _ in range(STEPS)]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TPModel()


class TensorParallelModule(pl.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.model, self.optimizer_name = _model(), optimizer

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(self.model, self.device_mesh["tensor_parallel"], PLAN)
        fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        return self.model(batch).square().mean()

    def configure_optimizers(self):
        return getattr(dm, self.optimizer_name)(self.model.parameters(), **OPTIMIZERS[self.optimizer_name])


def _fit(rank: int, world: int, folder: str, optimizer: str) -> dict[str, torch.Tensor]:
    strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=world)
    module = TensorParallelModule(optimizer)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=folder, use_distributed_sampler=False)
    trainer.fit(module, torch.utils.data.DataLoader(_batches(), batch_size=None))
    placements = str(module.model.down.weight.placements)
    return dict(params={n: p.full_tensor().detach().clone() for n, p in module.model.named_parameters()}, placements=placements)


def _one_process(optimizer: str) -> dict[str, torch.Tensor]:
    model = _model()
    opt = getattr(dm, optimizer)(model.parameters(), **OPTIMIZERS[optimizer])
    for batch in _batches():
        opt.zero_grad()
        model(batch).square().mean().backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank launch fitting each optimizer in turn."""
    folder = str(tmp_path_factory.mktemp("lightning-tp"))
    return Launch({name: (_fit, (f"{folder}/{name}", name)) for name in OPTIMIZERS}, 2, timeout=400)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_lightning_tensor_parallel_equals_one_process(optimizer, two_ranks):
    expected = _one_process(optimizer)
    initial = {n: p.detach() for n, p in _model().named_parameters()}
    assert any(not torch.equal(initial[n], v) for n, v in expected.items())
    for result in two_ranks.case(optimizer):
        assert "Shard(dim=1)" in result["placements"]  # the row-wise weight really is a column block
        errors = {n: (result["params"][n] - v).abs().max().item() / max(1.0, v.abs().max().item()) for n, v in expected.items()}
        worst = max(errors, key=errors.get)
        print(f"{optimizer}: largest difference {errors[worst]:.3g} ({worst})")
        assert errors[worst] <= TOLERANCE, f"{optimizer} {worst}: off by {errors[worst]:.3g}"
