"""Stage options: what ``@stage(...)`` accepts, validated where it is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

from typing_extensions import TypeIs

from typeflow._errors import DefinitionError

__all__ = ["DEFAULT_BUFFER", "BACKENDS", "Backend", "StageOptions", "is_backend"]

#: Where a stage's workers run: ``"thread"`` (a thread each), ``"process"`` (a
#: process each, for CPU-bound work) or ``"task"`` (an asyncio task each, for
#: ``async def`` functions that wait on I/O).
Backend = Literal["thread", "process", "task"]

BACKENDS: Final[tuple[Backend, ...]] = get_args(Backend)

#: Default size, in items, of each stage's input buffer.
DEFAULT_BUFFER: Final = 256


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
    """

    workers: int = 1
    backend: Backend = "thread"
    buffer: int = DEFAULT_BUFFER
    name: str | None = None

    def __post_init__(self) -> None:
        label = f"stage {self.name!r}" if self.name else "stage"
        if not is_backend(self.backend):  # for callers that are not type-checked
            raise DefinitionError(
                f"{label}: backend={self.backend!r} is not a backend; "
                f"use one of {', '.join(map(repr, BACKENDS))}"
            )
        _positive(label, "workers", self.workers)
        _positive(label, "buffer", self.buffer)
        _check_name(self.name)


def _check_name(name: object) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise DefinitionError(f"stage name must be a non-empty string, not {name!r}")


def _positive(label: str, option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DefinitionError(
            f"{label}: {option}={value!r} is not allowed; {option} must be a whole number "
            "of at least 1 (there is no unbounded setting)"
        )
