"""Every script in ``examples/`` and every snippet in the docs runs as it says.

Each example runs in its own interpreter, as a user would run it (``uv run
examples/NAME.py``): from the repository root, as ``__main__``, so that process
workers re-import it the way they re-import a user's script.  A new example is
picked up automatically; add its expected output to ``EXPECTED_OUTPUT``.

The ```` ```python ```` blocks of ``README.md`` and ``docs/*.md`` are run the same
way, one script per page (the blocks in page order, so a block may use what an
earlier one defined).  A block that must not run -- one that shows a type error,
say -- is fenced ```` ```python notest ````.

Type-checking the examples is the job of the project-wide mypy and pyright tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
EXAMPLES: Final = sorted((REPO_ROOT / "examples").glob("*.py"))

#: Seconds one example may take; each is meant to finish in a few.
EXAMPLE_TIMEOUT: Final = 60

#: Pages whose snippets are run.  (The benchmark pages show commands of the
#: benchmark suite, which needs the optional ``bench`` dependencies.)
PAGES: Final = [
    page
    for page in sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")])
    if not page.name.startswith("benchmarks")
]
PYTHON_BLOCK: Final = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)

#: Lines (or parts of lines) each example must print.
EXPECTED_OUTPUT: Final[dict[str, list[str]]] = {
    "quickstart.py": [
        "pipeline: read | analyse | enrich",
        "<stage 'analyse': 2 process worker(s), buffer 1024>",
        "3 files failed; each failure names its stage and keeps its exception:",
        "legacy-notes.txt             read     UnicodeDecodeError: 'utf-8' codec can't decode",
        "empty-draft.txt              analyse  ValueError: empty-draft.txt has no words to analyse",
        "enrich   LookupError: the directory has no entry for 'Guest Writer'",
        "23 of 26 files analysed, 3 failed, 145,604 words in all.",
    ],
    "errors.py": [
        "apple,12     ok        4.80",
        "cheese,one   failed  in stage 'parse' on 'cheese,one': ValueError:",
        "caviar,1     failed  in stage 'price' on Order(product='caviar', quantity=1): KeyError:",
        'File "errors.py", line ',
        "poison,1   failed  a worker of stage 'price' died (exit code 1) while it held this item",
        "bread,1    ok      2.10",
        "raised StageError: stage 'parse' failed on item 'cheese,one'",
        "after (1, 0)",
        "then the input's own exception: OSError: the order file became unreadable",
    ],
    "analyses.py": [
        "Ana Ruiz      10         2    +4",
        "nobody     failed in 'lookup_author': no author 'nobody' in the directory",
        "6 reviews, three analyses each, in",
    ],
    "documents.py": [
        "277 paragraphs (7,933 words) of 60 documents indexed",
        "1 failure(s):",
        "legacy-notes.txt   read      UnicodeDecodeError",
    ],
    "feed_server.py": [
        "160 requests from 4 client threads",
        "136 answered, 24 failed",
        "a request put after close: refused: put into a closed feed",
    ],
    "async_run.py": [
        "... 39 documents fingerprinted in",
        "failed: 'doc-013' in stage 'download': the store has no document 'doc-013'",
        "the event loop stayed responsive",
    ],
    "ordering.py": [
        "item 0 came out in position 1\n",
        "arrival order: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ...",
        "when 9 items had been read",
    ],
}


def test_examples_are_found() -> None:
    assert "quickstart.py" in [path.name for path in EXAMPLES]


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(example: Path) -> None:
    completed = run_script(example.relative_to(REPO_ROOT))
    report = f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert completed.returncode == 0, report
    assert completed.stderr == "", report
    assert completed.stdout.strip(), report
    for expected in EXPECTED_OUTPUT.get(example.name, []):
        assert expected in completed.stdout, f"missing {expected!r}\n{report}"


def run_script(path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``path`` with this interpreter from the repository root."""
    return subprocess.run(
        [sys.executable, str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT,
        check=False,
    )


def snippets(page: Path) -> str:
    """The page's runnable Python blocks, as one script."""
    return "\n\n".join(PYTHON_BLOCK.findall(page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_doc_snippets_run(page: Path, tmp_path: Path) -> None:
    code = snippets(page)
    if not code:
        pytest.skip(f"{page.name} has no runnable Python blocks")
    script = tmp_path / f"snippets_of_{page.stem.replace('-', '_')}.py"
    script.write_text(code, encoding="utf-8")
    completed = run_script(script)
    report = f"script:\n{code}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert completed.returncode == 0, report
    assert completed.stderr == "", report
