"""The runner of fork and route nodes (see :mod:`typeflow._fork` for the shapes).

A split node is one worker of its own: a *splitter* thread hands each item to
the branches' first buffers, and a *joiner* thread collects what the branches'
last stages emit::

    inbox ──splitter──▶ branch 0 stages ──┐
                 └────▶ branch 1 stages ──┴──▶ join buffer ──joiner──▶ next stage

The branches' stages run on their own backends, started through
:meth:`RunEnv.start_chain <typeflow._backends._base.RunEnv.start_chain>`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

from typeflow._backends._base import Emitter, RunEnv
from typeflow._errors import StageError
from typeflow._runtime._channel import Channel, ChannelAborted, EndOfChannel
from typeflow._runtime._kernel import (
    Envelope,
    FirstCall,
    Kernel,
    Key,
    Node,
    Outcome,
    WorkerContext,
)

__all__ = ["SplitGroup", "SplitKernel", "start"]

#: A branch's outcome entry as the joiner gets it: branch index, key, kind, payload.
_Tagged = tuple[int, Any, int, object]
#: The entry kinds of typeflow._runtime._run that a branch's last stage sends.
_FAILED, _DELTA, _OKS, _GROUP = 1, 2, 3, 4


class _BranchFailed:
    """A branch's failure on an item, waiting in the joiner for the other branches."""

    __slots__ = ("error",)

    def __init__(self, error: StageError) -> None:
        self.error = error


class SplitKernel(Kernel):
    """Describes a split node; its work is done by :func:`start`'s threads."""

    __slots__ = ("branches", "mode", "predicate")

    def __init__(
        self,
        name: str,
        mode: Literal["fork", "route"],
        branches: tuple[tuple[Node, ...], ...],
        predicate: Callable[[Any], object] | None = None,
    ) -> None:
        super().__init__(name, is_async=False)
        self.mode = mode
        self.branches = branches
        self.predicate = predicate

    def process(self, batch: list[Envelope], ctx: WorkerContext) -> Outcome:
        raise NotImplementedError("a split node is run by its own threads")

    async def aprocess(self, batch: list[Envelope], ctx: WorkerContext) -> Outcome:
        raise NotImplementedError("a split node is run by its own threads")


class _TaggedOutbox:
    """What a branch's last stage emits into: the shared join buffer, tagged by branch."""

    __slots__ = ("_index", "_join")

    def __init__(self, join: Channel[_Tagged], index: int) -> None:
        self._join = join
        self._index = index

    def put_many(self, batch: list[tuple[Key, int, object]]) -> None:
        self._join.put_many([(self._index, *entry) for entry in batch])

    def offer(self, batch: list[tuple[Key, int, object]]) -> bool:
        return self._join.offer([(self._index, *entry) for entry in batch])

    async def aput_many(self, batch: list[tuple[Key, int, object]]) -> None:
        await self._join.aput_many([(self._index, *entry) for entry in batch])

    def producer_done(self) -> None:
        self._join.producer_done()


