"""Parameter shapes of the papers' models, taken from transformers configs on the meta device.

Nothing is downloaded: a model is constructed under ``torch.device("meta")`` only to read the
names and shapes of its parameters, with tied weights (GPT-2's ``lm_head``/``wte``, BERT's MLM
decoder/word embeddings, T5's ``lm_head``/``shared``) counted once, as an optimizer sees them.
:func:`materialize` then makes real fp32 parameters of those shapes, with random gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["ModelShapes", "MODELS", "model_shapes", "parse_models", "shapes_of", "materialize"]


@dataclass(frozen=True)
class ModelShapes:
    """The distinct parameters an optimizer of ``key``'s model receives."""

    key: str
    title: str
    params: tuple[tuple[str, torch.Size], ...]
    tied: tuple[tuple[str, str], ...] = ()  # (alias, the parameter it shares storage with)

    @property
    def numel(self) -> int:
        return sum(shape.numel() for _, shape in self.params)


def shapes_of(key: str, title: str, model: nn.Module) -> ModelShapes:
    """Distinct parameters of ``model`` (a tied weight is listed once, under its first name)."""
    first_name: dict[int, str] = {}
    params, tied = [], []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first_name:
            tied.append((name, first_name[id(p)]))
            continue
        first_name[id(p)] = name
        params.append((name, torch.Size(p.shape)))
    return ModelShapes(key, title, tuple(params), tuple(tied))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config())


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig())


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=32128, d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64
    )
    return T5ForConditionalGeneration(config)


def _tiny() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=101, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _awkward() -> nn.Module:
    """A scalar, a vector, a prime-sized and an uneven matrix, a conv kernel: small and full column blocks."""
    shapes = [(), (7,), (13, 7), (3, 5, 3, 3), (48, 160)]
    return nn.ParameterList([nn.Parameter(torch.empty(s)) for s in shapes])


def _many() -> nn.Module:
    """A thousand 256 x 256 matrices and a thousand 256-vectors: what a deep, narrow model hands an
    optimizer, where the per-tensor cost of a step shows."""
    return nn.ParameterList([nn.Parameter(torch.empty(s)) for _ in range(1000) for s in ((256, 256), (256,))])


#: key -> (title, builder); the builder runs under the meta device
MODELS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "gpt2": ("GPT-2 small (GPT2LMHeadModel, GPT2Config() defaults)", _gpt2),
    "bert": ("BERT-base (BertForMaskedLM: encoder + MLM head, BertConfig() defaults)", _bert),
    "t5": ("T5-small (T5ForConditionalGeneration, t5-small sizes)", _t5),
    "tiny": ("tiny GPT-2 (2 layers, width 32, vocab 101; for tests and smoke runs)", _tiny),
    "awkward": ("awkward shapes (a scalar, a vector, 13x7, a 3x5x3x3 conv kernel, 48x160; for tests)", _awkward),
    "many": ("2,000 small tensors (1,000 of 256x256 and 1,000 of 256; 65.8M elements)", _many),
}


def model_shapes(key: str) -> ModelShapes:
    if key not in MODELS:
        raise ValueError(f"unknown model {key!r} (known: {', '.join(MODELS)})")
    title, build = MODELS[key]
    with torch.device("meta"):
        model = build()
    return shapes_of(key, title, model)


def parse_models(text: str) -> list[str]:
    """``"gpt2,bert"`` -> ``["gpt2", "bert"]``; ValueError naming any unknown model."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise ValueError("--models needs at least one model name")
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {', '.join(unknown)} (known: {', '.join(MODELS)})")
    return keys


#: the parameter dtypes the benchmarks' ``--*-dtype`` options offer
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def materialize(
    shapes: ModelShapes, device: torch.device | str = "cpu", seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[nn.Parameter]:
    """Real parameters of these shapes (N(0, 0.02), fp32 unless ``dtype``) with N(0, 1e-3) gradients."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _, shape in shapes.params:
        p = nn.Parameter(torch.randn(shape, generator=generator, device=device).mul_(0.02).to(dtype))
        p.grad = torch.randn(shape, generator=generator, device=device).mul_(1e-3).to(dtype)
        params.append(p)
    return params
