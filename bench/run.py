"""``python -m bench``: starts every system, measures them in alternation, prints the table."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench import registry
from bench.lbclient import RELAY_ENV
from bench.linkedblob_side import (
    DEFAULT_PG,
    LinkedblobPostgres,
    LinkedblobUp,
    postgres_reachable,
    with_telemetry,
)
from bench.memory import PeakRss
from bench.payload import Payload
from bench.report import SystemResult, machine, table
from bench.systems import System
from bench.workload import FULL, QUICK, MiB, RoundState, Sizes, Workload, human, rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="linkedblob side by side with CNCF distribution's registry, on loopback.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, one round (the test suite's smoke run)"
    )
    parser.add_argument("--rounds", type=int, help="rounds of every figure (default 3; quick 1)")
    parser.add_argument("--no-registry", action="store_true", help="measure linkedblob only")
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL variant")
    parser.add_argument(
        "--no-linkedblob", action="store_true", help="skip linkedblob up (the SQLite variant)"
    )
    parser.add_argument(
        "--pg",
        default=os.environ.get("LINKEDBLOB_TEST_PG", DEFAULT_PG),
        help="PostgreSQL server URL; the run creates a database there and drops it",
    )
    parser.add_argument(
        "--profile-native", action="store_true", help="with --profile: C frames too (py-spy -n)"
    )
    parser.add_argument(
        "--relay",
        action="store_true",
        help="linkedblob's client without the direct path: bytes cross the gateway's relay",
    )
    parser.add_argument(
        "--telemetry",
        action="store_true",
        help="linkedblob's services with the access log (INFO, JSON) and metrics ports on",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results there")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record every linkedblob service with py-spy during each figure into DIR",
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def start_systems(
    args: argparse.Namespace, stack: contextlib.ExitStack, workdir: Path
) -> tuple[list[System], list[str]]:
    """linkedblob (up), the registry, linkedblob on PostgreSQL: in that order (A B C)."""
    notes: list[str] = []
    systems: list[System] = []

    def start(name: str, factory: Callable[[Path], System]) -> System:
        directory = workdir / name.replace("/", "-")
        directory.mkdir()
        began = time.monotonic()
        system = factory(directory)
        stack.callback(system.stop)
        systems.append(system)
        log(f"started {name} in {time.monotonic() - began:.1f}s: {system.services()}")
        return system

    if args.telemetry:
        notes.append("linkedblob: --telemetry, access log at INFO (JSON) and a metrics port each")
    if not args.no_linkedblob:
        start("linkedblob", LinkedblobUp)
    binary = None if args.no_registry else registry.find_binary()
    if binary is not None:
        start("registry", lambda d: registry.RegistrySystem(binary, d))
        notes.append(f"registry: {binary} {registry.version(binary)}")
    elif args.no_registry:
        notes.append("registry: not measured (--no-registry)")
    else:
        notes.append("registry: SKIPPED, binary not found. " + registry.INSTALL_HINT)
    if not args.no_pg:
        reason = postgres_reachable(args.pg)
        if reason is None:
            pg = start("linkedblob/pg", lambda d: LinkedblobPostgres(d, args.pg))
            assert isinstance(pg, LinkedblobPostgres)
            log(f"linkedblob/pg database: {pg.database}")
        else:
            notes.append(f"linkedblob/pg: SKIPPED, PostgreSQL unreachable at {args.pg}: {reason}")
    return systems, notes


# Figure 8 is the peak RSS over figures 1-6 (the ones moving big blobs); each figure's own peak
# is kept too (in the JSON and the log), to show which one sets it.
RSS_FIGURES = ("1-push", "2-chunked", "3-pull", "4-stat", "5-mount", "6-concur")


def measure(
    systems: list[System],
    sizes: Sizes,
    payload: Payload,
    profile: Callable[[str, System], contextlib.AbstractContextManager[None]],
) -> list[SystemResult]:
    results = {s.name: SystemResult(s.name, s.client_note) for s in systems}
    workloads = {s.name: Workload(s, sizes, payload) for s in systems}
    trackers = {s.name: PeakRss(s.services()) for s in systems}
    try:
        # Warm-up, then figure 8's growth probe: the peak while moving a blob of an eighth
        # of the size, against the peak while moving the full size.
        for system in systems:
            work, tracker, result = (
                workloads[system.name],
                trackers[system.name],
                results[system.name],
            )
            result.rss_method = tracker.method
            work.warm_up(min(MiB, sizes.blob))
            tracker.reset()
            work.warm_up(sizes.blob // 8)
            small = tracker.read()
            tracker.reset()
            work.warm_up(sizes.blob)
            large = tracker.read()
            result.rss_growth = {k: large[k] - small[k] for k in large}
            log(f"{system.name}: peak RSS at blob/8 {_mib(small)}, at blob {_mib(large)}")

        def each(
            figure: str, round_no: int, run: Callable[[Workload, int], dict[str, float]]
        ) -> None:
            for system in systems:
                tracker, result = trackers[system.name], results[system.name]
                tracker.reset()
                with profile(figure, system):
                    values = run(workloads[system.name], round_no)
                peaks = tracker.read()
                result.add(values)
                by_figure = result.peak_rss_by_figure.setdefault(figure, {})
                for service, peak in peaks.items():
                    by_figure[service] = max(peak, by_figure.get(service, 0))
                    if figure in RSS_FIGURES:
                        result.peak_rss[service] = max(peak, result.peak_rss.get(service, 0))
                shown = ", ".join(f"{k} {v:,.2f}" for k, v in values.items())
                log(f"  {figure:<10} {system.name:<14} {shown}; peak RSS {_mib(peaks)}")

        states: dict[str, RoundState] = {}

        def push(work: Workload, round_no: int) -> dict[str, float]:
            values, states[work.system.name] = work.push(round_no)
            return values

        for r in range(sizes.rounds):
            log(f"round {r + 1}/{sizes.rounds}")
            each("1-push", r, push)
            each("2-chunked", r, lambda w, r: w.chunked(r))
            each("3-pull", r, lambda w, r: w.pull(states[w.system.name]))
            each("4-stat", r, lambda w, r: w.stat(states[w.system.name]))
            each("5-mount", r, lambda w, r: w.mount(r, states[w.system.name]))
            each("6-concur", r, lambda w, r: w.concurrent(r, states[w.system.name]))
            each("7-small", r, lambda w, r: w.small(r))
    finally:
        for work in workloads.values():
            work.close()
    return [results[s.name] for s in systems]


def _mib(peaks: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in peaks.items())


@contextlib.contextmanager
def _no_profile(figure: str, system: System) -> Iterator[None]:
    yield


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.relay:
        os.environ[RELAY_ENV] = "1"
    if args.telemetry:
        with_telemetry()
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    if not args.quick and not args.no_registry and registry.find_binary() is None:
        log(registry.INSTALL_HINT)
        log("(or run `python -m bench --no-registry` to measure linkedblob alone)")
        return 2
    _stop_on_sigterm()
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()[0]
    profile: Callable[[str, System], contextlib.AbstractContextManager[None]] = _no_profile
    if args.profile:
        from bench.profile import Profiler

        profile = Profiler(args.profile, native=args.profile_native)
    with (
        tempfile.TemporaryDirectory(prefix="linkedblob-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        log(f"workdir: {tmp}")
        began = time.monotonic()
        payload = Payload(sizes.blob)
        log(f"generated {human(sizes.blob)} of random data in {time.monotonic() - began:.1f}s")
        systems, notes = start_systems(args, stack, Path(tmp))
        for note in notes:
            log(note)
        results = measure(systems, sizes, payload, profile)
    elapsed = time.monotonic() - began
    mode = "quick" if args.quick else "full"
    print(
        f"linkedblob bench ({mode}): {started:%Y-%m-%d %H:%M} UTC, {sizes.rounds} round(s), "
        f"{elapsed:.0f}s; 1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after\nmachine: {machine()}"
    )
    for note in notes:
        print(note)
    for result in results:
        print(f"client for {result.name}: {result.client_note}")
    print(
        "values: medians over rounds, ±half the range; MB = 10^6 bytes; ratio = linkedblob / "
        "registry; RSS: peak during figures 1-6, in parentheses its growth from blob/8 to blob"
        f" ({results[0].rss_method})\n"
    )
    print(table(rows(sizes), results), flush=True)
    if args.json:
        payload_json: dict[str, Any] = {
            "started": started.isoformat(),
            "mode": mode,
            "sizes": dataclasses.asdict(sizes),
            "machine": machine(),
            "notes": notes,
            "results": [dataclasses.asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload_json, indent=2))
    return 0
