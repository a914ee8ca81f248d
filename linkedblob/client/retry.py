"""The client's one retry helper: exponential backoff on transient failures, within a budget of
time without progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from linkedblob.client.errors import ClientError, is_transient

T = TypeVar("T")

_FIRST_DELAY_SECONDS = 0.05
_MAX_DELAY_SECONDS = 2.0


class Retry:
    """Backoff (50 ms, doubling up to 2 s) until ``budget`` seconds have passed since the start
    or the last :meth:`reset` (which a caller makes when it sees progress)."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.reset()

    def reset(self) -> None:
        self.deadline = time.monotonic() + self.budget
        self.delay = _FIRST_DELAY_SECONDS

    def wait(self, error: ClientError) -> None:
        """Sleeps before the next attempt; raises ``error`` when that would pass the budget."""
        if time.monotonic() + self.delay > self.deadline:
            raise error
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, _MAX_DELAY_SECONDS)

    def call(
        self, fn: Callable[[], T], retryable: Callable[[ClientError], bool] = is_transient
    ) -> T:
        """``fn()``, retried while it fails with an error ``retryable`` accepts (by default a
        transient one: :data:`linkedblob.client.errors.RETRYABLE`)."""
        while True:
            try:
                return fn()
            except ClientError as e:
                if not retryable(e):
                    raise
                self.wait(e)
