"""The product package holds the product (issue #19): the wheel built from this checkout carries
appliance/ and netsetup/ but not the lab kit (lab/: lab runner, netlab, benchmark) nor a
console script for it, and no product module imports the lab or the tests. The .deb's file
list is checked by tests/debian/test_deb.py; scripts/install installs this same wheel.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("appliance", "netsetup")


def build_wheel(source: Path, into: Path) -> Path:
    """The wheel `pip wheel` builds from a copy of `source` (no build/ left in the checkout)."""
    tree = into / "src"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(source / name, tree / name)
    for name in (*PRODUCT, "lab"):
        if (source / name).is_dir():
            shutil.copytree(source / name, tree / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "--disable-pip-version-check", "-w", str(into / "wheel"), str(tree)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (into / "wheel").glob("clamsmtp-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> dict[str, bytes]:
    """The wheel's files: name -> content."""
    path = build_wheel(REPO, tmp_path_factory.mktemp("wheel"))
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_the_wheel_carries_the_product(wheel):
    for name in ("appliance/__init__.py", "appliance/cli.py", "appliance/data/clamsmtpd.conf",
                 "netsetup/__init__.py", "netsetup/cli.py"):
        assert name in wheel


def test_the_wheel_leaves_the_lab_out(wheel):
    assert [n for n in wheel if "lab" in Path(n).parts] == []
    # nothing but the two packages and the dist-info
    assert [n for n in wheel if n.split("/")[0] not in PRODUCT
            and not n.startswith("clamsmtp-2")] == []
    (entry_points,) = [n for n in wheel if n.endswith(".dist-info/entry_points.txt")]
    scripts = wheel[entry_points].decode()
    assert "clamsmtpd = appliance.cli:main" in scripts
    assert "lab" not in scripts, scripts


def _imported(path: Path) -> set[str]:
    """The top-level names `path` imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_product_module_imports_the_lab_or_the_tests():
    offenders = [
        f"{path.relative_to(REPO)} imports {name}"
        for package in PRODUCT
        for path in sorted((REPO / package).rglob("*.py"))
        for name in sorted(_imported(path) & {"lab", "tests", "helpers", "nslab"})
    ]
    assert offenders == []


def test_no_product_module_edits_sys_path():
    """How the old appliance/lab reached tests/netsetup/nslab.py: sys.path.insert."""
    offenders = [
        str(path.relative_to(REPO))
        for package in PRODUCT
        for path in sorted((REPO / package).rglob("*.py"))
        if "sys.path" in path.read_text()
    ]
    assert offenders == []
