"""A one-minute demo: a small character-level transformer trained with SMMF on local text.

The corpus is Python's own standard library source (present on every machine, nothing to
download). Prints the loss falling and the optimizer memory next to what AdamW would hold.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import time

import torch
from torch import nn

import dist_memopt as dm


def corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Bytes of the standard library's .py files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for directory, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py") and total < max_bytes:
                with open(os.path.join(directory, name), "rb") as f:
                    data = f.read(max_bytes - total)
                chunks.append(data)
                total += len(data)
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, width: int = 128, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.out(self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--optimizer", choices=["SMMF", "Alada", "AdamW"], default="SMMF")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = corpus()
    model = TinyLM()
    if args.optimizer == "AdamW":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    else:
        optimizer = getattr(dm, args.optimizer)(model.parameters(), lr=args.lr)
    numel = sum(p.numel() for p in model.parameters())
    print(f"TinyLM: {numel / 1e6:.2f}M parameters, {len(data) / 1e6:.1f}M bytes of stdlib source, {args.optimizer}")
    g = torch.Generator().manual_seed(0)
    start, first = time.time(), None
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(data) - 65, (32,), generator=g)
        batch = torch.stack([data[i : i + 65] for i in idx])
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first or loss.item()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - start:.0f}s)")
    held = dm.state_bytes(optimizer)
    adamw = 2 * 4 * numel
    print(f"loss {first:.3f} -> {loss.item():.3f}")
    print(
        f"optimizer state: {held / 2**20:.3f} MiB with {args.optimizer}, AdamW would hold "
        f"{adamw / 2**20:.2f} MiB ({100 * (1 - held / adamw):.1f}% saved)"
    )


if __name__ == "__main__":
    main()
