"""Fork/join: three analyses of each review, on three backends, joined per review.

Each review goes through

* ``statistics`` -- word and sentence counts, on worker processes (CPU work);
* ``tone`` -- a tiny lexicon-based score, on threads;
* ``lookup_author`` -- a simulated asynchronous directory look-up, on asyncio tasks;

and the three results of each review come back joined into one tuple, which
``summarise`` turns into a row.  A review whose author is unknown fails in the
look-up branch: its row is a ``Failure`` naming that branch's stage.

Run it with ``uv run examples/analyses.py``.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

from typeflow import fork, stage

REVIEWS = [
    ("ana", "Great pipeline library. Fast, simple and the types are excellent!"),
    ("bo", "The docs are good. Setup was awful though; it took me a day."),
    ("cy", "Terrible first impression. Then it worked. Now I love it."),
    ("dee", "Slow on my laptop. Good error messages. Fine overall."),
    ("nobody", "Anonymous reviews cannot be attributed to anyone."),
    ("eli", "Excellent. Excellent. Excellent."),
]

POSITIVE = {"great", "fast", "simple", "excellent", "good", "love", "fine"}
NEGATIVE = {"awful", "terrible", "slow", "bad"}
AUTHORS = {
    "ana": "Ana Ruiz",
    "bo": "Bo Chen",
    "cy": "Cy Adams",
    "dee": "Dee Obi",
    "eli": "Eli Park",
}


@dataclass(frozen=True)
class Review:
    author: str
    text: str


@dataclass(frozen=True)
class Row:
    author: str
    words: int
    sentences: int
    tone: int


@stage(workers=2, backend="process")
def statistics(review: Review) -> tuple[int, int]:
    words = re.findall(r"[A-Za-z']+", review.text)
    sentences = [s for s in re.split(r"[.!?]+", review.text) if s.strip()]
    return len(words), len(sentences)


@stage(workers=2)
def tone(review: Review) -> int:
    words = [w.lower() for w in re.findall(r"[A-Za-z']+", review.text)]
    return sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)


@stage(workers=8, backend="task")
async def lookup_author(review: Review) -> str:
    await asyncio.sleep(0.05)  # stands in for a request to a directory service
    if review.author not in AUTHORS:
        raise LookupError(f"no author {review.author!r} in the directory")
    return AUTHORS[review.author]


@stage
def summarise(parts: tuple[tuple[int, int], int, str]) -> Row:
    (words, sentences), score, author = parts
    return Row(author, words, sentences, score)


def main() -> None:
    pipeline = fork(statistics, tone, lookup_author) | summarise
    reviews = [Review(author, text) for author, text in REVIEWS]
    started = time.perf_counter()
    print(f"{'author':<10} {'words':>5} {'sentences':>9} {'tone':>5}")
    for review, result in zip(reviews, pipeline.run(reviews), strict=True):
        row = result.value_or(None)
        if row is None:
            error = result.failure()
            print(f"{review.author:<10} failed in {error.stage!r}: {error.exception}")
        else:
            print(f"{row.author:<10} {row.words:>5} {row.sentences:>9} {row.tone:>+5}")
    elapsed = time.perf_counter() - started
    print(f"{len(reviews)} reviews, three analyses each, in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
