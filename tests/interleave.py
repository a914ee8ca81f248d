"""Deterministic interleavings of asyncio actors, one gated call at a time.

Each actor is a coroutine whose calls to the outside world (backend calls) go through
:meth:`Schedule.step`. A schedule is a sequence of actor names: the n-th gated call to run is
one of the n-th name's. A call runs alone (the next one starts only when it returned), and a
check runs after every call, so an invariant is seen between any two steps.

An actor that ends before its slots are used has its remaining slots skipped; one that makes
more calls than it has slots (a retry on a path the schedule did not foresee) runs them after
the schedule is used up, in turn with the others. :func:`schedules` enumerates every ordering
of the given step counts (the counts of a run without interleaving, see :class:`Counter`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Schedule:
    def __init__(
        self, order: list[str], check: Callable[[str], Awaitable[None]] | None = None
    ) -> None:
        self._order = list(order)
        self._check = check
        self._done: set[str] = set()
        self._turn = asyncio.Condition()
        self._position = 0
        self.trace: list[str] = []  # "actor:label" of every call, in the order they ran

    def _current(self) -> str | None:
        """Whose turn it is (None: the schedule is used up, anyone may go)."""
        while self._position < len(self._order) and self._order[self._position] in self._done:
            self._position += 1
        if self._position < len(self._order):
            return self._order[self._position]
        return None

    async def step(self, actor: str, label: str, call: Callable[[], Awaitable[T]]) -> T:
        """Runs ``call`` as ``actor``'s next step, when it is that actor's turn."""
        async with self._turn:
            await self._turn.wait_for(lambda: self._current() in (actor, None))
            try:
                self.trace.append(f"{actor}:{label}")
                return await call()
            finally:
                if self._position < len(self._order):
                    self._position += 1
                if self._check is not None:
                    await self._check(f"after {actor}:{label}")
                self._turn.notify_all()

    async def finished(self, actor: str) -> None:
        """Says that ``actor`` makes no more calls (its remaining slots are skipped)."""
        async with self._turn:
            self._done.add(actor)
            self._turn.notify_all()

    async def run(self, actors: dict[str, Callable[[], Awaitable[object]]]) -> dict[str, object]:
        """Runs the actors to the end; each one's result, or the exception it ended with."""

        async def play(name: str, body: Callable[[], Awaitable[object]]) -> object:
            try:
                return await body()
            except Exception as exc:  # an actor's failure is a result to look at
                return exc
            finally:
                await self.finished(name)

        results = await asyncio.gather(*(play(name, body) for name, body in actors.items()))
        return dict(zip(actors, results, strict=True))


class Counter:
    """A schedule that lets everything run in the order it comes, counting each actor's calls
    (to learn the step counts that :func:`schedules` interleaves)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    async def step(self, actor: str, label: str, call: Callable[[], Awaitable[T]]) -> T:
        self.counts[actor] = self.counts.get(actor, 0) + 1
        return await call()


def schedules(counts: dict[str, int]) -> Iterator[list[str]]:
    """Every distinct ordering of the actors' steps (multinomial many: keep counts small)."""
    names = list(counts)

    def orderings(left: dict[str, int]) -> Iterator[list[str]]:
        if not any(left.values()):
            yield []
            return
        for name in names:
            if left[name]:
                for rest in orderings({**left, name: left[name] - 1}):
                    yield [name, *rest]

    yield from orderings(dict(counts))
