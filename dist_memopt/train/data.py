"""Text → Megatron indexed dataset (.bin/.idx) → a token stream that batches are cut from.

Tokenization is byte-level: token ids 0–255 are the UTF-8 bytes, followed by a few special tokens
and (for T5) sentinel tokens. No vocabulary file, nothing to download or train. Every document
(one text file) is stored followed by an end-of-document token, as Megatron's
``preprocess_data.py --append-eod`` does, so the .bin file read in order is one token stream.

The built-in corpus is the Python standard library's own ``.py`` files (present on every
machine), in sorted order; it is built once per Python installation and cached (atomically, so
concurrent ranks or runs are safe) under ``data.cache_dir``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

__all__ = [
    "ByteTokenizer",
    "stdlib_files",
    "build_indexed_dataset",
    "default_dataset",
    "TokenStream",
    "cache_dir",
]

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens 0–255, then PAD, EOD, CLS, SEP, MASK, BOS and ``extra_ids`` sentinels."""

    extra_ids: int = 0

    pad = 256
    eod = 257
    cls = 258
    sep = 259
    mask = 260
    bos = 261
    num_bytes = 256

    @property
    def vocab_size(self) -> int:
        return 262 + self.extra_ids

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.extra_ids:
            raise IndexError(f"sentinel {i} out of range: the tokenizer has {self.extra_ids} extra ids")
        return 262 + i

    def encode(self, text: bytes | str) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < self.num_bytes).decode("utf-8", errors="replace")


def cache_dir(configured: Optional[str] = None) -> Path:
    return Path(configured or os.environ.get("DIST_MEMOPT_CACHE") or Path.home() / ".cache" / "dist_memopt")


def stdlib_files(max_bytes: Optional[int] = None) -> list[Path]:
    """The standard library's ``.py`` files in a fixed order, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files.extend(Path(directory) / n for n in sorted(names) if n.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def build_indexed_dataset(documents: Iterable[bytes], output_prefix: str | os.PathLike) -> int:
    """Write ``documents`` (tokenized byte-level, EOD appended) as ``prefix.bin``/``prefix.idx``.

    Written to temporary files and renamed into place (``.idx`` last), so a reader never sees a
    partial dataset. Returns the number of documents.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokenizer = ByteTokenizer()
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix.name + ".", dir=prefix.parent)
    os.close(fd)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=np.uint16)
    count = 0
    try:
        for doc in documents:
            tokens = np.append(tokenizer.encode(doc), np.uint16(tokenizer.eod))
            builder.add_document(tokens, [len(tokens)])
            count += 1
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", str(prefix) + ".bin")
        os.replace(tmp + ".idx", str(prefix) + ".idx")
    finally:
        for suffix in ("", ".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    return count


def _read_files(paths: Iterable[Path]) -> Iterator[bytes]:
    for path in paths:
        yield path.read_bytes()


def default_dataset(cache: Optional[str] = None, max_bytes: Optional[int] = None) -> Path:
    """The cached stdlib dataset's prefix, built first if needed (deterministic for this Python)."""
    files = stdlib_files(max_bytes)
    digest = hashlib.sha256()
    digest.update(f"byte-eod-v1 {sys.version} {max_bytes}".encode())
    for path in files:
        digest.update(f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}\n".encode())
    prefix = cache_dir(cache) / "datasets" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{digest.hexdigest()[:12]}"
    if not Path(str(prefix) + ".idx").exists():
        build_indexed_dataset(_read_files(files), prefix)
    return prefix


class TokenStream:
    """An indexed dataset's documents, end to end, read by global token position.

    Positions map to (document, offset) through cumulative document lengths; a read may span
    documents. Nothing is loaded up front beyond the index (the .bin file is memory-mapped).
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if not IndexedDataset.exists(str(prefix)):
            raise FileNotFoundError(f"data.data_path: no indexed dataset {prefix}.bin/.idx")
        self.dataset = IndexedDataset(str(prefix))
        lengths = self.dataset.sequence_lengths.astype(np.int64)
        self.starts = np.concatenate(([0], np.cumsum(lengths)))
        self.num_tokens = int(self.starts[-1])

    def read(self, position: int, length: int) -> np.ndarray:
        if position < 0 or position + length > self.num_tokens:
            raise IndexError(f"tokens [{position}, {position + length}) outside a stream of {self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        doc = int(np.searchsorted(self.starts, position, side="right")) - 1
        while filled < length:
            offset = position + filled - int(self.starts[doc])
            take = min(length - filled, int(self.starts[doc + 1]) - position - filled)
            out[filled : filled + take] = self.dataset.get(doc, offset, take)
            filled += take
            doc += 1
        return out
