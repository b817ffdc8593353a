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
from typeflow._runtime._kernel import Envelope, Kernel, Key, Node, Outcome, WorkerContext

__all__ = ["SplitGroup", "SplitKernel", "start"]

#: A branch's outcome entry as the joiner gets it: branch index, key, kind, payload.
_Tagged = tuple[int, Key, int, object]
_OK, _FAILED, _DELTA = 0, 1, 2  # the entry kinds of typeflow._runtime._run


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

    def _route(self, batch: list[Envelope]) -> None:
        predicate = self._kernel.predicate
        assert predicate is not None
        chosen: tuple[list[Envelope], list[Envelope]] = ([], [])
        failed: list[tuple[Key, StageError]] = []
        for key, item in batch:
            try:
                chosen[0 if predicate(item) else 1].append((key, item))
            except Exception as exc:  # noqa: BLE001 - becomes this item's Failure
                failed.append((key, StageError(self._node.name, item, exc)))
        if failed:
            self._emitter.emit(Outcome(failed=failed))
        for first, part in zip(self._firsts, chosen, strict=True):
            if part:
                first.put_many(part)

    def _gather(self) -> None:
        width = len(self._kernel.branches)
        joining = self._kernel.mode == "fork"
        slots: dict[Key, list[tuple[int, object] | None]] = {}
        try:
            while True:
                entries = self._join.get_many(1024)
                out = Outcome()
                for branch, key, kind, payload in entries:
                    if not joining:  # route: pass everything on as it comes
                        if kind == _OK:
                            out.ok.append((key, payload))
                        elif kind == _FAILED:
                            out.failed.append((key, cast("StageError", payload)))
                        else:
                            out.deltas.append((cast("int", key), cast("int", payload)))
                        continue
                    row = slots.setdefault(key, [None] * width)
                    row[branch] = (kind, payload)
                    if all(cell is not None for cell in row):
                        del slots[key]
                        self._joined(out, key, row)
                self._emitter.emit(out)
        except (EndOfChannel, ChannelAborted):
            pass
        finally:
            self._emitter.done()

    @staticmethod
    def _joined(out: Outcome, key: Key, row: list[tuple[int, object] | None]) -> None:
        values: list[object] = []
        for cell in row:
            assert cell is not None
            kind, payload = cell
            if kind != _OK:
                assert isinstance(payload, StageError)
                out.failed.append((key, payload))  # the first failing branch names itself
                return
            values.append(payload)
        out.ok.append((key, tuple(values)))

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
