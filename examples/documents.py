"""A document indexing pipeline: one-to-many, a filter, stateful workers, batches, a sink.

Run it from the repository root::

    uv run examples/documents.py

It writes a small corpus of text documents into a temporary directory (one of
them not UTF-8, one empty) and indexes their paragraphs into a sqlite
database::

    read         thread x4    Path         -> Document       blocking file I/O
    paragraphs   flat_map     Document     -> Paragraph ...  one document, many paragraphs
    substantial  keep         Paragraph    -> Paragraph      drop empty and short ones
    Keywords     process x2   Paragraph    -> Entry          stateful: stop words, once per worker
    batch(25)                 Entry        -> list[Entry]    25 rows, or what came in 0.5 s
    IndexWriter  thread x1    list[Entry]  -> int            stateful: one sqlite connection

The run is consumed for its effect (the rows written): ``consume()`` returns
only the failures.  Then it prints what the index holds, the failures, how
often each worker's state was set up and torn down, and the run's statistics.
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from typeflow import Pipeline, StatefulStage, flat_map, keep, stage

# -- the corpus -----------------------------------------------------------------------

TOPICS: Final[dict[str, tuple[str, ...]]] = {
    "rivers": (
        "The river floods the lower meadows every spring",
        "Salmon return upstream to the gravel beds where they hatched",
        "A new weir changed how the river carries its sediment",
        "The ferry crossing closed when the water rose above the quay",
        "Otters were seen again below the old mill for the first time in years",
    ),
    "orchards": (
        "The apple trees were pruned in the cold weeks of winter",
        "Bees from three hives pollinate the whole orchard in spring",
        "Late frost damaged the blossom on the pear trees",
        "The harvest was pressed into cider in the barn",
        "Old varieties of plum were grafted onto young rootstock",
    ),
    "railways": (
        "The branch line reopened after forty years of silence",
        "Steam locomotives still run on the heritage railway in summer",
        "The signal box at the junction was rebuilt in brick",
        "Night freight trains carry timber down from the forests",
        "The viaduct needed new bearings after the last inspection",
    ),
}

#: Words too common to be keywords; each Keywords worker loads this list in its setup.
STOP_WORDS: Final = (
    "the a an and of in on to for from was were is are be been by at as after its it "
    "they where when how every whole still again down onto into new old last first "
    "time years three forty"
)

#: Paragraphs shorter than this many words are not indexed.
MIN_WORDS: Final = 6


def write_corpus(folder: Path, documents: int, seed: int = 7) -> list[Path]:
    """Write ``documents`` text files of a few paragraphs each, plus two odd ones."""
    rng = random.Random(seed)
    paths: list[Path] = []
    for number in range(documents):
        topic = rng.choice(sorted(TOPICS))
        paragraphs: list[str] = []
        for _ in range(rng.randint(3, 8)):
            if rng.random() < 0.15:
                paragraphs.append(rng.choice(["See above.", "  ", "To be continued."]))
            else:
                sentences = rng.sample(TOPICS[topic], k=rng.randint(2, 4))
                paragraphs.append(". ".join(sentences) + ".")
        path = folder / f"{topic}-{number:03d}.txt"
        path.write_text("\n\n".join(paragraphs), encoding="utf-8")
        paths.append(path)
    empty = folder / "empty-draft.txt"
    empty.write_text("", encoding="utf-8")
    legacy = folder / "legacy-notes.txt"
    legacy.write_bytes("Caf\u00e9 notes from the old system.".encode("latin-1"))
    return [*paths, empty, legacy]


# -- the stages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True, slots=True)
class Paragraph:
    document: str
    number: int
    text: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of the index."""

    document: str
    paragraph: int
    words: int
    keywords: tuple[str, ...]
    worker: int


@stage(workers=4)
def read(path: Path) -> Document:
    """Blocking file I/O: a few threads.  A file that is not UTF-8 fails here."""
    return Document(path.name, path.read_text(encoding="utf-8"))


@flat_map
def paragraphs(document: Document) -> Iterator[Paragraph]:
    """One document in, one output per paragraph (none for an empty document)."""
    blocks = [" ".join(block.split()) for block in document.text.split("\n\n")]
    for number, text in enumerate(blocks):
        if text:
            yield Paragraph(document.name, number, text)


def substantial(paragraph: Paragraph) -> bool:
    return len(paragraph.text.split()) >= MIN_WORDS


