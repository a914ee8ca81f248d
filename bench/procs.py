"""Server processes the harness starts: started on loopback, waited for, always stopped."""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for servers that cannot be told to pick one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Process:
    """A child process whose stdout is read for a ready line and whose stderr goes to a file."""

    def __init__(
        self,
        label: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.label = label
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
        )
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self._ready: re.Match[str] | None = None
        self._ready_pattern: re.Pattern[str] | None = None
        self._got_ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, pattern: re.Pattern[str], timeout: float = 60) -> re.Match[str]:
        """Waits for a stdout line matching ``pattern`` and returns its match."""
        self._ready_pattern = pattern
        self._reader.start()
        if not self._got_ready.wait(timeout):
            raise TimeoutError(f"{self.label} not ready in {timeout:.0f}s{self.tail()}")
        if self._ready is None:
            self.proc.wait()
            raise RuntimeError(f"{self.label} exited with {self.proc.returncode}{self.tail()}")
        return self._ready

    def wait_until(self, probe: Callable[[], bool], timeout: float = 30) -> None:
        """Waits until ``probe()`` is true (for servers that print no ready line)."""
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not probe():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label} not ready in {timeout:.0f}s{self.tail()}")
            time.sleep(0.05)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self._ready is None and self._ready_pattern is not None:
                match = self._ready_pattern.match(line.strip())
                if match:
                    self._ready = match
                    self._got_ready.set()
        self._got_ready.set()

    def tail(self) -> str:
        out = "".join(self.lines)
        try:
            err = self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            err = ""
        return f"\n--- stdout ---\n{out}\n--- stderr ({self.log_path}) ---\n{err}"

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        finally:
            self._log.close()
