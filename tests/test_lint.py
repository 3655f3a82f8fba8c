"""The repository's habits, enforced: the layering of passes/ and runtime/ below the driver, ruff (lint and
format) and mypy."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What passes/ and runtime/ may import from spikec.*: each other and the shared error type. Everything
# else under spikec/ is the driver (API, CLI, calibration, reports), which builds on them, not the reverse.
_BELOW_DRIVER = ("spikec.passes", "spikec.runtime", "spikec.errors")


def _spikec_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from spikec import ugo` names the module in the alias
            found += [
                (node.lineno, f"{node.module}.{alias.name}" if node.module == "spikec" else node.module)
                for alias in node.names
            ]
    return [(line, name) for line, name in found if name == "spikec" or name.startswith("spikec.")]


def _allowed(name: str) -> bool:
    return any(name == base or name.startswith(base + ".") for base in _BELOW_DRIVER)


@pytest.mark.parametrize("package", ["passes", "runtime"])
def test_passes_and_runtime_do_not_import_the_driver(package):
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in _spikec_imports(path)
        if not _allowed(name)
    ]
    assert not offending, "\n".join(offending)


def test_the_import_check_sees_driver_imports(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "from spikec import ugo as u\nimport spikec.calibrate\nfrom spikec.passes.stats import TapStats\n"
        "def f():\n    from spikec.graphinfo import metadata\n"
    )
    assert [name for _, name in _spikec_imports(source) if not _allowed(name)] == [
        "spikec.ugo",
        "spikec.calibrate",
        "spikec.graphinfo",
    ]


def _tool(name: str) -> list[str]:
    # the tool of this interpreter's environment (the test extra installs both), else one on PATH
    local = Path(sys.executable).parent / name
    if local.exists():
        return [str(local)]
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' installs it)")
    return [found]


@pytest.mark.slow
def test_ruff_check_is_clean():
    result = subprocess.run([*_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.slow
def test_ruff_format_is_clean():
    result = subprocess.run(
        [*_tool("ruff"), "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.slow
def test_mypy_is_clean():
    # the files checked are pyproject.toml's [tool.mypy] files
    result = subprocess.run([*_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
