# ruff: noqa: E501
"""Forks whose branches do not fit, or whose tuple is used wrongly."""

from __future__ import annotations

from typeflow import Stage, fork, stage


@stage
def length(word: str) -> int:
    return len(word)


@stage
def shout(word: str) -> str:
    return word.upper()


@stage
def double(n: int) -> int:
    return 2 * n


@stage
def wants_pair_of_ints(pair: tuple[int, int]) -> int:
    return pair[0] + pair[1]


# The joined tuple is (int, str), not (int, int).
# E[mypy]: Unsupported operand types for | ("Stage[str, tuple[int, str]]" and "FnStage[tuple[int, int], int]")
# E[pyright]: Operator "|" not supported for types "Stage[str, tuple[int, str]]" and "FnStage[tuple[int, int], int]"
# E[pyright]: Type of "wrong_join" is unknown
wrong_join = fork(length, shout) | wants_pair_of_ints

# Annotating the wrong arity is an error too.
# E[mypy]: Incompatible types in assignment (expression has type "Stage[str, tuple[int, str]]", variable has type "Stage[str, tuple[int, str, int]]")
# E[pyright]: Type "Stage[str, tuple[int, str]]" is not assignable to declared type "Stage[str, tuple[int, str, int]]"
three: Stage[str, tuple[int, str, int]] = fork(length, shout)

# Branches that take different inputs: pyright rejects the call; mypy infers
# Never for the input, which fails as soon as anything is piped in.
# E[pyright]: No overloads for "fork" match the provided arguments (reportCallIssue)
# E[pyright]: "FnStage[int, int]" is not assignable to "Stage[str, int]" / Type parameter "In@Stage" is contravariant
# E[pyright]: Type of "mixed" is unknown
mixed = fork(length, double)
# E[mypy]: Unsupported operand types for | ("FnStage[str, str]" and "Stage[Never, tuple[int, int]]")
# E[pyright]: Type of "fed" is unknown
fed = shout | mixed
