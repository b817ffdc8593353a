"""A continuous feed serving requests: clients put them over time, answers come when ready.

Run it from the repository root::

    uv run examples/feed_server.py

``pipeline.feed()`` opens a running pipeline.  Four client threads put
price requests into it at random moments; the main thread reads the answers
as they come (``ordered=False``: a slow request does not hold back the
others); a fifth thread closes the feed once every client is done, and the
iteration ends when the last request has been answered::

    route         thread x2   Request -> Request    reject unknown paths
    PriceService  task x8     Request -> Response   stateful: each worker keeps its own cache

Then it prints latency and throughput, the failed requests, what happened to
a request put after the feed was closed, and the run's statistics.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from typeflow import AsyncStatefulStage, FeedClosed, Pipeline, stage

#: Prices the (simulated) database knows.
CATALOGUE: Final[dict[str, float]] = {
    "apple": 0.40,
    "bread": 2.10,
    "cheese": 4.75,
    "coffee": 6.30,
    "milk": 1.15,
    "tea": 3.20,
}
CLIENTS: Final = ("web", "mobile", "partner", "batch")
REQUESTS_PER_CLIENT: Final = 40


@dataclass(frozen=True, slots=True)
class Request:
    client: str
    number: int
    path: str
    sent_at: float  # time.perf_counter() when the client put it


@dataclass(frozen=True, slots=True)
class Response:
    request: Request
    body: str
    cached: bool


@stage(workers=2)
def route(request: Request) -> Request:
    """Only ``/price/<item>`` is served."""
    if not request.path.startswith("/price/"):
        raise LookupError(f"404: no route for {request.path}")
    return request


class PriceService(AsyncStatefulStage[Request, Response], workers=8, backend="task"):
    """Looks prices up in a slow database; each worker caches what it has looked up."""

    async def setup(self) -> None:
        # This worker's own cache (never shared); None: the database has no price.
        self.cache: dict[str, float | None] = {}

    async def process(self, request: Request, /) -> Response:
        item = request.path.removeprefix("/price/")
        cached = item in self.cache
        if not cached:
            await asyncio.sleep(0.03)  # a database round trip
            self.cache[item] = CATALOGUE.get(item)
        price = self.cache[item]
        if price is None:
            raise KeyError(f"no price for {item!r}")
        return Response(request, f"{item}: {price:.2f}", cached)

    async def teardown(self) -> None:
        self.cache.clear()


def client(name: str, put: Callable[[Request], None]) -> None:
    """Send requests at random moments, a few of them for unknown items or paths."""
    rng = random.Random(name)
    items = [*CATALOGUE, "caviar"]
    for number in range(REQUESTS_PER_CLIENT):
        time.sleep(rng.expovariate(1 / 0.008))  # about 8 ms between requests
        path = "/admin" if rng.random() < 0.03 else f"/price/{rng.choice(items)}"
        put(Request(name, number, path, time.perf_counter()))


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    pipeline: Pipeline[Request, Response] = route | PriceService()
    latencies: list[float] = []
    from_cache = 0
    failed: list[str] = []
    started = time.perf_counter()

    with pipeline.feed(ordered=False) as feed:
        clients = [threading.Thread(target=client, args=(name, feed.put)) for name in CLIENTS]
        for thread in clients:
            thread.start()

        def close_when_done() -> None:
            for thread in clients:
                thread.join()
            feed.close()  # the iteration below ends once every request is answered

        closer = threading.Thread(target=close_when_done)
        closer.start()

        print("first answers, as they came:")
        for result in feed:
            now = time.perf_counter()
            if isinstance(response := result.value_or(None), Response):
                latencies.append(now - response.request.sent_at)
                from_cache += response.cached
                if len(latencies) <= 5:
                    request = response.request
                    print(
                        f"  {request.client:<8} #{request.number:<3} {response.body:<13}"
                        f"{'(cached)' if response.cached else '(database)':<11}"
                        f"after {milliseconds(latencies[-1])}"
                    )
            else:
                error = result.failure()
                item = error.item  # what the failing stage was given: the request
                assert isinstance(item, Request)
                failed.append(
                    f"{item.client:<8} #{item.number:<3} {item.path:<15} "
                    f"in {error.stage!r}: {type(error.exception).__name__}: {error.exception}"
                )
        closer.join()
    elapsed = time.perf_counter() - started

    try:
        feed.put(Request("late", 0, "/price/tea", time.perf_counter()))
    except FeedClosed as error:
        late = f"refused: {error}"
    else:
        late = "accepted (unexpected)"

    total = len(CLIENTS) * REQUESTS_PER_CLIENT
    cuts = statistics.quantiles(latencies, n=100)
    print(f"\n{total} requests from {len(CLIENTS)} client threads in {elapsed:.2f} s")
    print(f"{len(latencies)} answered, {len(failed)} failed: {total / elapsed:.0f} requests/s")
    from_database = len(latencies) - from_cache
    print(f"{from_cache} answers from a worker's own cache, {from_database} from the database")
    print(
        f"latency: median {milliseconds(statistics.median(latencies))}, "
        f"p95 {milliseconds(cuts[94])}, max {milliseconds(max(latencies))}"
    )
    print(f"\n{len(failed)} failed requests (first 5):")
    for line in failed[:5]:
        print(f"  {line}")
    print(f"\na request put after close: {late}")
    print(f"\n{feed.run.statistics()}")


if __name__ == "__main__":
    main()
