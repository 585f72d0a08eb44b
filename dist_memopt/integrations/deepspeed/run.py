"""Run an unchanged DeepSpeed training script with the integration imported first.

Every rank must import :mod:`dist_memopt.integrations.deepspeed` before ``deepspeed.initialize``
so that ``"type": "SMMF"`` / ``"Alada"`` resolve. Scripts that do not import it themselves can be
started through this module::

    deepspeed --module dist_memopt.integrations.deepspeed.run train.py --deepspeed_config ds.json
    torchrun --nproc-per-node 2 -m dist_memopt.integrations.deepspeed.run train.py ...
    dist-memopt-deepspeed train.py ...     # console script (pip install -e . puts it on PATH)

The ``deepspeed`` launcher puts ``--local_rank=N`` before the script when given ``--module``;
it is handed on to the script, after its name, as the launcher would have done.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Optional, Sequence

__all__ = ["main", "split_arguments"]

USAGE = "usage: python -m dist_memopt.integrations.deepspeed.run [--local_rank=N] (SCRIPT | -m MODULE) [ARGS...]"


def split_arguments(argv: Sequence[str]) -> tuple[str, bool, list[str]]:
    """``(target, is_module, argv for the target)`` from this runner's command line."""
    launcher_args: list[str] = []
    args = list(argv)
    while args and args[0].startswith("--local_rank"):
        launcher_args.append(args.pop(0))
        if launcher_args[-1] == "--local_rank" and args:
            launcher_args.append(args.pop(0))
    is_module = bool(args) and args[0] == "-m"
    if is_module:
        args.pop(0)
    if not args or args[0].startswith("-"):
        raise SystemExit(USAGE)
    target = args.pop(0)
    return target, is_module, [target, *launcher_args, *args]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Import the integration, then run the script or module named in ``argv`` as ``__main__``."""
    argv = sys.argv[1:] if argv is None else argv
    if list(argv) in (["-h"], ["--help"]):
        print(USAGE + "\n\n" + __doc__.strip())
        return
    target, is_module, script_argv = split_arguments(argv)
    import dist_memopt.integrations.deepspeed  # noqa: F401  (registers SMMF / Alada with DeepSpeed)

    sys.argv = script_argv
    if is_module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(target))  # as `python SCRIPT` would
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
