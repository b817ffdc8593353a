"""Retries: which failures are tried again, and how long to wait in between.

The waiting policy is tenacity's exponential backoff with jitter; it is
imported only by stages that ask for retries.  Retries of a call that raised
happen in place, in the worker that made the call.  Retries of a call whose
worker crashed or timed out are made by the backend that noticed it, with the
same policy (:func:`delay`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from typeflow._errors import StageTimeout
from typeflow._options import StageOptions

if TYPE_CHECKING:
    import tenacity

__all__ = ["Exhausted", "acall", "call", "delay"]


class Exhausted(Exception):
    """The last try failed: the original exception and how many tries were made."""

    def __init__(self, exception: BaseException, attempts: int) -> None:
        super().__init__(exception, attempts)
        self.exception = exception
        self.attempts = attempts


def _wait(options: StageOptions) -> tenacity.wait.wait_base:
    import tenacity

    return tenacity.wait_exponential_jitter(
        multiplier=options.backoff, max=options.max_backoff, jitter=options.backoff
    )


def _policy(options: StageOptions) -> dict[str, Any]:
    import tenacity

    return {
        "stop": tenacity.stop_after_attempt(options.retries + 1),
        "wait": _wait(options),
        "retry": tenacity.retry_if_exception_type(options.retry_on),
        "reraise": True,
    }


def delay(options: StageOptions, attempt: int) -> float:
    """Seconds to wait after failed try number ``attempt`` (1 for the first)."""
    import tenacity

    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = attempt
    return float(_wait(options)(state))


def call(fn: Callable[[Any], Any], item: object, options: StageOptions) -> tuple[object, int]:
    """``fn(item)`` with the stage's retries; returns the value and the number of tries.

    Raises:
        Exhausted: every try failed (or the failure is not one to retry).
    """
    import tenacity

    attempts = 0
    try:
        for attempt in tenacity.Retrying(**_policy(options)):
            with attempt:
                attempts += 1
                return fn(item), attempts
    except Exception as exc:
        raise Exhausted(exc, attempts) from exc
    raise AssertionError("unreachable: tenacity either returns or raises")


async def acall(
    fn: Callable[[Any], Coroutine[Any, Any, Any]], item: object, options: StageOptions, name: str
) -> tuple[object, int]:
    """``await fn(item)`` with the stage's timeout (per try) and retries."""

    async def once() -> object:
        if options.timeout is None:
            return await fn(item)
        try:
            import asyncio

            async with asyncio.timeout(options.timeout):
                return await fn(item)
        except TimeoutError as exc:
            raise StageTimeout(name, options.timeout) from exc

    if options.retries == 0:
        try:
            return await once(), 1
        except Exception as exc:
            raise Exhausted(exc, 1) from exc

    import tenacity

    attempts = 0
    try:
        async for attempt in tenacity.AsyncRetrying(**_policy(options)):
            with attempt:
                attempts += 1
                return await once(), attempts
    except Exception as exc:
        raise Exhausted(exc, attempts) from exc
    raise AssertionError("unreachable: tenacity either returns or raises")
