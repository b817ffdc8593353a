"""Stage options: what ``@stage(...)`` accepts, validated where it is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, cast, get_args

if TYPE_CHECKING:
    from typing_extensions import TypeIs

from typeflow._errors import DefinitionError

__all__ = ["BACKENDS", "DEFAULT_BUFFER", "Backend", "StageOptions", "is_backend"]

#: Where a stage's workers run: ``"thread"`` (a thread each), ``"process"`` (a
#: process each, for CPU-bound work) or ``"task"`` (an asyncio task each, for
#: ``async def`` functions that wait on I/O).
Backend = Literal["thread", "process", "task"]

BACKENDS: Final[tuple[Backend, ...]] = get_args(Backend)

#: The most workers a stage may have, per backend: each worker is started with
#: the run (a thread reserves its stack, a process its interpreter), so a mistyped
#: count fails when the stage is defined, not as a run that never starts.
MAX_WORKERS: Final[dict[str, int]] = {"thread": 10_000, "process": 1_024, "task": 100_000}
_FEWER_WORKERS: Final[dict[str, str]] = {
    "thread": "for many concurrent waits use backend='task'",
    "process": "processes beyond the machine's cores only add overhead",
    "task": "split the work between stages",
}
#: Default size, in items, of each stage's input buffer.  Large enough that the
#: workers take items by the hundred: under the GIL a channel fills while its
#: producer runs and empties while its consumers do, and every such round costs
#: each side a sleep and a wake-up (256 items cost 25-40 % more per item here).
DEFAULT_BUFFER: Final = 1024


def is_backend(value: str) -> TypeIs[Backend]:
    """Whether ``value`` names a backend; narrows a ``str`` read from configuration.

    Example:
        >>> is_backend("process"), is_backend("gpu")
        (True, False)
    """
    return value in BACKENDS


@dataclass(frozen=True, slots=True)
class StageOptions:
    """How a stage runs.  Every field is validated when the stage is defined.

    Attributes:
        workers: how many workers run the stage's function at once (at least 1).
        backend: where they run; see :data:`Backend`.
        buffer: how many items may wait in front of the stage (at least 1).
            When the buffer is full the stage before it waits: this is what
            keeps memory flat on endless input.
        name: the stage's name in errors and statistics (default: the
            function's qualified name).
        timeout: the most seconds one call may take, or None for no limit.  A
            call that takes longer becomes a ``Failure`` carrying
            :class:`~typeflow.StageTimeout` (see :doc:`supervision` for what
            each backend does with the stuck call).
        retries: how many times a failed call is tried again (0: never).
        retry_on: the exception types that are retried; others fail at once.
            A crashed process worker counts as :class:`~typeflow.WorkerCrashed`
            and a timed-out call as :class:`~typeflow.StageTimeout`.
        backoff: seconds before the first retry (plus a random jitter of up
            to as much again); each further retry waits about twice as long
            (exponential backoff with jitter, at most ``max_backoff``).
        max_backoff: the longest wait between two tries, in seconds.
        rate: at most this many calls per second, across all the stage's
            workers (None: no limit), for stages that call rate-limited
            services.  A rate-limited stage hands its workers one item at a
            time.
    """

    workers: int = 1
    backend: Backend = "thread"
    buffer: int = DEFAULT_BUFFER
    name: str | None = None
    timeout: float | None = None
    retries: int = 0
    retry_on: tuple[type[Exception], ...] = (Exception,)
    backoff: float = 0.1
    max_backoff: float = 30.0
    rate: float | None = None

    def __post_init__(self) -> None:
        label = f"stage {self.name!r}" if self.name else "stage"
        if not is_backend(self.backend):  # for callers that are not type-checked
            raise DefinitionError(
                f"{label}: backend={self.backend!r} is not a backend; "
                f"use one of {', '.join(map(repr, BACKENDS))}"
            )
        _positive(label, "workers", self.workers)
        most = MAX_WORKERS[self.backend]
        if self.workers > most:
            raise DefinitionError(
                f"{label}: workers={self.workers!r} is more than a {self.backend} stage "
                f"can start (at most {most:,}: every worker starts with the run); "
                + _FEWER_WORKERS[self.backend]
            )
        _positive(label, "buffer", self.buffer)
        _check_name(self.name)
        if self.timeout is not None:
            _positive_seconds(label, "timeout", self.timeout)
        if self.rate is not None and not _above_zero(self.rate):
            raise DefinitionError(
                f"{label}: rate={self.rate!r} is not allowed; give the most calls per second "
                "as a number above 0 (e.g. rate=0.5 for one call every 2 s), or None for no "
                "limit"
            )
        check_whole(
            label, "retries", self.retries, 0, "give the number of extra tries (0 for none)"
        )
        _check_retry_on(label, self.retry_on)
        for option in ("backoff", "max_backoff"):
            value: object = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise DefinitionError(
                    f"{label}: {option}={value!r} is not allowed; give seconds (0 or more)"
                )
        if self.backoff > self.max_backoff:
            raise DefinitionError(
                f"{label}: backoff={self.backoff!r} is more than max_backoff="
                f"{self.max_backoff!r}; the first wait cannot exceed the longest one: lower "
                "backoff or raise max_backoff"
            )

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether a call that raised ``exc`` on try number ``attempt`` is tried again."""
        return attempt <= self.retries and isinstance(exc, self.retry_on)


def _above_zero(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


def _positive_seconds(label: str, option: str, value: object) -> None:
    if not _above_zero(value):
        raise DefinitionError(
            f"{label}: {option}={value!r} is not allowed; give seconds as a number above 0, "
            "or None for no limit"
        )


def _is_exception_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException)


def _check_retry_on(label: str, retry_on: object) -> None:
    types: tuple[object, ...] = (
        cast("tuple[object, ...]", retry_on) if isinstance(retry_on, tuple) else (retry_on,)
    )
    bad = [t for t in types if not _is_exception_class(t)]
    if bad or not isinstance(retry_on, tuple):
        raise DefinitionError(
            f"{label}: retry_on={retry_on!r} is not allowed; give a tuple of exception "
            "classes, e.g. retry_on=(ConnectionError, TimeoutError)"
        )
    final = [t.__name__ for t in types if isinstance(t, type) and not issubclass(t, Exception)]
    if final:
        raise DefinitionError(
            f"{label}: retry_on={retry_on!r} is not allowed; {final[0]} "
            "is not an Exception (it ends the program or cancels the task, and is never "
            "retried); give Exception classes, e.g. retry_on=(ConnectionError, TimeoutError)"
        )


def _check_name(name: object) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise DefinitionError(f"stage name must be a non-empty string, not {name!r}")


def _positive(label: str, option: str, value: object) -> None:
    check_whole(
        label,
        option,
        value,
        1,
        f"{option} must be a whole number of at least 1 (there is no unbounded setting)",
    )


def check_whole(label: str, option: str, value: object, minimum: int, hint: str) -> None:
    """Refuse ``value`` unless it is a whole number (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DefinitionError(f"{label}: {option}={value!r} is not allowed; {hint}")
