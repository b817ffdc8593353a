"""Static checks of the whole project: mypy, pyright, the public API and the local stubs.

mypy and pyright run with the project's configuration (``pyproject.toml``:
strict, over src, tests and examples), as CI runs them.  The checkers and
stubtest are started together, so they overlap on a multi-core machine.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import typeflow

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
INIT = ROOT / "src" / "typeflow" / "__init__.py"
STUBS = ROOT / "stubs"
STUBBED = sorted(p.stem for p in STUBS.glob("*") if p.is_dir() or p.suffix == ".pyi")
TIMEOUT = 300  # seconds; pyright's first run may have to unpack node


def _pyright() -> str:
    here = str(Path(sys.executable).parent)
    found = shutil.which("pyright", path=here) or shutil.which("pyright")
    if found is None:
        pytest.fail("pyright is not installed next to the running Python (uv sync --group dev)")
    return found


def _command(test: str) -> list[str]:
    """What ``test`` checks, run from the project root."""
    if test == "test_mypy":  # no file arguments: the config's ``files`` are checked
        return [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT)]
    if test == "test_pyright":
        return [_pyright(), "--outputjson", "--project", str(PYPROJECT)]
    assert test == "test_stubtest"
    return [
        sys.executable,
        "-m",
        "mypy.stubtest",
        *STUBBED,
        "--ignore-missing-stub",
        "--mypy-config-file",
        str(PYPROJECT),
    ]


@pytest.fixture(scope="module")
def outputs(request: pytest.FixtureRequest) -> dict[str, subprocess.CompletedProcess[str]]:
    """Start the selected checks at once; wait for all of them.

    Every check finishes here, before any test body runs, so no checker process
    outlives the test that started it.
    """
    this_module = sys.modules[__name__]
    selected = [
        item.originalname
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.module is this_module
        and item.originalname in ("test_mypy", "test_pyright", "test_stubtest")
        and (item.originalname != "test_stubtest" or STUBBED)
    ]
    started: dict[str, subprocess.Popen[str]] = {}
    try:
        for test in dict.fromkeys(selected):
            started[test] = subprocess.Popen(
                _command(test),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        results: dict[str, subprocess.CompletedProcess[str]] = {}
        for test, process in started.items():
            out, err = process.communicate(timeout=TIMEOUT - 20)
            results[test] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        return results
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def _pyright_report(stdout: str) -> tuple[dict[str, Any], str]:
    try:
        data: dict[str, Any] = json.loads(stdout)
    except ValueError:
        pytest.fail(f"pyright did not report JSON:\n{stdout}", pytrace=False)
    lines: list[str] = []
    for d in data["generalDiagnostics"]:
        if d["severity"] == "information":
            continue
        path = Path(d["file"])
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        start = d["range"]["start"]
        rule = f" ({d['rule']})" if "rule" in d else ""
        lines.append(
            f"{where}:{start['line'] + 1}:{start['character'] + 1} - {d['severity']}: "
            f"{d['message']}{rule}"
        )
    return data["summary"], "\n".join(lines)


@pytest.mark.typing
@pytest.mark.timeout(TIMEOUT)
def test_mypy(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """``mypy`` (strict; files = src, tests, examples) finds nothing."""
    result = outputs["test_mypy"]
    if result.returncode != 0:
        pytest.fail(f"mypy failed:\n{result.stdout}{result.stderr}", pytrace=False)


@pytest.mark.typing
@pytest.mark.timeout(TIMEOUT)
def test_pyright(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """``pyright`` (strict; include = src, tests, examples) finds nothing, warnings included."""
    result = outputs["test_pyright"]
    summary, report = _pyright_report(result.stdout)
    if result.returncode not in (0, 1):
        pytest.fail(f"pyright failed to run:\n{result.stderr}", pytrace=False)
    if summary["filesAnalyzed"] == 0:
        pytest.fail(f"pyright checked no file:\n{result.stdout}", pytrace=False)
    if summary["errorCount"] or summary["warningCount"]:
        pytest.fail(f"pyright:\n{report}", pytrace=False)


@pytest.mark.typing
@pytest.mark.timeout(TIMEOUT)
@pytest.mark.skipif(not STUBBED, reason="stubs/ holds no stubs")
def test_stubtest(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """The local stubs in ``stubs/`` agree with the installed packages they describe."""
    result = outputs["test_stubtest"]
    if result.returncode != 0:
        message = f"stubtest {' '.join(STUBBED)} failed:\n{result.stdout}{result.stderr}"
        pytest.fail(message, pytrace=False)


def _literal_all(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "__all__"
        ):
            value = node.value
            assert isinstance(value, ast.List), "__all__ must be a literal list"
            names: list[str] = []
            for element in value.elts:
                assert isinstance(element, ast.Constant), "__all__ must list string literals"
                assert isinstance(element.value, str), "__all__ must list string literals"
                names.append(element.value)
            return names
    pytest.fail("typeflow/__init__.py does not assign __all__ = [...]")


def _public_names(tree: ast.Module) -> dict[str, str]:
    """Public names bound at the top of ``tree`` -> the module that defines them."""
    defined: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            for alias in node.names:
                defined[alias.asname or alias.name] = node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                defined[alias.asname or alias.name.partition(".")[0]] = alias.name
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined[node.name] = "typeflow"
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    defined[target.id] = "typeflow"
    return {name: module for name, module in defined.items() if not name.startswith("_")}


def _has_attribute_doc(module: str, name: str) -> bool:
    """A module-level name is documented by ``#:`` comments above it or a string below it."""
    source = inspect.getsource(importlib.import_module(module))
    lines = source.splitlines()
    body = ast.parse(source).body
    for i, node in enumerate(body):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
            continue
        above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
        if above.startswith("#:") and above[2:].strip():
            return True
        below = body[i + 1] if i + 1 < len(body) else None
        return (
            isinstance(below, ast.Expr)
            and isinstance(below.value, ast.Constant)
            and isinstance(below.value.value, str)
            and bool(below.value.value.strip())
        )
    return False


def test_public_api() -> None:
    """``__all__`` is a sorted literal list of exactly the public names, all documented."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    listed = _literal_all(tree)
    assert listed == typeflow.__all__
    assert listed == sorted(listed), "__all__ is not sorted"
    assert len(set(listed)) == len(listed), "__all__ lists a name twice"
    public = _public_names(tree)
    assert set(listed) == set(public), (
        f"public names missing from __all__: {sorted(set(public) - set(listed))}; "
        f"names in __all__ that typeflow/__init__.py does not define: "
        f"{sorted(set(listed) - set(public))}"
    )
    undocumented: list[str] = []
    for name in listed:
        obj = getattr(typeflow, name)
        if inspect.isclass(obj):  # its own docstring, not one inherited
            documented = bool((vars(obj).get("__doc__") or "").strip())
        elif inspect.isroutine(obj):
            documented = bool((obj.__doc__ or "").strip())
        else:  # a type alias or a constant: documented where it is assigned
            documented = _has_attribute_doc(public[name], name)
        if not documented:
            undocumented.append(name)
    assert not undocumented, f"public names without a docstring: {undocumented}"


@pytest.mark.timeout(120)
def test_ruff() -> None:
    """``ruff check`` and ``ruff format --check`` find nothing in src, tests and examples."""
    for command in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "src", "tests", "examples"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"ruff {' '.join(command)}:\n{result.stdout}{result.stderr}", pytrace=False)
