"""typeflow: typed Python functions become parallel pipelines.

Decorate one-argument functions with :func:`stage`, join them with ``|`` and run
the pipeline: every stage's workers run on threads, processes or asyncio tasks,
joined by bounded buffers, and each input item comes out as exactly one
``returns.result.Result``.

Example:
    >>> from typeflow import stage
    >>> @stage(workers=2)
    ... def parse(text: str) -> int:
    ...     return int(text)
    >>> @stage
    ... def inverse(n: int) -> float:
    ...     return 1 / n
    >>> for result in (parse | inverse).run(["4", "0", "x"]):
    ...     print(result)
    <Success: 0.25>
    <Failure: stage 'inverse' failed on item 0: ZeroDivisionError: division by zero>
    <Failure: stage 'parse' failed on item 'x': ValueError: invalid literal for int() ...>
"""

from typeflow._errors import (
    CompositionError,
    DefinitionError,
    RemoteTraceback,
    StageError,
    StageTimeout,
    TypeflowError,
    WorkerCrashed,
    WorkerStartError,
)
from typeflow._feed import Feed, FeedClosed, merge
from typeflow._fork import SplitStage, fork, route
from typeflow._options import Backend, StageOptions, is_backend
from typeflow._runtime._run import AsyncRun, Run
from typeflow._runtime._stats import RunStatistics, StageStatistics
from typeflow._shapes import (
    AsyncFlatMapStage,
    AsyncStatefulStage,
    BatchStage,
    FlatMapDecorator,
    FlatMapStage,
    IsInstance,
    StatefulStage,
    batch,
    flat_map,
    keep,
    keep_type,
    unbatch,
)
from typeflow._stage import (
    AsyncFnStage,
    AsyncStageDecorator,
    FnStage,
    Pipeline,
    Stage,
    StageDecorator,
    stage,
)
from typeflow._worker import WorkerInfo, current_worker

__all__ = [
    "AsyncFlatMapStage",
    "AsyncFnStage",
    "AsyncRun",
    "AsyncStageDecorator",
    "AsyncStatefulStage",
    "Backend",
    "BatchStage",
    "CompositionError",
    "DefinitionError",
    "Feed",
    "FeedClosed",
    "FlatMapDecorator",
    "FlatMapStage",
    "FnStage",
    "IsInstance",
    "Pipeline",
    "RemoteTraceback",
    "Run",
    "RunStatistics",
    "SplitStage",
    "Stage",
    "StageDecorator",
    "StageError",
    "StageOptions",
    "StageStatistics",
    "StageTimeout",
    "StatefulStage",
    "TypeflowError",
    "WorkerCrashed",
    "WorkerInfo",
    "WorkerStartError",
    "batch",
    "current_worker",
    "flat_map",
    "fork",
    "is_backend",
    "keep",
    "keep_type",
    "merge",
    "route",
    "stage",
    "unbatch",
]

__version__ = "0.1.0"
