"""Static-typing tests: mypy and pyright over ``should_pass/`` and ``should_fail/``.

Each case file is checked by both checkers, once per session: one in-process
``mypy.api`` run while one pyright process runs in the background, both with
the project's configuration.  Every (case file, checker) pair is a test.

``should_pass/`` files must have no error at all; they pin types with
``assert_type``.  ``should_fail/`` files say which errors they expect, with
markers in comments::

    # E[mypy]: Unsupported operand types for | ("FnStage[str, int]" and "FnStage[bytes, int]")
    # E[pyright]: Operator "|" not supported for types "FnStage[str, int]" and "FnStage[bytes, int]"
    mismatch = parse | need_bytes

    show("1")  # E: incompatible type        <- a marker after code is about its own line

``# E[mypy]:`` and ``# E[pyright]:`` are for one checker, ``# E:`` for both.
Marker lines directly above a line (plain comments may sit in between, blank
lines may not) are about that line.  A marker is a substring of one reported
error: mypy's ``message  [code]``, or pyright's ``message (rule)`` with the
message's lines joined by `` / ``.  Matching is strict both ways: every error
must match a marker on its line, and every marker must match an error there.

Case file names must be unique across both folders (mypy checks them as
top-level modules).  Never start a comment with ``pyright:``: pyright reads it
as a directive.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PYPROJECT = ROOT / "pyproject.toml"
FOLDERS = ("should_pass", "should_fail")
CASES = sorted(path for folder in FOLDERS for path in (HERE / folder).glob("*.py"))
CHECKERS = ("mypy", "pyright")
TIMEOUT = 300  # seconds; pyright's first run may have to unpack node

pytestmark = [pytest.mark.typing, pytest.mark.timeout(TIMEOUT)]

# (case file, line) -> messages reported there
Reported = dict[tuple[Path, int], list[str]]

_MARKER = re.compile(
    r"#\s*E(?:\[(?P<checker>[^\]]*)\])?:\s*(?P<text>.*?)\s*(?=#\s*E(?:\[[^\]]*\])?:|$)"
)
_MYPY_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?:\d+:)? error: (?P<message>.*)$")


class MarkerError(Exception):
    """A case file's markers are malformed."""


def expected(path: Path, checker: str) -> dict[int, list[str]]:
    """The markers of ``path`` for ``checker``, by the line they are about."""
    by_line: dict[int, list[str]] = defaultdict(list)
    pending: list[tuple[str | None, str]] = []
    pending_since = 0
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        stripped = line.strip()
        found: list[tuple[str | None, str]] = []
        for m in _MARKER.finditer(line):
            who, text = m["checker"], m["text"]
            if who is not None and who not in CHECKERS:
                raise MarkerError(f"{path.name}:{lineno}: unknown checker in marker: E[{who}]")
            if not text:
                raise MarkerError(f"{path.name}:{lineno}: empty marker")
            found.append((who, text))
        if stripped.startswith("#"):  # a comment line: its markers are about the next code line
            if found and not pending:
                pending_since = lineno
            pending += found
            continue
        if not stripped:
            if pending:
                raise MarkerError(
                    f"{path.name}:{pending_since}: markers must be directly above "
                    "the line they are about (a blank line follows them)"
                )
            continue
        for who, text in pending + found:
            if who in (None, checker):
                by_line[lineno].append(text)
        pending = []
    if pending:
        raise MarkerError(f"{path.name}:{pending_since}: markers at the end of the file")
    return dict(by_line)


def _case(file: str) -> Path:
    return (ROOT / file).resolve()


def _parse_mypy(stdout: str) -> Reported:
    reported: Reported = defaultdict(list)
    for line in stdout.splitlines():
        if m := _MYPY_LINE.match(line):
            reported[(_case(m["file"]), int(m["line"]))].append(m["message"])
    return reported


def _parse_pyright(stdout: str) -> Reported:
    reported: Reported = defaultdict(list)
    diagnostics: list[dict[str, Any]] = json.loads(stdout)["generalDiagnostics"]
    for d in diagnostics:
        if d["severity"] == "information":
            continue
        message = " / ".join(part.strip() for part in d["message"].splitlines())
        if d["severity"] != "error":
            message = f"[{d['severity']}] {message}"
        if "rule" in d:
            message += f" ({d['rule']})"
        reported[(_case(d["file"]), d["range"]["start"]["line"] + 1)].append(message)
    return reported


def _pyright_command() -> str:
    found = shutil.which("pyright", path=str(Path(sys.executable).parent)) or shutil.which(
        "pyright"
    )
    if found is None:
        pytest.fail("pyright is not installed next to the running Python (uv sync --group dev)")
    return found