class SplitGroup:
    """The splitter, the joiner and every branch's workers of one split node."""

    def __init__(self, node: Node, inbox: Channel[Envelope], emitter: Emitter, env: RunEnv):
        kernel = node.kernel
        assert isinstance(kernel, SplitKernel)
        self._kernel = kernel
        predicate = kernel.predicate
        #: A route's predicate, vetted by its first call (an async one that does not
        #: look async would send every item to ``then``: see FirstCall).
        self._predicate: Callable[[Any], object] | None = (
            None if predicate is None else FirstCall(node.name, predicate, self)
        )
        self._node = node
        self._inbox = inbox
        self._emitter = emitter
        branches = kernel.branches
        self._firsts: list[Channel[Envelope]] = [
            Channel(nodes[0].options.buffer) for nodes in branches
        ]
        self._join: Channel[_Tagged] = Channel(
            max(n[-1].options.buffer for n in branches),
            producers=sum(nodes[-1].options.workers for nodes in branches),
        )
        channels: list[Channel[Any]] = [*self._firsts, self._join]
        for channel in channels:
            env.on_shutdown(channel.abort)
        self._groups = [
            group
            for i, nodes in enumerate(branches)
            for group in env.start_chain(
                nodes, self._firsts[i], _TaggedOutbox(self._join, i), f"{node.name}[{i}]"
            )
        ]
        #: Branch failures held in the joiner until the other branches finish the item.
        self._failures_held = 0
        self._threads = [
            threading.Thread(target=self._split, name=f"typeflow:{node.name}:split", daemon=True),
            threading.Thread(target=self._gather, name=f"typeflow:{node.name}:join", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _split(self) -> None:
        kernel, firsts = self._kernel, self._firsts
        try:
            while True:
                batch = self._inbox.get_many(256)
                if kernel.mode == "fork":
                    for first in firsts:
                        first.put_many(batch)
                else:
                    self._route(batch)
        except (EndOfChannel, ChannelAborted):
            pass
        finally:
            for first in firsts:
                first.producer_done()

    def vetted(self) -> None:
        """The predicate's first verdict was a plain value: call it directly now."""
        self._predicate = self._kernel.predicate

    def _route(self, batch: list[Envelope]) -> None:
        predicate = self._predicate
        assert predicate is not None
        chosen: tuple[list[Envelope], list[Envelope]] = ([], [])
        failed: list[tuple[Key, StageError]] = []
        for key, item in batch:
            try:
                chosen[0 if predicate(item) else 1].append((key, item))
            except BaseException as exc:  # noqa: BLE001 - becomes this item's Failure, as in a stage
                failed.append((key, StageError(self._node.name, item, exc)))
        if failed:
            self._emitter.emit(Outcome(failed=failed))
            # This frame outlives the call when a failure's traceback holds it (as
            # the predicate's caller): it must not hold the failures, which hold
            # the traceback (see release_callers in the kernel).
            del failed
        for first, part in zip(self._firsts, chosen, strict=True):
            if part:
                first.put_many(part)

    def _gather(self) -> None:
        joining = self._kernel.mode == "fork"
        #: Fork: per branch, what it has made for items the others have not finished.
        have: list[dict[Key, object]] = [{} for _ in self._kernel.branches]
        try:
            while True:
                entries = self._join.get_many(1024)
                out = Outcome()
                for branch, key, kind, payload in entries:
                    if joining:
                        self._join_fork(out, have, branch, key, kind, payload)
                    else:
                        self._pass_on(out, key, kind, payload)
                self._emitter.emit(out)
        except (EndOfChannel, ChannelAborted):
            pass
        finally:
            self._emitter.done()

    @staticmethod
    def _pass_on(out: Outcome, key: Any, kind: int, payload: object) -> None:
        """Route: what the chosen branch made goes on as it comes."""
        if kind == _OKS:
            out.ok += zip(key, cast("Sequence[object]", payload), strict=True)
        elif kind == _FAILED:
            out.failed.append((key, cast("StageError", payload)))
        elif kind == _DELTA:
            out.deltas.append((key, cast("int", payload)))
        else:  # a root with every output it has (none, if filtered out)
            envelopes = cast("list[Envelope]", payload)
            out.ok += envelopes
            if len(envelopes) != 1:
                out.deltas.append((key, len(envelopes) - 1))
            out.whole.append(key)

    def _join_fork(
        self,
        out: Outcome,
        have: list[dict[Key, object]],
        branch: int,
        key: Any,
        kind: int,
        payload: object,
    ) -> None:
        """Fork: keep what one branch made; join the items every branch has made.

        Branches make one output per item (checked when the fork is built), so a
        branch sends its successes as OKS batches and its failures one by one;
        the lookups and the joins run over whole batches, in C.
        """
        mine = have[branch]
        if kind == _OKS:
            keys = cast("Sequence[Key]", key)
            mine.update(zip(keys, cast("Sequence[object]", payload), strict=True))
        else:
            assert kind == _FAILED, f"a fork branch sent entry kind {kind}"
            keys = (key,)
            mine[key] = _BranchFailed(cast("StageError", payload))
            self._failures_held += 1
        done: Sequence[Key] = keys
        for other in have:
            if other is not mine:
                done = list(filter(other.__contains__, done))
        if not done:
            return
        rows = zip(*[map(d.pop, done) for d in have], strict=True)
        if not self._failures_held:
            out.ok += zip(done, rows, strict=True)
            return
        for row_key, row in zip(done, rows, strict=True):
            failures = [v for v in row if type(v) is _BranchFailed]
            if not failures:
                out.ok.append((row_key, row))
                continue
            self._failures_held -= len(failures)
            # The first failing branch names itself.
            out.failed.append((row_key, failures[0].error))

    def cancel(self) -> None:
        for group in self._groups:
            group.cancel()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        ok = True
        for group in self._groups:
            ok = group.join(max(0.0, deadline - time.monotonic())) and ok
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return ok and not any(t.is_alive() for t in self._threads)


def start(
    node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
) -> SplitGroup:
    return SplitGroup(node, inbox, emitters[0], env)
