"""typeflow's exceptions.

Every exception typeflow raises on purpose derives from one root (but for the
``TypeError`` of a ``run()`` given something that is not iterable, as Python's
own functions raise)::

    TypeflowError
    ├── StageError              one item failed in one stage (the payload of a ``Failure``)
    ├── DefinitionError         a stage or pipeline is built wrongly (bad option, unshippable
    │   │                       function); raised at decoration or composition time
    │   └── CompositionError    two stages do not fit together (``a | b``)
    ├── WorkerCrashed           a worker died while it held an item (the ``exception`` of a
    │                           ``StageError``)
    ├── StageTimeout            one call took longer than the stage's ``timeout`` (also a
    │                           ``TimeoutError``)
    ├── WorkerStartError        worker processes of a stage die while starting, again and
    │                           again (the ``exception`` of each affected item's ``StageError``)
    ├── FeedClosed              an item put into a feed that is closed, or whose run stopped
    └── RemoteTraceback         the formatted traceback of an exception raised in another
                                process, attached as that exception's ``__cause__``

``DefinitionError`` is also a ``ValueError`` and ``CompositionError`` a ``TypeError``, so
code written against the standard exceptions keeps working.  Every error pickles, so it
crosses process boundaries unchanged.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Iterable, Iterator
from types import FrameType

__all__ = [
    "CompositionError",
    "DefinitionError",
    "RemoteTraceback",
    "StageError",
    "StageTimeout",
    "TypeflowError",
    "WorkerCrashed",
    "WorkerStartError",
]

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80
_short.maxlist = 6
_short.maxtuple = 6
_short.maxdict = 4


def short_repr(value: object) -> str:
    """``repr(value)``, shortened so that an error message stays readable."""
    try:
        return _short.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        return f"<{type(value).__qualname__} object (repr failed)>"


def short_str(error: BaseException) -> str:
    """``str(error)``, or a stand-in when its ``__str__`` raises (the failure must
    still be shown)."""
    try:
        return str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the failure
        return f"<{type(error).__qualname__} object (str failed)>"


class TypeflowError(Exception):
    """Root of every exception that typeflow raises on purpose."""


class DefinitionError(TypeflowError, ValueError):
    """A stage or a pipeline was defined wrongly.

    Raised as early as possible: when a function is decorated, when stages are
    composed, or when a run is built, before any item is taken from the input.
    The message names the stage, the offending value and how to fix it.
    """


class CompositionError(DefinitionError, TypeError):
    """Two stages cannot be joined with ``|``.

    Static type checkers report most mismatches; this is the run-time check for
    code that is not type-checked (or uses ``Any``).
    """


class RemoteTraceback(TypeflowError):
    """The traceback of an exception raised in a worker process, as text.

    A process worker cannot send a live traceback object back, so typeflow sets
    the formatted traceback as the ``__cause__`` of the re-created exception:
    ``traceback.print_exception`` then shows where in the worker it happened.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class WorkerCrashed(TypeflowError):
    """A worker died while it held an item (killed, ``os._exit``, segfault, out of memory).

    Attributes:
        stage: name of the stage whose worker died.
        exitcode: the process exit code; negative values are ``-signal`` (``-9`` is SIGKILL).
    """

    def __init__(self, stage: str, exitcode: int | None) -> None:
        how = _describe_exit(exitcode)
        super().__init__(f"a worker of stage {stage!r} died ({how}) while it held this item")
        self.stage = stage
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.stage, self.exitcode))


class WorkerStartError(TypeflowError):
    """Worker processes of a stage died while starting, several times in a row.

    The worker prints its own traceback.  The usual cause is a script without an
    ``if __name__ == "__main__":`` guard (worker processes import the main
    script), or a script read from standard input.
    """

    def __init__(self, stage: str, exitcode: int | None, attempts: int) -> None:
        if exitcode is not None and exitcode < 0:
            how = f"was killed by {_describe_exit(exitcode)[10:]} while starting"
        else:
            how = (
                f"exited while starting ({_describe_exit(exitcode)}); see its traceback "
                "above.  A common cause is a script without an "
                "'if __name__ == \"__main__\":' guard, or one read from standard input"
            )
        super().__init__(f"{attempts} worker processes of stage {stage!r} in a row: the last {how}")
        self.stage = stage
        self.exitcode = exitcode
        self.attempts = attempts

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.stage, self.exitcode, self.attempts))