@pytest.fixture(scope="session")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reported]:
    """Run both checkers over every case file, concurrently; the errors each reports."""
    from mypy import api

    files = [str(path) for path in CASES]
    # The project's pyright config excludes the case folders, and pyright
    # applies "exclude" even to files named on the command line.  Check them
    # with a config that extends the project's and excludes nothing else.
    config = tmp_path_factory.mktemp("pyright") / "pyrightconfig.json"
    config.write_text(
        json.dumps({"extends": PYPROJECT.as_posix(), "exclude": ["**/__pycache__"]}),
        encoding="utf-8",
    )
    pyright = subprocess.Popen(
        [_pyright_command(), "--outputjson", "--project", str(config), *files],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # mypy resolves the config's relative paths (mypy_path) against the cwd.
        with contextlib.chdir(ROOT):
            mypy_out, mypy_err, mypy_status = api.run(
                [
                    "--config-file",
                    str(PYPROJECT),
                    "--no-pretty",
                    "--no-error-summary",
                    "--no-color-output",
                    "--show-absolute-path",
                    *files,
                ]
            )
        pyright_out, pyright_err = pyright.communicate(timeout=TIMEOUT - 20)
    finally:
        if pyright.poll() is None:
            pyright.kill()
            pyright.wait()
    assert mypy_status in (0, 1), f"mypy failed to run (status {mypy_status}):\n{mypy_err}"
    assert pyright.returncode in (0, 1), (
        f"pyright failed to run (status {pyright.returncode}):\n{pyright_err}\n{pyright_out}"
    )
    analyzed = json.loads(pyright_out)["summary"]["filesAnalyzed"]
    assert analyzed == len(files), f"pyright checked {analyzed} of {len(files)} case files"
    return {"mypy": _parse_mypy(mypy_out), "pyright": _parse_pyright(pyright_out)}


def _params() -> Iterator[object]:
    for case in CASES:
        for checker in CHECKERS:
            yield pytest.param(case, checker, id=f"{case.parent.name}/{case.stem}-{checker}")


def test_markers(tmp_path: Path) -> None:
    """How markers are read (the runner's own test)."""
    case = tmp_path / "case.py"
    case.write_text(
        "x = 1  # E[mypy]: one  # E: both\n"
        "# E[pyright]: above\n"
        "# a plain comment\n"
        "# E[mypy]: two (with [brackets])\n"
        "y = 2\n"
        "\n"
        "z = 3  # E[pyright]: three\n",
        encoding="utf-8",
    )
    assert expected(case, "mypy") == {1: ["one", "both"], 5: ["two (with [brackets])"]}
    assert expected(case, "pyright") == {1: ["both"], 5: ["above"], 7: ["three"]}
    for text, problem in [
        ("# E[mypy]: dangling\n\nx = 1\n", "directly above"),
        ("x = 1\n# E: at the end\n", "end of the file"),
        ("x = 1  # E[mpy]: typo\n", "unknown checker"),
        ("x = 1  # E:\n", "empty marker"),
    ]:
        case.write_text(text, encoding="utf-8")
        with pytest.raises(MarkerError, match=problem):
            expected(case, "mypy")


def test_case_names_are_unique() -> None:
    twice = [stem for stem, n in Counter(path.stem for path in CASES).items() if n > 1]
    assert not twice, f"case file names used in both folders (mypy rejects them): {twice}"


@pytest.mark.parametrize(("case", "checker"), list(_params()))
def test_types(case: Path, checker: str, reported: dict[str, Reported]) -> None:
    name = f"{case.parent.name}/{case.name}"
    want = expected(case, checker)
    got = {line: messages for (path, line), messages in reported[checker].items() if path == case}
    if case.parent.name == "should_pass":
        assert not want, f"{name}: should_pass files carry no # E markers"
    else:
        assert want, f"{name}: no {checker} markers; pin the errors {checker} must report"
    problems: list[str] = []
    for line in sorted(want.keys() | got.keys()):
        messages, markers = got.get(line, []), want.get(line, [])
        problems += [
            f"{name}:{line}: unexpected {checker} error: {message}"
            for message in messages
            if not any(marker in message for marker in markers)
        ]
        problems += [
            f"{name}:{line}: expected {checker} error not reported: {marker}"
            for marker in markers
            if not any(marker in message for message in messages)
        ]
    if problems:
        everything = [f"  {line}: {m}" for line in sorted(got) for m in got[line]]
        pytest.fail(
            "\n".join([*problems, f"everything {checker} reported in {name}:", *everything]),
            pytrace=False,
        )
