# ruff: noqa: E501
"""``@stage`` misuse that both checkers must reject.

Markers on the comment lines directly above a line are about that line.
"""

from __future__ import annotations

from typeflow import stage


# A misspelt backend.  mypy cannot name the argument (``stage`` is overloaded)
# but its notes list the allowed values; pyright names the parameter.
# E[mypy]: No overload variant of "stage" matches argument types "int", "str"  [call-overload]
# E[mypy]: Untyped decorator makes function "typo_backend" untyped  [untyped-decorator]
# E[pyright]: Argument of type "Literal['proccess']" cannot be assigned to parameter "backend" of type "Backend" in function "stage"
# E[pyright]: No overloads for "stage" match the provided arguments (reportCallIssue)
# E[pyright]: Untyped function decorator obscures type of function; ignoring decorator (reportUntypedFunctionDecorator)
@stage(workers=4, backend="proccess")
def typo_backend(x: int) -> str:
    return str(x)


# E[mypy]: No overload variant of "stage" matches argument type "str"  [call-overload]
# E[mypy]: Untyped decorator makes function "workers_as_text" untyped  [untyped-decorator]
# E[pyright]: Argument of type "Literal['4']" cannot be assigned to parameter "workers" of type "int" in function "stage"
@stage(workers="4")
def workers_as_text(x: int) -> int:
    return x


# An unannotated variable is ``str`` to mypy (pyright keeps the literal): annotate it as Backend.
backend = "thread"


# E[mypy]: No overload variant of "stage" matches argument type "str"  [call-overload]
# E[mypy]: Untyped decorator makes function "backend_from_str" untyped  [untyped-decorator]
@stage(backend=backend)
def backend_from_str(x: int) -> int:
    return x


# backend="task" runs coroutines on the event loop: a plain function is rejected.
# E[mypy]: Argument 1 to "__call__" of "AsyncStageDecorator" has incompatible type "Callable[[int], int]"; expected "Callable[[int], Coroutine[Any, Any, Never]]"  [arg-type]
# E[pyright]: Argument of type "(x: int) -> int" cannot be assigned to parameter "fn" of type "(A@__call__) -> Coroutine[Any, Any, B@__call__]" in function "__call__"
# E[pyright]: Function return type "int" is incompatible with type "Coroutine[Any, Any, B@__call__]"
@stage(backend="task")
def blocking_on_task(x: int) -> int:
    return x


# A stage's function takes exactly one item.
# E[mypy]: Argument 1 to "stage" has incompatible type "Callable[[int, int], int]"; expected "Callable[[int], Coroutine[Any, Any, Never]]"  [arg-type]
# E[pyright]: No overloads for "stage" match the provided arguments (reportCallIssue)
# E[pyright]: Argument of type "(x: int, y: int) -> int" cannot be assigned to parameter "fn" of type "(A@stage) -> B@stage" in function "stage" / Type "(x: int, y: int) -> int" is not assignable to type "(A@stage) -> B@stage" / Extra parameter "y" (reportArgumentType)
# E[pyright]: Untyped function decorator obscures type of function; ignoring decorator (reportUntypedFunctionDecorator)
@stage
def two_arguments(x: int, y: int) -> int:
    return x + y


# E[mypy]: Argument 1 to "stage" has incompatible type "Callable[[], int]"; expected "Callable[[Never], Coroutine[Any, Any, Never]]"  [arg-type]
# E[pyright]: No overloads for "stage" match the provided arguments (reportCallIssue)
# E[pyright]: Function accepts too few positional parameters; expected 1 but received 0 (reportArgumentType)
# E[pyright]: Untyped function decorator obscures type of function; ignoring decorator (reportUntypedFunctionDecorator)
@stage
def no_argument() -> int:
    return 1


@stage
def show(x: int) -> str:
    return str(x)


@stage
async def fetch(url: str) -> bytes:
    return url.encode()


# A decorated function is still called with the item's type.
def call_sync() -> str:
    # E[mypy]: Argument 1 to "__call__" of "FnStage" has incompatible type "str"; expected "int"  [arg-type]
    # E[pyright]: Argument of type "Literal['1']" cannot be assigned to parameter "item" of type "int" in function "__call__"
    return show("1")


async def call_async() -> bytes:
    # E[mypy]: Argument 1 to "__call__" of "AsyncFnStage" has incompatible type "int"; expected "str"  [arg-type]
    # E[pyright]: Argument of type "Literal[1]" cannot be assigned to parameter "item" of type "str" in function "__call__"
    return await fetch(1)


def unwrapped_wrong() -> bytes:
    # E[mypy]: Incompatible return value type (got "str", expected "bytes")  [return-value]
    # E[pyright]: Type "str" is not assignable to return type "bytes"
    return show.__wrapped__(1)


# SystemExit, KeyboardInterrupt and CancelledError are never retried: retry_on takes Exception classes.
# E[mypy]: Argument "retry_on" to "stage" has incompatible type "tuple[type[SystemExit]]"; expected "tuple[type[Exception], ...]"  [arg-type]
# E[pyright]: Argument of type "tuple[type[SystemExit]]" cannot be assigned to parameter "retry_on" of type "tuple[type[Exception], ...]" in function "stage"
@stage(retries=2, retry_on=(SystemExit,))
def retries_an_exit(x: int) -> int:
    return x


def double_it(x: int) -> int:
    return 2 * x


# Called on a function: a plain function is refused on the task backend, as by the
# decorator form, and the options are checked as there.
# E[mypy]: No overload variant of "stage" matches argument types "Callable[[int], int]", "str"  [call-overload]
# E[pyright]: No overloads for "stage" match the provided arguments (reportCallIssue)
# E[pyright]: Argument of type "Literal['task']" cannot be assigned to parameter "backend" of type "Literal['thread', 'process']" in function "stage"
# E[pyright]: Type of "on_tasks" is unknown (reportUnknownVariableType)
on_tasks = stage(double_it, backend="task")
# E[mypy]: No overload variant of "stage" matches argument types "Callable[[int], int]", "str"  [call-overload]
# E[pyright]: No overloads for "stage" match the provided arguments (reportCallIssue)
# E[pyright]: Argument of type "Literal['4']" cannot be assigned to parameter "workers" of type "int" in function "stage"
# E[pyright]: Type of "workers_as_text_too" is unknown (reportUnknownVariableType)
workers_as_text_too = stage(double_it, workers="4")
