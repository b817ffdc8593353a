"""typeflow quickstart: analyse a small corpus of text files on three backends.

Run it from the repository root::

    uv run examples/quickstart.py

It writes a corpus of text files into a temporary directory -- two of them
broken on purpose, and one by an author whom the look-up does not know -- and
runs one pipeline over their paths::

    read     thread  x4    Path       -> Document   blocking file I/O
    analyse  process x2    Document   -> TextStats  CPU-bound text statistics
    enrich   task    x16   TextStats  -> Report     simulated async look-ups

Then it prints one row per file, every failure with the stage that failed and
why, and the totals.  A failed file never stops the others: each input path
comes out as exactly one ``Success`` or ``Failure``, in input order.
"""

from __future__ import annotations

import asyncio
import random
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypedDict

from returns.pipeline import is_successful
from returns.result import Result

from typeflow import Pipeline, StageError, stage

# -- the corpus -----------------------------------------------------------------

#: Sentences on a few topics, from which the documents are assembled.
TOPIC_SENTENCES: Final[dict[str, tuple[str, ...]]] = {
    "astronomy": (
        "The telescope was pointed at the northern sky shortly after midnight",
        "Jupiter rose above the hills with three of its moons in a neat line",
        "A thin crescent moon set early, leaving the sky dark for the faint galaxies",
        "We measured the brightness of the variable star every twenty minutes",
        "Clouds drifted in from the west and the observatory dome was closed",
        "The comet showed a short tail that pointed away from the sun",
        "Every orbit of the satellite took about ninety minutes",
        "The spectrum revealed hydrogen lines shifted slightly toward the red",
    ),
    "baking": (
        "The dough rested overnight in a cool corner of the kitchen",
        "Rye flour makes a denser loaf with a deep and slightly sour flavour",
        "The oven was heated to its highest setting with the stone inside",
        "A good crust needs steam during the first minutes of baking",
        "The starter doubled in size within six hours of feeding",
        "Butter was folded into the pastry in three careful turns",
        "Each loaf was scored with a sharp blade just before it went in",
        "The bread cooled on a wire rack before anyone was allowed to cut it",
    ),
    "sailing": (
        "The wind backed to the south and the crew reefed the mainsail",
        "We left the harbour on the morning tide with a light breeze",
        "The skipper plotted a course that kept well clear of the sandbanks",
        "Spray came over the bow as the boat heeled in the gusts",
        "The anchor held firmly in the sheltered bay through the night",
        "A pod of dolphins followed the boat for almost an hour",
        "The forecast promised calmer weather for the crossing back",
        "Every sail was checked for wear before the long passage",
    ),
    "gardening": (
        "The tomatoes were planted out once the last frost had passed",
        "Compost from the previous year was spread thinly over every bed",
        "Slugs found the young lettuce before we did",
        "The apple tree was pruned in winter to let light into its centre",
        "Beans climbed the canes faster than anyone expected",
        "We saved seeds from the best plants for next spring",
        "The soil in the lower garden stays wet long after the rain",
        "Marigolds between the rows kept many of the pests away",
    ),
    "railways": (
        "The branch line closed to passengers many years ago",
        "Volunteers restored the signal box with its original levers",
        "The steam locomotive needed two hours to raise enough pressure",
        "Freight trains still use the junction several times a day",
        "The timetable was rewritten when the new station opened",
        "Old sleepers were replaced along the whole length of the viaduct",
        "The driver sounded the whistle before entering the tunnel",
        "Passengers changed trains at the junction for the coastal route",
    ),
}

#: Each topic's regular author (an editor writes some of the documents too).
TOPIC_AUTHORS: Final[dict[str, str]] = {
    "astronomy": "Ada Okafor",
    "baking": "Bruno Keller",
    "sailing": "Chiara Rossi",
    "gardening": "Dmitri Volkov",
    "railways": "Elin Sandberg",
}
EDITOR: Final = "Farah Haddad"

#: The team that the directory look-up returns for each author.
AUTHOR_DIRECTORY: Final[dict[str, str]] = {
    "Ada Okafor": "Observatory",
    "Bruno Keller": "Kitchen Lab",
    "Chiara Rossi": "Harbour Office",
    "Dmitri Volkov": "Field Station",
    "Elin Sandberg": "Heritage Trust",
    EDITOR: "Editorial",
}

#: How a document is written: short sentences, or long sentences joined by clauses.
Style = Literal["plain", "dense"]
#: Styles to draw from: two plain documents for each dense one.
STYLES: Final[tuple[Style, ...]] = ("plain", "plain", "dense")

