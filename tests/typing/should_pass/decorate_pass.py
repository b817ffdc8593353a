"""``@stage`` on sync and async functions, bare and with options."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from typing_extensions import assert_type

from typeflow import (
    AsyncFnStage,
    AsyncStageDecorator,
    Backend,
    FnStage,
    Stage,
    StageDecorator,
    StageOptions,
    is_backend,
    stage,
)


@stage
def show(x: int) -> str:
    return str(x)


@stage
async def encode(x: str) -> bytes:
    return x.encode()


@stage(workers=4, backend="process")
def show_cpu(x: int) -> str:
    return str(x)


@stage(workers=2, backend="thread", buffer=8, name="show-io")
def show_io(x: int) -> str:
    return str(x)


@stage(workers=8, backend="task", name="encode-io")
async def encode_io(x: str) -> bytes:
    return x.encode()


@stage(workers=2)
async def encode_on_threads(x: str) -> bytes:
    return x.encode()


def plain(x: int) -> str:
    return str(x)


async def coro(x: str) -> bytes:
    return x.encode()


# Called on a function, with options (pypeln's pl.process.map(f, workers=3)).
assert_type(stage(plain, workers=3, backend="process"), FnStage[int, str])
assert_type(stage(plain, timeout=1.0, retries=2), FnStage[int, str])
assert_type(stage(coro, workers=8, backend="task"), AsyncFnStage[str, bytes])
assert_type(stage(coro, backend="thread", rate=5.0), AsyncFnStage[str, bytes])

assert_type(show, FnStage[int, str])
assert_type(encode, AsyncFnStage[str, bytes])
assert_type(show_cpu, FnStage[int, str])
assert_type(show_io, FnStage[int, str])
assert_type(encode_io, AsyncFnStage[str, bytes])
assert_type(encode_on_threads, AsyncFnStage[str, bytes])

# Both kinds are Stage[In, Out] for composition.
as_stage: Stage[int, str] = show
as_async_stage: Stage[str, bytes] = encode

# Still callable like the function, so its logic is unit-testable without the runtime.
assert_type(show(1), str)
coroutine = assert_type(encode("a"), Coroutine[Any, Any, bytes])
coroutine.close()

# The call form, on functions defined elsewhere.
assert_type(stage(str.upper), FnStage[str, str])
assert_type(stage(workers=2)(str.upper), FnStage[str, str])

# What the option forms return.
assert_type(stage(), StageDecorator)
assert_type(stage(workers=2, backend="process"), StageDecorator)
assert_type(stage(backend="task"), AsyncStageDecorator)
assert_type(stage(backend="task", workers=16, buffer=64, name="fetch"), AsyncStageDecorator)

# Options are typed where they are read back.
assert_type(show_io.options, StageOptions)
assert_type(show_io.options.workers, int)
assert_type(show_io.options.buffer, int)
assert_type(show_io.options.name, str | None)
assert_type(show_io.options.backend, Backend)
assert_type(show_io.name, str)

# Keyword options take values of their declared types, not only literals.
workers: int = 3
buffer: int = 32
label: str | None = None
backend: Backend = "process"


@stage(workers=workers, buffer=buffer, name=label, backend=backend)
def configured(x: int) -> int:
    return x


assert_type(configured, FnStage[int, int])


# A backend read from configuration: is_backend() narrows str to Backend.
def from_config() -> str:
    return "process"


value = from_config()
if is_backend(value):
    assert_type(value, Backend)
    assert_type(stage(backend=value)(str.upper), FnStage[str, str])
else:
    assert_type(value, str)


# The function a stage was made from keeps its types (for unit tests).
assert_type(show.__wrapped__, Callable[[int], str])
assert_type(show.__wrapped__(3), str)
assert_type(encode.__wrapped__, Callable[[str], Coroutine[Any, Any, bytes]])
