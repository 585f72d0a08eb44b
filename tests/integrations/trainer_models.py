"""A tiny GPT-2 built from a config (nothing downloaded), fixed batches, and the one-process reference
that every trainer's run is held to: the same optimizer, a plain loop, the same global batches."""

from __future__ import annotations

from typing import Any, Callable

import torch

SEQ, VOCAB, SAMPLES = 16, 64, 32
TOLERANCE = 1e-6


def tiny_gpt2() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def samples() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=generator)
    labels = ids.clone()
    labels[:, 0] = -100  # never a target; HF Trainer's token count (its loss divisor) then equals the model's
    return [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]


def reference(build: Callable[[torch.nn.Module], torch.optim.Optimizer], global_batch: int, steps: int) -> dict[str, torch.Tensor]:
    """Final parameters of a plain one-process loop over consecutive global batches, in order."""
    model = tiny_gpt2()
    optimizer = build(model)
    data = samples()
    for step in range(steps):
        rows = data[step * global_batch : (step + 1) * global_batch]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return state(model)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def max_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], start: dict[str, Any] | None = None) -> float:
    """Largest difference relative to each parameter's scale (at least 1); asserts it trained."""
    assert got.keys() == expected.keys()
    worst = 0.0
    for name, value in expected.items():
        scale = max(1.0, value.abs().max().item())
        worst = max(worst, (got[name] - value).abs().max().item() / scale)
    if start is not None:
        assert any(not torch.equal(start[n], v) for n, v in expected.items())
    return worst