#: The author of one file who is missing from the directory: ``enrich`` fails on it.
UNLISTED_AUTHOR: Final = "Guest Writer"


def compose_text(rng: random.Random, topics: list[str], sentences: int, style: Style) -> str:
    """Assemble a body of text from the topics' sentences.

    Args:
        rng: the seeded random generator, so the corpus is the same every run.
        topics: which topics the sentences come from.
        sentences: how many sentences to write.
        style: ``"plain"`` keeps sentences short; ``"dense"`` joins them into long ones.

    Returns:
        Paragraphs of text separated by blank lines.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for _ in range(sentences):
        sentence = rng.choice(TOPIC_SENTENCES[rng.choice(topics)])
        if style == "dense":
            extra = rng.choice(TOPIC_SENTENCES[rng.choice(topics)])
            sentence = f"{sentence}, and moreover {extra[0].lower()}{extra[1:]}"
        current.append(sentence + ".")
        if len(current) >= rng.randint(3, 7):
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def write_corpus(directory: Path, documents: int = 24, seed: int = 7) -> list[Path]:
    """Write the sample corpus, the same on every run.

    Most files are good.  ``legacy-notes.txt`` is Latin-1, not UTF-8, so
    ``read`` fails on it; ``empty-draft.txt`` has a header but no text, so
    ``analyse`` fails on it; one file's author is not in the directory, so
    ``enrich`` fails on it.

    Returns:
        The paths, in the order they should be processed.
    """
    rng = random.Random(seed)
    topic_names = sorted(TOPIC_SENTENCES)
    paths: list[Path] = []
    for number in range(1, documents + 1):
        topics = rng.sample(topic_names, k=rng.choice((1, 1, 2)))
        style = rng.choice(STYLES)
        author = TOPIC_AUTHORS[topics[0]] if rng.random() < 0.75 else EDITOR
        if number == 17:
            author = UNLISTED_AUTHOR
        title = f"Notes on {' and '.join(topics)}"
        body = compose_text(rng, topics, rng.randint(40, 900), style)
        path = directory / f"{number:02d}-{'-'.join(topics)}-{style}.txt"
        path.write_text(f"Title: {title}\nAuthor: {author}\n\n{body}\n", encoding="utf-8")
        paths.append(path)

    legacy = directory / "legacy-notes.txt"
    legacy.write_bytes(
        "Title: Café notes\nAuthor: Bruno Keller\n\nCrème brûlée.\n".encode("latin-1")
    )
    empty = directory / "empty-draft.txt"
    empty.write_text("Title: Draft\nAuthor: Farah Haddad\n\n\n", encoding="utf-8")
    paths[5:5] = [legacy]
    paths[12:12] = [empty]
    return paths


# -- the data that flows between the stages -------------------------------------


@dataclass(frozen=True)
class Document:
    """A file's header and text."""

    name: str
    title: str
    author: str
    text: str


class TextStats(TypedDict):
    """What ``analyse`` measures in one document."""

    name: str
    author: str
    words: int
    sentences: int
    reading_ease: float
    grade_level: float
    top_words: list[str]


@dataclass(frozen=True)
class Report:
    """One analysed document with its author's team."""

    stats: TextStats
    team: str


# -- the stages -----------------------------------------------------------------

COMMON_WORDS: Final = """
    the a an and of to in on at for with by was were is are be been it its that this
    we our they their them he she his her from as but or so than then there after
    before into over out up down every each all any more most many much some moreover
    had has have did does just very well long once until while who what when where which
    about above again almost away back being both enough even ever here inside slightly
"""
STOPWORDS: Final = frozenset(COMMON_WORDS.split())
WORD: Final = re.compile(r"[A-Za-z']+")
SENTENCE_END: Final = re.compile(r"[.!?]+")
VOWEL_GROUP: Final = re.compile(r"[aeiouy]+")


@stage(workers=4)
def read(path: Path) -> Document:
    """Read one file: a ``Title:`` line, an ``Author:`` line, a blank line, the text."""
    raw = path.read_text(encoding="utf-8")  # legacy-notes.txt raises UnicodeDecodeError
    header, _, text = raw.partition("\n\n")
    fields = dict(line.split(": ", 1) for line in header.splitlines())
    return Document(name=path.name, title=fields["Title"], author=fields["Author"], text=text)


def count_syllables(word: str) -> int:
    """Estimate a word's syllables: groups of vowels, less a silent final ``e``."""
    word = word.lower()
    count = len(VOWEL_GROUP.findall(word))
    if word.endswith("e") and not word.endswith("le") and count > 1:
        count -= 1
    return max(count, 1)