class Keywords(StatefulStage[Paragraph, Entry], workers=2, backend="process"):
    """The three most frequent words of a paragraph that are not stop words.

    ``__init__`` keeps configuration, which is sent to each worker; ``setup``
    builds the worker's state inside its own process.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def setup(self) -> None:
        folder = Path(self.folder)
        self.stop_words = frozenset((folder / "stop-words.txt").read_text().split())
        self.word = re.compile(r"[a-z]+")
        self.pid = os.getpid()
        self.worker = f"{self.pid}-{threading.get_ident()}"
        (folder / "lifecycle" / f"setup-{self.worker}").touch()

    def process(self, paragraph: Paragraph, /) -> Entry:
        words = self.word.findall(paragraph.text.lower())
        counts = Counter(w for w in words if w not in self.stop_words)
        keywords = tuple(sorted(w for w, _ in counts.most_common(3)))
        return Entry(paragraph.document, paragraph.number, len(words), keywords, self.pid)

    def teardown(self) -> None:
        (Path(self.folder) / "lifecycle" / f"teardown-{self.worker}").touch()


class IndexWriter(StatefulStage[list[Entry], int], name="index"):
    """Writes each batch of rows in one transaction, on one sqlite connection."""

    def __init__(self, database: str) -> None:
        self.database = database

    def setup(self) -> None:
        self.db = sqlite3.connect(self.database)

    def process(self, rows: list[Entry], /) -> int:
        with self.db:  # one transaction per batch
            self.db.executemany(
                "INSERT INTO paragraphs VALUES (?, ?, ?, ?, ?)",
                [(e.document, e.paragraph, e.words, " ".join(e.keywords), e.worker) for e in rows],
            )
        return len(rows)

    def teardown(self) -> None:
        self.db.close()


# -- the program ------------------------------------------------------------------------


def create_index(database: Path) -> None:
    with sqlite3.connect(database) as db:
        db.execute(
            "CREATE TABLE paragraphs ("
            " document TEXT, paragraph INTEGER, words INTEGER, keywords TEXT, worker INTEGER,"
            " PRIMARY KEY (document, paragraph))"
        )
    db.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="typeflow-documents-") as tmp:
        folder = Path(tmp)
        corpus = folder / "corpus"
        corpus.mkdir()
        (folder / "stop-words.txt").write_text(STOP_WORDS)
        (folder / "lifecycle").mkdir()
        database = folder / "index.sqlite"
        create_index(database)
        paths = write_corpus(corpus, documents=60)

        pipeline: Pipeline[Path, int] = (
            read | paragraphs | keep(substantial) | Keywords(str(folder))
        ).batch(25, timeout=0.5) | IndexWriter(str(database))
        print(f"pipeline: {pipeline.name}")

        run = pipeline.run(paths)
        failures = run.consume()  # run for the effect; keep only the failures
        stats = run.statistics()

        with sqlite3.connect(database) as db:
            rows, words, documents, workers = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(words), 0), COUNT(DISTINCT document),"
                " COUNT(DISTINCT worker) FROM paragraphs"
            ).fetchone()
            keyword_lists: list[tuple[str]] = db.execute(
                "SELECT keywords FROM paragraphs"
            ).fetchall()
        db.close()
        lifecycle = [p.name.split("-")[0] for p in (folder / "lifecycle").iterdir()]

        made, dropped = stats.stages[1].succeeded, stats.stages[2].filtered
        batches = stats.stages[-1].succeeded
        print(
            f"\n{len(paths)} files read, {made} paragraphs found "
            f"({stats.stages[1].filtered} file empty), {dropped} too short to index"
        )
        print(f"{rows} paragraphs ({words:,} words) of {documents} documents indexed")
        print(f"rows written in {batches} transactions of at most 25")
        print(
            f"keywords computed in {workers} worker process(es): "
            f"Keywords.setup ran {lifecycle.count('setup')} time(s), "
            f"teardown {lifecycle.count('teardown')} time(s), once per worker"
        )
        top = Counter(word for (line,) in keyword_lists for word in line.split())
        ranked = sorted(top.items(), key=lambda kv: (-kv[1], kv[0]))[:6]
        print("top keywords: " + ", ".join(f"{w} ({n})" for w, n in ranked))

        print(f"\n{len(failures)} failure(s):")
        for error in failures[:5]:
            item = error.item
            if isinstance(item, Path):
                item = item.name
            elif isinstance(item, Paragraph):
                item = f"{item.document} #{item.number}"
            print(
                f"  {item:<18} {error.stage:<9} {type(error.exception).__name__}: {error.exception}"
            )

        print(f"\n{stats}")


if __name__ == "__main__":
    main()
