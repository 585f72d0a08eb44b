"""Pre-training batches from a token stream: causal (GPT-2), masked LM (BERT), span corruption (T5).

Sample ``g`` of the run is a fixed function of ``(seed, g)``: iteration ``i`` uses samples
``i·global_batch … (i+1)·global_batch − 1`` whatever the number of ranks, and rank ``r`` takes
micro-batch ``m``'s slice ``(m·world + r)·micro …``. So there is no iterator state to save: a
resumed run at iteration ``i`` sees exactly the batches an uninterrupted one would, and 1 or N
ranks train on the same global batches. Windows of the stream are visited in a fresh random order
each epoch; masking randomness is seeded per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dist_memopt.train.data import ByteTokenizer, TokenStream

__all__ = ["T5Lengths", "t5_lengths", "BatchMaker", "causal_mask"]


@dataclass(frozen=True)
class T5Lengths:
    raw: int  # stream tokens per sample
    noise: int  # tokens replaced by sentinels
    spans: int  # number of noise spans (= sentinels)

    @property
    def target(self) -> int:
        return self.noise + self.spans + 1  # sentinels, noise tokens, EOS


def t5_lengths(encoder_length: int, noise_density: float, mean_span: float) -> T5Lengths:
    """The raw window whose span-corrupted input (kept tokens + sentinels + EOS) is ``encoder_length``."""
    raw = encoder_length
    while True:
        noise = max(1, round(noise_density * raw))
        spans = max(1, round(noise / mean_span))
        length = raw - noise + spans + 1
        if length == encoder_length and raw - noise >= spans:
            return T5Lengths(raw, noise, spans)
        if length > encoder_length or raw > 4 * encoder_length:
            raise ValueError(f"no span-corruption window fits an encoder length of {encoder_length}")
        raw += 1


def causal_mask(length: int) -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True above the diagonal (Megatron masks where True)."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)[None, None]


def _partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split into ``parts`` positive lengths, uniformly at random."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.empty(0, int)
    return np.diff(np.concatenate(([0], cuts, [total])))


class BatchMaker:
    """Micro-batches for one rank: ``make(iteration, micro)`` → dict of CPU tensors."""

    def __init__(self, stream: TokenStream, config, rank: int, world_size: int) -> None:
        m, d = config.model, config.data
        self.kind = m.type
        self.stream = stream
        self.tokenizer = ByteTokenizer(m.vocab_extra_ids)
        self.seed = config.train.seed
        self.micro = config.train.micro_batch_size
        self.global_batch = config.train.global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seq_length = m.seq_length
        self.mask_prob = d.mask_prob
        if self.kind == "gpt2":
            self.window, stride = m.seq_length + 1, m.seq_length
        elif self.kind == "bert":
            self.window = stride = m.seq_length - 2  # [CLS] text [SEP]
        else:
            self.t5 = t5_lengths(m.seq_length, d.mask_prob, d.mean_noise_span_length)
            self.decoder_length = m.decoder_seq_length
            self.window = stride = self.t5.raw
        self.num_windows = (stream.num_tokens - self.window) // stride + 1
        if self.num_windows < 1:
            raise ValueError(f"the dataset holds {stream.num_tokens} tokens, fewer than one sample ({self.window})")
        self.stride = stride
        self._epoch: Optional[int] = None
        self._order = np.empty(0, dtype=np.int64)

    # --- sample order --------------------------------------------------------------------------

    def _window(self, sample: int) -> np.ndarray:
        epoch, index = divmod(sample, self.num_windows)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.num_windows)
            self._epoch = epoch
        return self.stream.read(int(self._order[index]) * self.stride, self.window)

    def samples(self, iteration: int, micro: int) -> range:
        first = iteration * self.global_batch + (micro * self.world_size + self.rank) * self.micro
        return range(first, first + self.micro)

    def tokens_per_sample(self) -> int:
        return self.seq_length + (self.decoder_length if self.kind == "t5" else 0)

    def make(self, iteration: int, micro: int) -> dict[str, torch.Tensor]:
        samples = self.samples(iteration, micro)
        build = {"gpt2": self._gpt, "bert": self._bert, "t5": self._t5}[self.kind]
        rows = [build(self._window(g), np.random.default_rng([self.seed, g])) for g in samples]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        if self.kind == "gpt2":
            batch["attention_mask"] = causal_mask(self.seq_length)
        elif self.kind == "t5":
            batch["decoder_attention_mask"] = causal_mask(self.decoder_length)
        return batch

    # --- one sample each -----------------------------------------------------------------------

    def _gpt(self, window: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"tokens": window[:-1], "labels": window[1:], "loss_mask": np.ones(self.seq_length, np.float32)}

    def _bert(self, window: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        tokens = np.concatenate(([tok.cls], window, [tok.sep]))
        labels = tokens.copy()
        loss_mask = np.zeros(len(tokens), np.float32)
        count = max(1, round(self.mask_prob * len(window)))
        positions = rng.choice(len(window), count, replace=False) + 1
        loss_mask[positions] = 1.0
        action = rng.random(count)
        replace = rng.integers(0, tok.num_bytes, count)
        tokens[positions] = np.where(action < 0.8, tok.mask, np.where(action < 0.9, replace, tokens[positions]))
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "padding_mask": np.ones(len(tokens), np.int64)}

    def _t5(self, window: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tok, lengths = self.tokenizer, self.t5
        noise = _partition(lengths.noise, lengths.spans, rng)
        keep = _partition(lengths.raw - lengths.noise, lengths.spans, rng)
        encoder, target, at = [], [], 0
        for i in range(lengths.spans):
            encoder.append(window[at : at + keep[i]])
            at += keep[i]
            encoder.append([tok.sentinel(i)])
            target.append([tok.sentinel(i)])
            target.append(window[at : at + noise[i]])
            at += noise[i]
        encoder.append([tok.eod])
        target.append([tok.eod])
        labels = np.full(self.decoder_length, tok.pad, np.int64)
        flat_target = np.concatenate(target)
        labels[: len(flat_target)] = flat_target
        decoder_input = np.concatenate(([tok.bos], labels[:-1]))
        loss_mask = np.zeros(self.decoder_length, np.float32)
        loss_mask[: len(flat_target)] = 1.0
        return {
            "encoder_tokens": np.concatenate(encoder).astype(np.int64),
            "decoder_tokens": decoder_input,
            "labels": labels,
            "loss_mask": loss_mask,
        }