@stage(workers=2, backend="process")
def analyse(document: Document) -> TextStats:
    """Count words and sentences, score readability (Flesch) and find the top words."""
    words = WORD.findall(document.text)
    if not words:
        raise ValueError(f"{document.name} has no words to analyse")
    sentences = max(1, len([s for s in SENTENCE_END.split(document.text) if s.strip()]))
    syllables = sum(count_syllables(word) for word in words)
    words_per_sentence = len(words) / sentences
    syllables_per_word = syllables / len(words)
    content_words = Counter(
        word.lower() for word in words if len(word) > 3 and word.lower() not in STOPWORDS
    )
    return TextStats(
        name=document.name,
        author=document.author,
        words=len(words),
        sentences=sentences,
        reading_ease=206.835 - 1.015 * words_per_sentence - 84.6 * syllables_per_word,
        grade_level=0.39 * words_per_sentence + 11.8 * syllables_per_word - 15.59,
        top_words=[word for word, _ in content_words.most_common(3)],
    )


def look_up_latency(author: str) -> float:
    """How long the pretend directory service takes to answer for ``author`` (30-70 ms)."""
    return 0.03 + 0.01 * (len(author) % 5)


async def look_up_team(author: str) -> str:
    """Stand-in for a call to a directory service that answers after a network wait."""
    await asyncio.sleep(look_up_latency(author))
    try:
        return AUTHOR_DIRECTORY[author]
    except KeyError:
        raise LookupError(f"the directory has no entry for {author!r}") from None


@stage(workers=16, backend="task")
async def enrich(stats: TextStats) -> Report:
    """Add the author's team, looked up asynchronously (16 look-ups at a time)."""
    return Report(stats=stats, team=await look_up_team(stats["author"]))


# -- the report -----------------------------------------------------------------


def format_row(report: Report) -> str:
    """One line of the results table."""
    s = report.stats
    return (
        f"{s['name']:<32} {s['words']:>6,} {s['sentences']:>5} {s['reading_ease']:>5.1f} "
        f"{s['grade_level']:>5.1f}  {', '.join(s['top_words']):<30} "
        f"{s['author']} ({report.team})"
    )


def print_table(reports: list[Report]) -> None:
    """Print one row per analysed file."""
    header = (
        f"{'file':<32} {'words':>6} {'sent.':>5} {'ease':>5} {'grade':>5}  "
        f"{'top words':<30} author (team)"
    )
    rows = [format_row(report) for report in reports]
    print(header)
    print("-" * max(map(len, [header, *rows])))
    print("\n".join(rows))


def print_failures(failures: list[tuple[Path, StageError]]) -> None:
    """Print each failed file with the stage that failed and the original exception."""
    print(f"\n{len(failures)} files failed; each failure names its stage and keeps its exception:")
    width = max((len(path.name) for path, _ in failures), default=0)
    for path, error in failures:
        reason = f"{type(error.exception).__name__}: {error.exception}"
        print(f"  {path.name:<{width}}  {error.stage:<8} {reason}")


def main() -> None:
    """Write the corpus, run the pipeline over it and print what came out."""
    pipeline: Pipeline[Path, Report] = read | analyse | enrich
    with tempfile.TemporaryDirectory(prefix="typeflow-quickstart-") as tmp:
        paths = write_corpus(Path(tmp))
        print(f"typeflow quickstart: {len(paths)} text files in a temporary directory")
        print(f"pipeline: {pipeline.name}")
        for part in pipeline.stages:
            print(f"  {part!r}")
        print()

        started = time.perf_counter()
        reports: list[Report] = []
        failures: list[tuple[Path, StageError]] = []
        # An ordered run (the default) yields results in input order, so each
        # result can be paired with the path it came from.
        results: list[Result[Report, StageError]] = list(pipeline.run(paths))
        elapsed = time.perf_counter() - started
        for path, result in zip(paths, results, strict=True):
            if is_successful(result):
                reports.append(result.unwrap())
            else:
                failures.append((path, result.failure()))

    print_table(reports)
    print_failures(failures)
    total_words = sum(report.stats["words"] for report in reports)
    waited = sum(look_up_latency(report.stats["author"]) for report in reports)
    print(
        f"\n{len(reports)} of {len(paths)} files analysed, {len(failures)} failed, "
        f"{total_words:,} words in all."
    )
    print(
        f"Whole run: {elapsed:.2f} s, worker start-up included (the look-ups alone, "
        f"one after another, would take {waited:.2f} s)."
    )


if __name__ == "__main__":
    main()
