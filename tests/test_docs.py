"""The documentation site builds with ``mkdocs build --strict`` (no broken link or anchor, no page
outside the nav, no docstring the API reference cannot render), and every public name the API
reference lists has a docstring."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"

mkdocs = pytest.importorskip("mkdocs", reason="mkdocs is not installed: it is in the 'docs' extra (pip install -e '.[docs]')")


def test_the_site_builds_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "optimizers" / "index.html").exists()


def _referenced() -> list[str]:
    return [name for page in sorted(REFERENCE.glob("*.md")) for name in re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M)]


def _public(obj):  # noqa: ANN001, ANN202 - griffe objects
    """A referenced object, or a module's exported names (its ``__all__``), resolved inside this package."""
    if not obj.is_module:
        return [obj]
    names = obj.exports if obj.exports is not None else [n for n in obj.members if not n.startswith("_")]
    found = []
    for name in names:
        member = obj[name if isinstance(name, str) else name.name]
        if member.is_alias and not member.target_path.startswith("dist_memopt."):
            continue  # another project's class re-exported (torchtitan's ParamGroupConfig)
        found.append(member.final_target if member.is_alias else member)
    return found


def test_every_public_name_in_the_reference_has_a_docstring():
    griffe = pytest.importorskip("griffe", reason="griffe comes with mkdocstrings[python] (the 'docs' extra)")
    package = griffe.load("dist_memopt", search_paths=[str(ROOT)], docstring_parser="google")
    referenced = _referenced()
    assert "dist_memopt.optim.smmf.SMMF" in referenced and "dist_memopt.kernels.launch" in referenced
    undocumented = sorted(
        obj.path
        for name in referenced
        for obj in _public(package[name.removeprefix("dist_memopt.")])
        if (obj.is_class or obj.is_function) and not obj.docstring
    )
    assert undocumented == []
    # the package's top-level names are in the reference (directly or through their module)
    exported = [package[name].final_target.path for name in package.exports if name != "__version__"]
    documented = set(referenced)
    assert [p for p in exported if p not in documented and p.rpartition(".")[0] not in documented] == []
