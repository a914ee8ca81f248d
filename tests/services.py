"""Real services for tests: each a `linkedblob serve ...` process on an ephemeral port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import psutil

_READY = re.compile(r"^linkedblob (\w+) listening on (\S+)$")


@dataclass
class ServiceProcess:
    kind: str
    address: str
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )

    def peak_rss(self) -> int:
        """The process's peak resident set size so far, in bytes (VmHWM)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


# The services that refuse to start without authentication unless told to serve openly.
_AUTHENTICATING = ("blob", "link", "gateway")


def spawn(
    kind: str,
    *args: str,
    timeout: float = 30,
    env: dict[str, str] | None = None,
    open_: bool = True,
) -> ServiceProcess:
    """Starts `linkedblob serve KIND --port 0 ARGS...` and waits for its ready line; with
    ``open_`` (the default) a blob, link or gateway serves without authentication (--open)."""
    opening = ["--open"] if open_ and kind in _AUTHENTICATING else []
    cmd = [sys.executable, "-m", "linkedblob.cli", "serve", kind, "--port", "0", *opening, *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ, **(env or {})},
    )
    output: list[str] = []
    ready: list[str] = []
    got_ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            m = _READY.match(line.strip())
            if m and m.group(1) == kind and not ready:
                ready.append(m.group(2))
                got_ready.set()
        got_ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not got_ready.wait(0.05):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{kind} not ready in {timeout}s:\n{''.join(output)}")
    if not ready:
        proc.wait()
        raise RuntimeError(f"{kind} exited with {proc.returncode}:\n{''.join(output)}")
    return ServiceProcess(kind, ready[0], proc, output)


@contextmanager
def running(
    kind: str, *args: str, env: dict[str, str] | None = None, open_: bool = True
) -> Iterator[ServiceProcess]:
    svc = spawn(kind, *args, env=env, open_=open_)
    try:
        yield svc
    finally:
        svc.stop()
