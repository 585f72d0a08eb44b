"""Build a Megatron indexed dataset (.bin/.idx, byte-level tokens, EOD after each document).

    dist-memopt-build-dataset --input DIR_OR_FILE [...] --output-prefix PATH [--glob '*.txt']
    dist-memopt-build-dataset --stdlib --output-prefix PATH   # the built-in corpus

Each input file is one document. Use the prefix as ``data.data_path`` in a config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from dist_memopt.train.data import build_indexed_dataset, stdlib_files

__all__ = ["main"]


def _inputs(paths: list[str], pattern: str) -> list[Path]:
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob(pattern) if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {name}: no such file or directory")
    return files


def main(argv: Optional[list[str]] = None) -> int:
    """The command line (``argv``: its arguments, default ``sys.argv[1:]``); returns the exit status."""
    p = argparse.ArgumentParser(prog="dist-memopt-build-dataset", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="text files or directories (searched recursively)")
    source.add_argument("--stdlib", action="store_true", help="the Python standard library's .py files")
    p.add_argument("--glob", default="*", help="file pattern inside input directories (default: all files)")
    p.add_argument("--max-bytes", type=int, default=None, help="with --stdlib: stop after this many bytes")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    args = p.parse_args(argv)
    try:
        files = stdlib_files(args.max_bytes) if args.stdlib else _inputs(args.input, args.glob)
    except FileNotFoundError as e:
        p.error(str(e))
    if not files:
        p.error("no input files found")
    count = build_indexed_dataset((f.read_bytes() for f in files), args.output_prefix)
    size = Path(args.output_prefix + ".bin").stat().st_size // 2
    print(f"wrote {args.output_prefix}.bin/.idx: {count} documents, {size:,} tokens (byte-level, EOD appended)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
