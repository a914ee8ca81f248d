"""``--profile DIR``: py-spy records each linkedblob service during each figure.

py-spy (``pip install py-spy``; not a project dependency) samples the running services without
restarting them. Each recording is a raw collapsed-stack file, ``FIGURE-SYSTEM-SERVICE.txt``;
``summary.txt`` lists each one's hottest frames (where samples were taken, and the frames
most often on the stack). Profiling slows the services: never report figures from such a run.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench.report import REFERENCE
from bench.systems import System

TOP = 12
ATTACH_SECONDS = 0.5


class Profiler:
    def __init__(self, directory: Path, native: bool = False) -> None:
        binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(binary).exists():
            raise SystemExit("--profile needs py-spy: pip install py-spy")
        self.binary = binary
        self.directory = directory
        self.native = native  # C frames too (grpc's core, hashlib); pauses the process
        directory.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def __call__(self, figure: str, system: System) -> Iterator[None]:
        if system.name == REFERENCE:
            yield
            return
        spies: list[tuple[subprocess.Popen[bytes], Path]] = []
        for service, pid in system.services().items():
            name = f"{figure}-{system.name.replace('/', '-')}-{service}.txt"
            out = self.directory / name
            argv = [self.binary, "record", "-p", str(pid), "-f", "raw", "-r", "200"]
            # Native stacks need the process paused while sampled; Python ones do not.
            argv += ["--native"] if self.native else ["--nonblocking"]
            with open(self.directory / "py-spy.log", "ab") as spy_log:
                spy = subprocess.Popen(
                    [*argv, "-o", str(out)],
                    stdin=subprocess.DEVNULL,
                    stdout=spy_log,
                    stderr=spy_log,
                )
            spies.append((spy, out))
        time.sleep(ATTACH_SECONDS)  # py-spy says nothing when it has attached
        try:
            yield
        finally:
            for spy, _ in spies:
                spy.send_signal(signal.SIGINT)
            for spy, out in spies:
                spy.wait(timeout=60)
                with open(self.directory / "summary.txt", "a") as summary:
                    summary.write(summarize(out) + "\n")


# Frames of the project's own code, for the inclusive view (the bootstrap frames every sample
# shares are left out).
PROJECT = ("gateway/", "blobsvc/", "linksvc/", "linkedblob/")
BOOTSTRAP = (
    "linkedblob/cli.py",
    "linkedblob/server.py",
    "gateway/server.py: serve",
    "blobsvc/server.py: serve",
    "linksvc/server.py: serve",
)


def summarize(path: Path, top: int = TOP) -> str:
    """The frames where most samples landed (self, by line), and the project's functions most
    often on the stack (inclusive, by function)."""
    own: collections.Counter[str] = collections.Counter()
    on_stack: collections.Counter[str] = collections.Counter()
    total = 0
    if path.exists():
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            n = int(count)
            total += n
            own[frames[-1]] += n
            for function in {_function(frame) for frame in frames}:
                if function.startswith(PROJECT) and not function.startswith(BOOTSTRAP):
                    on_stack[function] += n
    lines = [f"== {path.name}: {total} samples"]
    if total:
        lines.append("  self:")
        lines += [f"    {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
        lines.append("  project code on the stack:")
        lines += [f"    {n / total:6.1%}  {fn}" for fn, n in on_stack.most_common(top)]
    return "\n".join(lines)


def _function(frame: str) -> str:
    """``func (path:line)`` as ``path: func``."""
    name, _, where = frame.partition(" (")
    return f"{where.rstrip(')').rpartition(':')[0]}: {name}"
