"""Retries: which failures are tried again, and how long to wait in between.

The waiting policy is tenacity's exponential backoff with jitter; it is
imported only when a call has failed and is to be tried again.  Retries of a
call that raised happen in place, in the worker that made the call.  Retries of a call whose
worker crashed or timed out are made by the backend that noticed it, with the
same policy (:func:`delay`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from typeflow._errors import StageTimeout
from typeflow._options import StageOptions

if TYPE_CHECKING:
    import tenacity

__all__ = ["Exhausted", "Pacer", "acall", "call", "delay"]


class Exhausted(Exception):
    """The last try failed: the original exception and how many tries were made."""

    def __init__(self, exception: BaseException, attempts: int) -> None:
        super().__init__(exception, attempts)
        self.exception = exception
        self.attempts = attempts


class Pacer(Protocol):
    """What a worker does between the tries of one call (see ``WorkerContext.pacer``).

    A stage's ``timeout`` is for each try, not for the backoff between them, and
    its ``rate`` counts every try: the worker is told when a try has failed and
    the wait begins, and when the next try begins.
    """

    #: Tries the item had before this call (a timed-out try retried alone): the
    #: retries left and the backoff go on from there.
    attempts_before: int

    def resting(self) -> None:
        """A try failed; the wait before the next one begins (no deadline runs)."""

    def rest(self, seconds: float) -> None:
        """Wait ``seconds`` before the next try (a thread worker's wait ends, with
        ``WorkerExit``, when the run stops)."""

    async def arest(self, seconds: float) -> None:
        """The awaitable twin of :meth:`rest`."""

    def trying(self) -> None:
        """The next try begins now (after its rate slot): its deadline counts from here."""

    async def atrying(self) -> None:
        """The awaitable twin of :meth:`trying`."""


def _wait(options: StageOptions) -> tenacity.wait.wait_base:
    import tenacity

    return tenacity.wait_exponential_jitter(
        multiplier=options.backoff, max=options.max_backoff, jitter=options.backoff
    )


def delay(options: StageOptions, attempt: int) -> float:
    """Seconds to wait after failed try number ``attempt`` (1 for the first)."""
    import tenacity

    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = attempt
    return float(_wait(options)(state))


def call(
    fn: Callable[[Any], Any], item: object, options: StageOptions, pacer: Pacer | None = None
) -> tuple[object, int]:
    """``fn(item)`` with the stage's retries; returns the value and the number of tries
    this call made (``pacer`` is told when each try ends and begins).

    The first try is a plain call: a retry loop costs a call that succeeds some
    10 µs when it goes through ``tenacity.Retrying``, and most calls succeed.

    Raises:
        Exhausted: every try failed (or the failure is not one to retry).
    """
    before = 0 if pacer is None else pacer.attempts_before
    attempt = 1
    while True:
        try:
            return fn(item), attempt
        except Exception as exc:
            if not options.should_retry(exc, before + attempt):
                raise Exhausted(exc, attempt) from exc
        if pacer is None:
            time.sleep(delay(options, before + attempt))
        else:
            pacer.resting()
            pacer.rest(delay(options, before + attempt))
        attempt += 1
        if pacer is not None:
            pacer.trying()


async def acall(
    fn: Callable[[Any], Coroutine[Any, Any, Any]],
    item: object,
    options: StageOptions,
    name: str,
    pacer: Pacer | None = None,
) -> tuple[object, int]:
    """``await fn(item)`` with the stage's timeout (per try) and retries."""
    import asyncio

    before = 0 if pacer is None else pacer.attempts_before
    attempt = 1
    while True:
        try:
            if options.timeout is None:
                return await fn(item), attempt
            try:
                async with asyncio.timeout(options.timeout):
                    return await fn(item), attempt
            except TimeoutError as exc:
                raise StageTimeout(name, options.timeout) from exc
        except Exception as exc:
            if not options.should_retry(exc, before + attempt):
                raise Exhausted(exc, attempt) from exc
        if pacer is None:
            await asyncio.sleep(delay(options, before + attempt))
        else:
            pacer.resting()
            await pacer.arest(delay(options, before + attempt))
        attempt += 1
        if pacer is not None:
            await pacer.atrying()
