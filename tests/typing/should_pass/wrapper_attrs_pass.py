"""A stage looks like the function it wraps: the function's attributes are typed.

``_FnStage.__init__`` copies ``__module__``, ``__name__``, ``__qualname__`` and
``__doc__`` from the function (as ``functools.update_wrapper`` does), so they
must be readable without a type error.
"""

from __future__ import annotations

from typing_extensions import assert_type

from typeflow import stage


@stage
def show(x: int) -> str:
    """Format a number."""
    return str(x)


@stage
async def encode(x: str) -> bytes:
    return x.encode()


assert_type(show.__name__, str)
assert_type(show.__qualname__, str)
assert_type(show.__doc__, str | None)
assert_type(show.__module__, str)
assert_type(encode.__name__, str)
assert_type(encode.__qualname__, str)