class StageTimeout(TypeflowError, TimeoutError):
    """One call of a stage's function took longer than the stage's ``timeout``.

    Attributes:
        stage: name of the stage.
        timeout: the limit, in seconds.
    """

    def __init__(self, stage: str, timeout: float) -> None:
        super().__init__(f"stage {stage!r} took longer than its timeout of {timeout:g} s")
        self.stage = stage
        self.timeout = timeout

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.stage, self.timeout))


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exit code {exitcode}"


class StageError(TypeflowError):
    """One item failed in one stage.

    It is the error inside the ``Failure`` that a run yields for that item, and
    what a fail-fast run raises.

    Attributes:
        stage: the name of the stage that failed.
        item: the input that stage received (not the pipeline's original input).
        exception: the original exception.  Its traceback is the worker's, from
            the stage's function down (typeflow's frames above it are left out,
            unless typeflow's own code raised it); for a process worker it is
            re-created, with the worker's formatted traceback as its
            ``__cause__`` (a :class:`RemoteTraceback`).
        attempts: how many times the stage was called with this item.

    Example:
        >>> err = StageError("parse", "x1", ValueError("not a number"))
        >>> str(err)
        "stage 'parse' failed on item 'x1': ValueError: not a number"
        >>> err.exception
        ValueError('not a number')
    """

    def __init__(
        self, stage: str, item: object, exception: BaseException, *, attempts: int = 1
    ) -> None:
        super().__init__(stage, item, exception)
        self.stage = stage
        self.item = item
        self.exception = exception
        self.attempts = attempts
        self.__cause__ = exception
        _drop_own_frames(exception)

    def __str__(self) -> str:
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return (
            f"stage {self.stage!r} failed on item {short_repr(self.item)}{tries}: "
            f"{type(self.exception).__name__}: {short_str(self.exception)}"
        )

    def __repr__(self) -> str:
        return f"StageError({self.stage!r}, {short_repr(self.item)}, {short_repr(self.exception)})"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_stage_error, (self.stage, self.item, self.exception, self.attempts))


#: Where typeflow's own modules are: the paths of their code begin with this.
_OWN_CODE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def is_own_frame(frame: FrameType) -> bool:
    """Whether ``frame`` runs typeflow's own code."""
    return frame.f_code.co_filename.startswith(_OWN_CODE)


def _drop_own_frames(exception: BaseException) -> None:
    """Drop typeflow's frames from the top of the traceback of ``exception`` and of
    the exceptions it was raised from or during (a timeout's), so that each
    begins where the user's frames (or a library's) begin: in the stage's
    function, for its own error.  A traceback of typeflow's frames alone (an
    error of typeflow's own code, or of a C function it called) is left whole.

    The frame that caught the exception holds the batch and its outcome, this
    failure among them: a reference cycle while it is in the traceback (see
    ``release_callers`` in the kernel for the frames the user's ones refer to).
    """
    for exc in exception_chain([exception]):
        top = tb = exc.__traceback__
        while tb is not None and is_own_frame(tb.tb_frame):
            tb = tb.tb_next
        if tb is not None and tb is not top:
            exc.__traceback__ = tb


def exception_chain(exceptions: Iterable[BaseException]) -> Iterator[BaseException]:
    """``exceptions`` and those they were raised from or during (``__cause__``,
    ``__context__``), each once."""
    seen: set[int] = set()
    pending = list(exceptions)
    while pending:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        if exc.__cause__ is not None:
            pending.append(exc.__cause__)
        if exc.__context__ is not None:
            pending.append(exc.__context__)


def _rebuild_stage_error(
    stage: str, item: object, exception: BaseException, attempts: int
) -> StageError:
    return StageError(stage, item, exception, attempts=attempts)
