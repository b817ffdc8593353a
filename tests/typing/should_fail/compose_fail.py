# ruff: noqa: E501
"""Stages that do not fit together: each message names both sides.

Markers on the comment lines directly above a line are about that line.
"""

from __future__ import annotations

from typeflow import stage


@stage
def parse(text: str) -> int:
    return int(text)


@stage
def is_even(n: int) -> bool:
    return n % 2 == 0


@stage
def need_bytes(data: bytes) -> int:
    return len(data)


@stage
def describe(x: object) -> str:
    return repr(x)


def plain(text: str) -> str:
    return text


# E[mypy]: Unsupported operand types for | ("FnStage[str, int]" and "FnStage[bytes, int]")  [operator]
# E[pyright]: Operator "|" not supported for types "FnStage[str, int]" and "FnStage[bytes, int]" (reportOperatorIssue)
# E[pyright]: Type of "mismatch" is unknown (reportUnknownVariableType)
mismatch = parse | need_bytes

# Deep in a chain: the left side is the pipeline so far.
# E[mypy]: Unsupported operand types for | ("Pipeline[str, str]" and "FnStage[bytes, int]")  [operator]
# E[pyright]: Operator "|" not supported for types "Pipeline[str, str]" and "FnStage[bytes, int]" (reportOperatorIssue)
# E[pyright]: Type of "deep" is unknown (reportUnknownVariableType)
deep = parse | is_even | describe | need_bytes

# E[mypy]: Unsupported operand types for | ("FnStage[int, bool]" and "FnStage[bytes, int]")  [operator]
# E[pyright]: Operator "|" not supported for types "FnStage[int, bool]" and "FnStage[bytes, int]" (reportOperatorIssue)
# E[pyright]: Type of "nested" is unknown (reportUnknownVariableType)
nested = parse | (is_even | need_bytes)

head = parse | is_even
tail = need_bytes | describe
# E[mypy]: Unsupported operand types for | ("Pipeline[str, bool]" and "Pipeline[bytes, str]")  [operator]
# E[pyright]: Operator "|" not supported for types "Pipeline[str, bool]" and "Pipeline[bytes, str]" (reportOperatorIssue)
# E[pyright]: Type of "pipelines" is unknown (reportUnknownVariableType)
pipelines = head | tail

# .then() names the input type it expected.
# E[mypy]: Argument 1 to "then" of "Stage" has incompatible type "FnStage[bytes, int]"; expected "Stage[int, int]"  [arg-type]
# E[pyright]: Argument of type "FnStage[bytes, int]" cannot be assigned to parameter "other" of type "Stage[int, C@then]" in function "then" / "FnStage[bytes, int]" is not assignable to "Stage[int, int]" / Type parameter "In@Stage" is contravariant, but "bytes" is not a supertype of "int" / "int" is not assignable to "bytes" (reportArgumentType)
method = parse.then(need_bytes)

# E[mypy]: Argument 1 to "then" of "Stage" has incompatible type "FnStage[bytes, int]"; expected "Stage[bool, int]"  [arg-type]
# E[pyright]: Type parameter "In@Stage" is contravariant, but "bytes" is not a supertype of "bool"
method_chain = parse.then(is_even).then(need_bytes)

# A plain function on the left of |: decorate it with @stage.
# E[mypy]: Unsupported operand types for | ("Callable[[str], str]" and "FnStage[str, int]")  [operator]
# E[mypy]: Need type annotation for "left_function"  [var-annotated]
# E[pyright]: Operator "|" not supported for types "(text: str) -> str" and "FnStage[str, int]" (reportOperatorIssue)
# E[pyright]: Type of "left_function" is unknown (reportUnknownVariableType)
left_function = plain | parse

# ... and on the right.
# E[mypy]: Unsupported operand types for | ("FnStage[str, int]" and "Callable[[str], str]")  [operator]
# E[mypy]: Need type annotation for "right_function"  [var-annotated]
# E[pyright]: Operator "|" not supported for types "FnStage[str, int]" and "(text: str) -> str" (reportOperatorIssue)
# E[pyright]: Type of "right_function" is unknown (reportUnknownVariableType)
right_function = parse | plain

# A class on either side of | is not rejected there (typeshed's type.__or__ and
# type.__ror__ make it a types.UnionType), only where the result is used.
# E[mypy]: Item "UnionType" of "UnionType | type[str]" has no attribute "run"  [union-attr]
# E[mypy]: Item "ABCMeta" of "UnionType | type[str]" has no attribute "run"  [union-attr]
# E[pyright]: Cannot access attribute "run" for class "UnionType" / Attribute "run" is unknown (reportAttributeAccessIssue)
# E[pyright]: Cannot access attribute "run" for class "type[str]" / Attribute "run" is unknown (reportAttributeAccessIssue)
# E[pyright]: Type of "run" is unknown (reportUnknownMemberType)
# E[pyright]: Type of "right_class" is unknown (reportUnknownVariableType)
right_class = (parse | str).run(["1"])

# E[mypy]: Item "UnionType" of "UnionType | type[str]" has no attribute "run"  [union-attr]
# E[mypy]: Item "ABCMeta" of "UnionType | type[str]" has no attribute "run"  [union-attr]
# E[pyright]: Cannot access attribute "run" for class "UnionType" / Attribute "run" is unknown (reportAttributeAccessIssue)
# E[pyright]: Cannot access attribute "run" for class "type[str]" / Attribute "run" is unknown (reportAttributeAccessIssue)
# E[pyright]: Type of "run" is unknown (reportUnknownMemberType)
# E[pyright]: Type of "left_class" is unknown (reportUnknownVariableType)
left_class = (str | parse).run(["1"])
