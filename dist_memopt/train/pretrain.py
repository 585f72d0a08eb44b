"""Pre-train BERT, GPT-2 or T5 from a config: ``python -m dist_memopt.train.pretrain --config FILE [--set k=v ...]``.

One rank of a run (console script ``dist-memopt-pretrain``). Start it with ``torchrun
--nproc_per_node N``, the ``deepspeed`` launcher, ``mpirun -n N``, or alone;
:mod:`dist_memopt.train.run` picks the launcher from the config. The configuration is validated
before any process group exists.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from dist_memopt.train.config import ConfigError, load_config, to_yaml
from dist_memopt.train.distributed import discover

__all__ = ["parser", "main"]


def parser() -> argparse.ArgumentParser:
    """The command line's options."""
    p = argparse.ArgumentParser(prog="dist-memopt-pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML run configuration (configs/...)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override settings, e.g. --set train.lr=3e-4 train.seed=2 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="resume from the latest checkpoint of this run, or from the given iter_* directory")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Validate the config, then run this rank's part of the training; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        world_size = None if args.print_config else discover().world_size
        config = load_config(args.config, args.overrides, world_size=world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    from dist_memopt.train.loop import run

    run(config, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
