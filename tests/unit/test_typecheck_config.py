"""The type checker's settings stay what docs/dev/types.md says: strict on the whole product,
no module let off, and libraries without types named one by one."""

from __future__ import annotations

import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _mypy() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["mypy"]


def test_mypy_is_strict_on_appliance_and_netsetup():
    mypy = _mypy()
    assert mypy["strict"] is True
    assert set(mypy["files"]) == {"appliance", "netsetup"}
    assert "exclude" not in mypy
    for relaxing in ("ignore_errors", "ignore_missing_imports", "follow_imports",
                     "disallow_untyped_defs", "check_untyped_defs"):
        assert relaxing not in mypy, f"[tool.mypy] {relaxing} applies to every module"


def test_no_module_is_let_off_and_untyped_libraries_are_named():
    for override in _mypy().get("overrides", []):
        modules = override["module"]
        assert set(override) == {"module", "ignore_missing_imports"}, (
            f"{modules}: only ignore_missing_imports may be set per module "
            "(docs/dev/types.md: the not-yet-strict list is gone)"
        )
        for module in modules:
            assert not module.startswith(("appliance", "netsetup")), module
            assert module.split(".")[0] in {"iptc", "pyroute2"}, (
                f"{module}: a library without types? name it in docs/dev/types.md first"
            )


def test_scripts_test_runs_mypy_and_fails_on_its_errors():
    script = (PYPROJECT.parent / "scripts" / "test").read_text()
    assert ".venv/bin/mypy || type_status=$?" in script
    assert '[ "$type_status" -ne 0 ]' in script
