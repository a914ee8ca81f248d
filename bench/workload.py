"""The figures: what is measured, how, and the target each is held to."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.payload import Blob, Payload
from bench.stats import percentile
from bench.systems import Client, System

KiB = 1024
MiB = 1024 * KiB
MB = 1_000_000


@dataclass(frozen=True)
class Sizes:
    blob: int  # figures 1-3
    chunk: int  # figure 2
    stat_calls: int  # figure 4
    mount_repos: int  # figure 5
    concurrency: int  # figure 6
    concurrent_blob: int  # figure 6
    small_blob: int  # figure 7
    small_count: int  # figure 7
    rounds: int


FULL = Sizes(
    blob=256 * MiB,
    chunk=8 * MiB,
    stat_calls=1000,
    mount_repos=200,
    concurrency=8,
    concurrent_blob=32 * MiB,
    small_blob=4 * KiB,
    small_count=1000,
    rounds=3,
)
QUICK = Sizes(
    blob=8 * MiB,
    chunk=2 * MiB,
    stat_calls=50,
    mount_repos=50,
    concurrency=8,
    concurrent_blob=1 * MiB,
    small_blob=4 * KiB,
    small_count=50,
    rounds=1,
)


def human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class Row:
    """One line of the table. ``target`` is the ratio linkedblob / registry to reach."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    target: float | None


def rows(sizes: Sizes) -> list[Row]:
    blob, chunk = human(sizes.blob), human(sizes.chunk)
    return [
        Row("push", f"1. push {blob}, one stream", "MB/s", True, 2.0),
        Row("chunked", f"2. resumable push {blob}, {chunk} chunks", "MB/s", True, 2.0),
        Row("pull", f"3. pull {blob}, digest verified", "MB/s", True, 1.0),
        Row("stat_p50", f"4. stat p50 ({sizes.stat_calls} calls)", "ms", False, 1.0),
        Row("stat_p99", "4. stat p99", "ms", False, None),
        Row("mount_p50", f"5. mount p50 ({sizes.mount_repos} repos)", "ms", False, 0.5),
        Row("mount_p99", "5. mount p99", "ms", False, None),
        Row(
            "concurrent",
            f"6. {sizes.concurrency} concurrent pushes of {human(sizes.concurrent_blob)}",
            "MB/s",
            True,
            1.5,
        ),
        Row(
            "small",
            f"7. {sizes.small_count} pushes of {human(sizes.small_blob)}",
            "blobs/s",
            True,
            3.0,
        ),
    ]


# Figure 8: every server process's peak RSS during figures 1-6, and how much it grows when the
# blobs grow 8-fold (a process holding a blob would grow by the difference).
RSS_LIMIT = 150 * MiB
RSS_GROWTH_LIMIT = 16 * MiB


@dataclass
class RoundState:
    """What one round of one system leaves for the next figures: the blob of figure 1."""

    repository: str
    blob: Blob


class Workload:
    """Runs the figures on one system; each method returns the values it measured."""

    def __init__(self, system: System, sizes: Sizes, payload: Payload) -> None:
        self.system = system
        self.sizes = sizes
        self.payload = payload
        self.client: Client = system.client()

    def close(self) -> None:
        self.client.close()

    def warm_up(self, size: int) -> None:
        """Pushes and pulls one blob (the first calls pay for connections and imports)."""
        blob = self.payload.blob(size)
        self.client.push("bench/warm-up", blob)
        self.client.pull_verified("bench/warm-up", blob.digest, blob.size)

    def push(self, round_no: int) -> tuple[dict[str, float], RoundState]:
        state = RoundState(f"bench/r{round_no}/push", self.payload.blob(self.sizes.blob))
        seconds = _timed(lambda: self.client.push(state.repository, state.blob))
        return {"push": state.blob.size / seconds / MB}, state

    def chunked(self, round_no: int) -> dict[str, float]:
        blob = self.payload.blob(self.sizes.blob)
        repository = f"bench/r{round_no}/chunked"
        seconds = _timed(lambda: self.client.push_chunked(repository, blob, self.sizes.chunk))
        return {"chunked": blob.size / seconds / MB}

    def pull(self, state: RoundState) -> dict[str, float]:
        blob = state.blob
        seconds = _timed(
            lambda: self.client.pull_verified(state.repository, blob.digest, blob.size)
        )
        return {"pull": blob.size / seconds / MB}

    def stat(self, state: RoundState) -> dict[str, float]:
        digest = state.blob.digest
        latencies = [
            _timed(lambda: self.client.stat(state.repository, digest))
            for _ in range(self.sizes.stat_calls)
        ]
        return _latency("stat", latencies)

    def mount(self, round_no: int, state: RoundState) -> dict[str, float]:
        digest = state.blob.digest
        latencies = []
        for i in range(self.sizes.mount_repos):
            target = f"bench/r{round_no}/mount-{i}"
            began = time.perf_counter()
            self.client.mount(target, state.repository, digest)
            latencies.append(time.perf_counter() - began)
        return _latency("mount", latencies)

    def concurrent(self, round_no: int, state: RoundState) -> dict[str, float]:
        """N clients, each with its own connection, push distinct blobs at once."""
        n = self.sizes.concurrency
        blobs = [self.payload.blob(self.sizes.concurrent_blob) for _ in range(n)]
        clients = [self.system.client() for _ in range(n)]
        try:
            for client in clients:  # connect before the clock starts
                client.stat(state.repository, state.blob.digest)
            start = threading.Barrier(n + 1)
            failures: list[BaseException] = []

            def push(client: Client, blob: Blob, i: int) -> None:
                start.wait()
                try:
                    client.push(f"bench/r{round_no}/concurrent-{i}", blob)
                except BaseException as exc:
                    failures.append(exc)

            threads = [
                threading.Thread(target=push, args=(c, b, i))
                for i, (c, b) in enumerate(zip(clients, blobs, strict=True))
            ]
            for thread in threads:
                thread.start()
            start.wait()
            began = time.perf_counter()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - began
            if failures:
                raise failures[0]
        finally:
            for client in clients:
                client.close()
        return {"concurrent": n * self.sizes.concurrent_blob / seconds / MB}

    def small(self, round_no: int) -> dict[str, float]:
        blobs = [self.payload.blob(self.sizes.small_blob) for _ in range(self.sizes.small_count)]
        repository = f"bench/r{round_no}/small"

        def push_all() -> None:
            for blob in blobs:
                self.client.push_small(repository, blob)

        return {"small": len(blobs) / _timed(push_all)}


def _timed(call: Callable[[], object]) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def _latency(name: str, seconds: list[float]) -> dict[str, float]:
    return {
        f"{name}_p50": percentile(seconds, 50) * 1000,
        f"{name}_p99": percentile(seconds, 99) * 1000,
    }
