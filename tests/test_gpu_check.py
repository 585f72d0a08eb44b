"""`bash launch/gpu_check.sh` dry-run on CPU: its install and report steps, which must work on the
lent GPU machine the first time (device time is scarce), run here on the project's own wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole check")


def _check(tmp_path: Path, wheels: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(WHEELS=str(wheels), OUT=str(tmp_path / "out"), GPU_SITE=str(tmp_path / "site"), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_without_wheels_it_says_how_to_pack_them(tmp_path):
    done = _check(tmp_path, tmp_path / "nowhere")
    assert done.returncode == 2
    assert "gpu_check.sh --pack" in done.stdout


def test_dry_run_installs_the_wheels_reports_and_runs_nothing_without_cuda(tmp_path):
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)]
    subprocess.run(build, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    done = _check(tmp_path, wheels)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert f"dist_memopt from {tmp_path / 'site' / 'dist_memopt'}" in log  # the installed wheel, not the checkout
    assert "no CUDA device" in log and "nothing run" in log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log"]
