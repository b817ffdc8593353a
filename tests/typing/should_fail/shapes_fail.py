# ruff: noqa: E501
"""Dataflow shapes used wrongly: both checkers must reject each of these.

Markers on the comment lines directly above a line are about that line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from typeflow import AsyncStatefulStage, StatefulStage, flat_map, keep, keep_type, merge, stage


@stage
def parse(text: str) -> int:
    return int(text)


@stage
def double(n: int) -> int:
    return 2 * n


@flat_map
def words(line: str) -> Iterator[str]:
    yield from line.split()


def is_even(n: int) -> bool:
    return n % 2 == 0


# -- one-to-many ----------------------------------------------------------------------


# A one-to-many function must return an iterable.  mypy's message names the
# first overload (the async generator one).
# E[mypy]: Argument 1 to "flat_map" has incompatible type "Callable[[str], int]"; expected "Callable[[str], AsyncIterable[Never]]"  [arg-type]
# E[pyright]: No overloads for "flat_map" match the provided arguments (reportCallIssue)
# E[pyright]: Function return type "int" is incompatible with type "Iterable[B@flat_map]" / "int" is incompatible with protocol "Iterable[B@flat_map]"
# E[pyright]: Untyped function decorator obscures type of function; ignoring decorator (reportUntypedFunctionDecorator)
@flat_map
def not_iterable(text: str) -> int:
    return len(text)


# A coroutine function is not an async generator: it must yield.
# E[mypy]: Argument 1 to "flat_map" has incompatible type "Callable[[str], Coroutine[Any, Any, list[str]]]"; expected "Callable[[str], AsyncIterable[Never]]"  [arg-type]
# E[pyright]: No overloads for "flat_map" match the provided arguments (reportCallIssue)
# E[pyright]: Function return type "CoroutineType[Any, Any, list[str]]" is incompatible with type "Iterable[B@flat_map]"
# E[pyright]: Untyped function decorator obscures type of function; ignoring decorator (reportUntypedFunctionDecorator)
@flat_map
async def awaits_a_list(text: str) -> list[str]:
    return text.split()


# E[mypy]: Argument 1 to "__call__" of "FlatMapDecorator" has incompatible type "Callable[[str], float]"; expected "Callable[[str], AsyncIterable[Never]]"  [arg-type]
# E[pyright]: No overloads for "__call__" match the provided arguments (reportCallIssue)
# E[pyright]: Function return type "float" is incompatible with type "Iterable[B@__call__]"
# E[pyright]: Untyped function decorator obscures type of function; ignoring decorator (reportUntypedFunctionDecorator)
@flat_map(workers=2)
def not_iterable_with_options(text: str) -> float:
    return float(text)


# The element type flows on: words makes str, double takes int.
# E[mypy]: Unsupported operand types for | ("FlatMapStage[str, str]" and "FnStage[int, int]")  [operator]
# E[pyright]: Operator "|" not supported for types "FlatMapStage[str, str]" and "FnStage[int, int]" (reportOperatorIssue)
# E[pyright]: Type of "words_into_double" is unknown (reportUnknownVariableType)
words_into_double = words | double


async def agen(line: str) -> AsyncIterator[bytes]:
    yield line.encode()


# An async generator's elements are typed too.
# E[mypy]: Unsupported operand types for | ("AsyncFlatMapStage[str, bytes]" and "FnStage[int, int]")  [operator]
# E[pyright]: Operator "|" not supported for types "AsyncFlatMapStage[str, bytes]" and "FnStage[int, int]" (reportOperatorIssue)
# E[pyright]: Type of "bytes_into_double" is unknown (reportUnknownVariableType)
bytes_into_double = flat_map(agen) | double


# -- filters --------------------------------------------------------------------------

# A filter passes its items on unchanged: it cannot change their type.  mypy
# solves keep's type variable from the left side of | and rejects the predicate.
# E[mypy]: Argument 1 to "keep" has incompatible type "Callable[[int], bool]"; expected "Callable[[str], TypeIs[Never]]"  [arg-type]
# E[pyright]: Operator "|" not supported for types "FlatMapStage[str, str]" and "Stage[int, int]" (reportOperatorIssue)
# E[pyright]: Type of "strings_into_even" is unknown (reportUnknownVariableType)
strings_into_even = words | keep(is_even)

# E[mypy]: Unsupported operand types for | ("Stage[int, int]" and "FlatMapStage[str, str]")  [operator]
# E[pyright]: Operator "|" not supported for types "Stage[int, int]" and "FlatMapStage[str, str]" (reportOperatorIssue)
# E[pyright]: Type of "even_into_words" is unknown (reportUnknownVariableType)
even_into_words = keep(is_even) | words

# The fluent form takes a predicate over the upstream's output.  (mypy reports
# against the first overload, the narrowing one, hence "TypeIs[Never]".)
# E[mypy]: Argument 1 to "keep" of "Stage" has incompatible type "Callable[[int], bool]"; expected "Callable[[str], TypeIs[Never]]"  [arg-type]
# E[mypy]: Need type annotation for "wrong_predicate"
# E[pyright]: No overloads for "keep" match the provided arguments
# E[pyright]: Argument of type "(n: int) -> bool" cannot be assigned to parameter "predicate" of type "(str) -> object" in function "keep"
# E[pyright]: Type of "wrong_predicate" is unknown
wrong_predicate = words.keep(is_even)

# keep_type(int) makes int.
# E[mypy]: Unsupported operand types for | ("Stage[object, int]" and "FlatMapStage[str, str]")  [operator]
# E[pyright]: Operator "|" not supported for types "Stage[object, int]" and "FlatMapStage[str, str]" (reportOperatorIssue)
# E[pyright]: Type of "ints_into_words" is unknown (reportUnknownVariableType)
ints_into_words = keep_type(int) | words


# -- batch and unbatch ------------------------------------------------------------------

# A batch stage fed into a stage that takes single items.
# E[mypy]: Unsupported operand types for | ("Pipeline[str, list[int]]" and "FnStage[int, int]")  [operator]
# E[pyright]: Operator "|" not supported for types "Pipeline[str, list[int]]" and "FnStage[int, int]" (reportOperatorIssue)
# E[pyright]: Type of "batch_into_single" is unknown (reportUnknownVariableType)
batch_into_single = parse.batch(10) | double

# unbatch needs a pipeline that produces iterables.
# E[mypy]: Invalid self argument "FnStage[str, int]" to attribute function "unbatch" with type "Callable[[Stage[In, Iterable[C]]], Pipeline[In, C]]"  [misc]
# E[mypy]: Need type annotation for "unbatch_ints"  [var-annotated]
# E[pyright]: Cannot access attribute "unbatch" for class "FnStage[str, int]" / Could not bind method "unbatch" because "FnStage[str, int]" is not assignable to parameter "self"
# E[pyright]: Type of "unbatch" is unknown (reportUnknownMemberType)
# E[pyright]: Type of "unbatch_ints" is unknown (reportUnknownVariableType)
unbatch_ints = parse.unbatch()

# The batch size is a number of items.
# E[mypy]: Argument 1 to "batch" of "Stage" has incompatible type "str"; expected "int"  [arg-type]
# E[pyright]: Argument of type "Literal['10']" cannot be assigned to parameter "size" of type "int" in function "batch"
size_as_text = parse.batch("10")


# -- stateful stages ----------------------------------------------------------------------


class WrongInput(StatefulStage[str, int]):
    # E[mypy]: Argument 1 of "process" is incompatible with supertype "typeflow._shapes.StatefulStage"; supertype defines the argument type as "str"  [override]
    # E[pyright]: Method "process" overrides class "StatefulStage" in an incompatible manner / Parameter 2 type mismatch: base parameter is type "str", override parameter is type "int"
    def process(self, item: int, /) -> int:  # takes less than str: breaks Liskov
        return item


class WrongOutput(StatefulStage[str, int]):
    # E[mypy]: Return type "str" of "process" incompatible with return type "int" in supertype "typeflow._shapes.StatefulStage"  [override]
    # E[pyright]: Method "process" overrides class "StatefulStage" in an incompatible manner / Return type mismatch: base method returns type "int", override returns type "str"
    def process(self, item: str, /) -> str:  # promises str, not int
        return item


# Options are class keywords, typed like @stage's.
# E[mypy]: Argument "backend" to "__init_subclass__" of "_StatefulBase" has incompatible type "Literal['gpu']"; expected "Literal['thread', 'process', 'task']"  [arg-type]
# E[pyright]: Incorrect keyword arguments for __init_subclass__ method (reportGeneralTypeIssues)
# E[pyright]: Argument of type "Literal['gpu']" cannot be assigned to parameter "backend" of type "Backend" in function "__init_subclass__"
class GpuBackend(StatefulStage[str, int], backend="gpu"):
    def process(self, item: str, /) -> int:
        return len(item)


# E[mypy]: Argument "workers" to "__init_subclass__" of "_StatefulBase" has incompatible type "str"; expected "int"  [arg-type]
# E[pyright]: Incorrect keyword arguments for __init_subclass__ method (reportGeneralTypeIssues)
# E[pyright]: Argument of type "Literal['4']" cannot be assigned to parameter "workers" of type "int" in function "__init_subclass__"
class WorkersAsText(StatefulStage[str, int], workers="4"):
    def process(self, item: str, /) -> int:
        return len(item)


# E[mypy]: Argument "shared" to "__init_subclass__" of "_StatefulBase" has incompatible type "str"; expected "bool"  [arg-type]
# E[pyright]: Incorrect keyword arguments for __init_subclass__ method (reportGeneralTypeIssues)
# E[pyright]: Argument of type "Literal['yes']" cannot be assigned to parameter "shared" of type "bool" in function "__init_subclass__"
class SharedAsText(StatefulStage[str, int], shared="yes"):
    def process(self, item: str, /) -> int:
        return len(item)


class NoProcess(StatefulStage[str, int]):
    def setup(self) -> None:
        self.ready = True


# Without process the class is abstract.
# E[mypy]: Cannot instantiate abstract class "NoProcess" with abstract attribute "process"  [abstract]
# E[pyright]: Cannot instantiate abstract class "NoProcess" / "StatefulStage.process" is not implemented (reportAbstractUsage)
no_process = NoProcess()


class SyncProcess(AsyncStatefulStage[str, int], backend="task"):
    # E[mypy]: Return type "int" of "process" incompatible with return type "Coroutine[Any, Any, int]" in supertype "typeflow._shapes.AsyncStatefulStage"  [override]
    # E[pyright]: Method "process" overrides class "AsyncStatefulStage" in an incompatible manner / Return type mismatch: base method returns type "CoroutineType[Any, Any, int]", override returns type "int"
    def process(self, item: str, /) -> int:  # must be async def
        return len(item)


class Lookup(StatefulStage[str, int]):
    def process(self, item: str, /) -> int:
        return len(item)


# Lookup takes str: parse makes int.
# E[mypy]: Unsupported operand types for | ("FnStage[str, int]" and "Lookup")  [operator]
# E[pyright]: Operator "|" not supported for types "FnStage[str, int]" and "Lookup" (reportOperatorIssue)
# E[pyright]: Type of "int_into_lookup" is unknown (reportUnknownVariableType)
int_into_lookup = parse | Lookup()

# Lookup makes int: words takes str.
# E[mypy]: Unsupported operand types for | ("Lookup" and "FlatMapStage[str, str]")  [operator]
# E[pyright]: Operator "|" not supported for types "Lookup" and "FlatMapStage[str, str]" (reportOperatorIssue)
# E[pyright]: Type of "lookup_into_words" is unknown (reportUnknownVariableType)
lookup_into_words = Lookup() | words


# -- feeds, runs and merge ----------------------------------------------------------------


def feed_wrong_item() -> None:
    feed = (parse | double).feed()
    # E[mypy]: Argument 1 to "put" of "Feed" has incompatible type "int"; expected "str"  [arg-type]
    # E[pyright]: Argument of type "Literal[1]" cannot be assigned to parameter "item" of type "str" in function "put"
    feed.put(1)


async def afeed_wrong_item() -> None:
    feed = parse.feed()
    # E[mypy]: Argument 1 to "aput" of "Feed" has incompatible type "bytes"; expected "str"  [arg-type]
    # E[pyright]: Argument of type "Literal[b"1"]" cannot be assigned to parameter "item" of type "str" in function "aput"
    await feed.aput(b"1")


def feed_results() -> None:
    with words.feed() as feed:
        for result in feed:
            # E[mypy]: Incompatible types in assignment (expression has type "str", variable has type "int")  [assignment]
            # E[pyright]: Type "str" is not assignable to declared type "int"
            number: int = result.unwrap()
            print(number)


def take_and_consume() -> None:
    # E[mypy]: List comprehension has incompatible type List[int]; expected List[str]  [misc]
    # E[pyright]: Type "list[int]" is not assignable to declared type "list[str]" (reportAssignmentType)
    firsts: list[str] = [r.unwrap() for r in parse.run(["1"]).take(1)]
    print(firsts)
    # E[mypy]: Incompatible types in assignment (expression has type "list[StageError]", variable has type "list[ValueError]")  [assignment]
    # E[pyright]: Type "list[StageError]" is not assignable to declared type "list[ValueError]"
    errors: list[ValueError] = parse.run(["1"]).consume()
    print(errors)


def values_are_the_values() -> None:
    # E[mypy]: Argument 1 to "list" has incompatible type "Generator[int, None, None]"; expected "Iterable[str]"  [arg-type]
    # E[pyright]: Type "list[int]" is not assignable to declared type "list[str]"
    texts: list[str] = list(parse.run(["1"]).values())
    print(texts)


def merged_types(texts: list[str], numbers: list[int]) -> None:
    # merge's result is the union of its sources' item types.  mypy solves both
    # type variables from the declared type, so it blames the second source.
    # E[mypy]: Argument 2 to "merge" has incompatible type "list[int]"; expected "Iterable[str]"  [arg-type]
    # E[pyright]: Type "Iterator[str | int]" is not assignable to declared type "Iterator[str]"
    only_str: Iterator[str] = merge(texts, numbers)
    print(only_str)
    # A merged stream of str | int is not an input for a stage that takes str.
    # E[mypy]: Argument 2 to "merge" has incompatible type "list[int]"; expected "Iterable[str]"  [arg-type]
    # E[pyright]: Argument of type "Iterator[str | int]" cannot be assigned to parameter "items" of type "Iterable[str] | AsyncIterable[str]" in function "run"
    parse.run(merge(texts, numbers))
