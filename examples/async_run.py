"""``arun``: a pipeline inside an asyncio program.

Run it from the repository root::

    uv run examples/async_run.py

An async generator pages through a (simulated) document store; a task stage
downloads each document, 10 at a time; a process stage fingerprints it on
other CPU cores; the program consumes the results with ``async for``.  A
heartbeat task keeps ticking the whole time: waiting for results never blocks
the caller's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Final

from returns.pipeline import is_successful

from typeflow import Pipeline, stage

PAGES: Final = 4
PAGE_SIZE: Final = 10
#: The one document that the store refuses to serve.
MISSING: Final = "doc-013"


async def list_documents() -> AsyncIterator[str]:
    """Yield document ids page by page, as a paginated listing API would."""
    for page in range(PAGES):
        await asyncio.sleep(0.02)  # one request per page
        for number in range(page * PAGE_SIZE, (page + 1) * PAGE_SIZE):
            yield f"doc-{number:03d}"


@stage(workers=10, backend="task")
async def download(doc_id: str) -> tuple[str, bytes]:
    """Fetch a document's bytes: about 50 ms of waiting on the network."""
    await asyncio.sleep(0.05)
    if doc_id == MISSING:
        raise FileNotFoundError(f"the store has no document {doc_id!r}")
    body = f"{doc_id}: ".encode() + bytes(range(256)) * 64
    return doc_id, body


@stage(workers=2, backend="process")
def fingerprint(document: tuple[str, bytes]) -> tuple[str, str]:
    """A deliberately slow, CPU-bound digest: 200 rounds of BLAKE2b."""
    doc_id, body = document
    digest = body
    for _ in range(200):
        digest = hashlib.blake2b(digest + body, digest_size=16).digest()
    return doc_id, digest.hex()


async def heartbeat(ticks: list[float]) -> None:
    """Record a tick every 10 ms until cancelled."""
    while True:
        ticks.append(time.perf_counter())
        await asyncio.sleep(0.01)


async def main() -> None:
    pipeline: Pipeline[str, tuple[str, str]] = download | fingerprint
    ticks: list[float] = []
    beat = asyncio.create_task(heartbeat(ticks))
    started = time.perf_counter()
    fingerprints: dict[str, str] = {}
    failures: list[str] = []
    # ``async with`` stops every worker on leaving the block, even on an
    # exception or a ``break``.  ordered=False: results come as they finish.
    async with pipeline.arun(list_documents(), ordered=False) as results:
        async for result in results:
            if is_successful(result):
                doc_id, digest = result.unwrap()
                fingerprints[doc_id] = digest
            else:
                error = result.failure()
                failures.append(f"{error.item!r} in stage {error.stage!r}: {error.exception}")
    elapsed = time.perf_counter() - started
    beat.cancel()

    for doc_id in sorted(fingerprints)[:5]:
        print(f"{doc_id}  {fingerprints[doc_id]}")
    print(f"... {len(fingerprints)} documents fingerprinted in {elapsed:.2f} s")
    for failure in failures:
        print(f"failed: {failure}")
    longest_gap = max(later - earlier for earlier, later in itertools.pairwise(ticks))
    print(
        f"the event loop stayed responsive: {len(ticks)} heartbeats, "
        f"longest gap {longest_gap * 1000:.0f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
