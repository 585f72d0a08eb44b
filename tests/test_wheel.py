"""The wheel is the library: built from this checkout and installed alone into a fresh folder, it
holds only ``dist_memopt``, imports from there, steps SMMF and Alada, and its console scripts run.

The build copies what the wheel is made of (pyproject.toml, README.md, dist_memopt/) into a
temporary folder, so the checkout gets no build/ or egg-info; ``--no-build-isolation`` uses this
environment's setuptools (no download). The installed copy reuses this environment's torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import dist_memopt

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

STEP = """
import torch, dist_memopt as dm
print(dm.__file__)
for cls in (dm.SMMF, dm.Alada):
    p = torch.nn.Parameter(torch.randn(8, 6))
    p.grad = torch.randn(8, 6)
    before = p.detach().clone()
    cls([p], lr=1e-2).step()
    assert not torch.equal(before, p.detach()), cls.__name__
print("stepped")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed into)."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools (the 'test' extra)")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dist_memopt", source / "dist_memopt", ignore=shutil.ignore_patterns("__pycache__"))
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("dist_memopt-*.whl")
    done = subprocess.run(pip + ["install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return wheel, target


def _outside(target: Path, tmp_path: Path) -> dict[str, str]:
    """An environment that finds the installed copy, not the checkout: the checkout's folder is
    neither the working directory nor on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(target)
    return env


def test_the_wheel_holds_only_the_package_and_its_metadata(installed):
    wheel, _ = installed
    assert wheel.name.startswith(f"dist_memopt-{dist_memopt.__version__}-")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"dist_memopt", f"dist_memopt-{dist_memopt.__version__}.dist-info"}, tops


def test_the_installed_package_imports_from_the_wheel_and_steps(installed, tmp_path):
    _, target = installed
    done = subprocess.run([sys.executable, "-c", STEP], cwd=tmp_path, env=_outside(target, tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    origin, status = done.stdout.split()[:2]
    assert Path(origin).is_relative_to(target) and status == "stepped", done.stdout


@pytest.mark.parametrize("script", sorted(PYPROJECT["project"]["scripts"]))
def test_each_console_script_answers_help(installed, tmp_path, script):
    _, target = installed
    launcher = target / "bin" / script  # pip --target puts the scripts there, for this interpreter
    assert launcher.exists(), sorted(p.name for p in (target / "bin").iterdir())
    done = subprocess.run([sys.executable, str(launcher), "--help"], cwd=tmp_path, env=_outside(target, tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "usage:" in done.stdout
