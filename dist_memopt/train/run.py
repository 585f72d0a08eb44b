"""Start the pre-training ranks with the launcher the config names (``parallel.launcher``, ``parallel.nproc``).

    dist-memopt-run --config configs/tiny/gpt2.yaml [--set k=v ...] [--resume] [--dry-run]
    python -m dist_memopt.train.run ...   # the same; ``python -m launch.run`` from a checkout

torchrun, the deepspeed launcher and mpirun are taken from this Python's environment (the
``mpich`` wheel puts ``mpirun`` there), so the venv's versions run. ``launcher: none`` runs in this
process. The config is validated here first, so mistakes fail before anything starts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import dist_memopt
from dist_memopt.train.config import ConfigError, check_world_size, load_config
from dist_memopt.train.distributed import free_port

__all__ = ["PRETRAIN", "launch_command", "main"]

#: the module each rank runs
PRETRAIN = "dist_memopt.train.pretrain"


def _tool(name: str) -> str:
    """The launcher next to this interpreter (the venv's), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def launch_command(launcher: str, nproc: int, pretrain_args: list[str], port: Optional[int] = None) -> list[str]:
    """The command line that starts ``nproc`` ranks of ``python -m dist_memopt.train.pretrain`` via ``launcher``."""
    port = port or free_port()
    if launcher == "torchrun":
        return [_tool("torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port}", "-m", PRETRAIN, *pretrain_args]
    if launcher == "deepspeed":
        # Hosts default to localhost; --num_gpus counts ranks (CPU accelerator included).
        return [_tool("deepspeed"), f"--num_gpus={nproc}", f"--master_port={port}", "--module", PRETRAIN, *pretrain_args]
    if launcher == "mpirun":
        return [_tool("mpirun"), "-n", str(nproc), sys.executable, "-m", PRETRAIN, *pretrain_args]
    if launcher == "none":
        return [sys.executable, "-m", PRETRAIN, *pretrain_args]
    raise ValueError(f"unknown launcher {launcher!r}")


def main(argv: Optional[list[str]] = None) -> int:
    """Validate the config, then start the ranks (or print the command with ``--dry-run``); returns the exit status."""
    p = argparse.ArgumentParser(prog="dist-memopt-run", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True,
                   help="YAML run configuration file (a checkout's configs/ holds the paper's runs and tiny ones)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override settings, e.g. --set train.lr=3e-4 train.seed=2 (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="resume from the latest checkpoint of this run, or from the given iter_* directory")
    p.add_argument("--dry-run", action="store_true", help="print the launch command and exit")
    args = p.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        check_world_size(config, config.parallel.nproc)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    pretrain_args = ["--config", args.config] + [f"--set={o}" for o in args.overrides]
    if args.resume is True:
        pretrain_args.append("--resume")
    elif args.resume:
        pretrain_args += ["--resume", args.resume]
    nproc = config.parallel.nproc
    launcher = config.parallel.launcher
    if launcher == "none" and nproc != 1:
        print(f"config error: parallel.launcher none runs one process, but parallel.nproc is {nproc}", file=sys.stderr)
        return 2
    command = launch_command(launcher, nproc, pretrain_args)
    print("launching:", shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    if launcher == "none":
        from dist_memopt.train.pretrain import main as pretrain

        return pretrain(pretrain_args)
    env = dict(os.environ)
    root = str(Path(dist_memopt.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))  # ranks import this copy
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
