"""`linkedblob up` runs the collector (`serve gc`) as a fourth process by default: with the
run's grant secret in its environment (never on its command line), the --gc-interval and
--gc-grace it was given, running; --no-gc leaves it out. Ctrl-C stops it with the rest."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

_UP = re.compile(r"^linkedblob is up: gateway (\S+) \(blobsvc (\S+),")


def start_up(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / "up.log"
    argv = ["up", "--data", str(tmp_path / "d"), "--port", "0", "--blob-port", "0"]
    argv += ["--link-port", "0", *args]
    with open(log, "w") as stderr:
        up = subprocess.Popen(
            [sys.executable, "-m", "linkedblob.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 60
    while True:
        assert up.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "not up in 60 s"
        with contextlib.suppress(queue.Empty):
            if _UP.match(lines.get(timeout=0.2)):
                return up, log


def stop(up: subprocess.Popen[str]) -> int:
    os.killpg(up.pid, signal.SIGINT)  # Ctrl-C
    return up.wait(timeout=60)


def kinds(up: subprocess.Popen[str]) -> dict[str, psutil.Process]:
    children = psutil.Process(up.pid).children(recursive=True)
    return {c.cmdline()[c.cmdline().index("serve") + 1]: c for c in children}


def test_up_runs_the_collector_with_the_grant_secret(tmp_path: Path) -> None:
    up, log = start_up(tmp_path, "--gc-interval", "1s", "--gc-grace", "2h")
    try:
        processes = kinds(up)
        assert set(processes) == {"blob", "link", "gateway", "gc"}
        gc = processes["gc"]
        secret = processes["blob"].environ()["LINKEDBLOB_GRANT_SECRET"]
        assert gc.environ().get("LINKEDBLOB_GRANT_SECRET") == secret
        assert not any(secret in " ".join(p.cmdline()) for p in processes.values())
        argv = gc.cmdline()
        assert argv[argv.index("--interval") + 1] == "1.0"
        assert argv[argv.index("--grace") + 1] == "7200.0"
        # It runs (every second), and its runs succeed against linksvc and blobsvc.
        deadline = time.monotonic() + 30
        while log.read_text().count("gc run: ") < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "[error" not in log.read_text()
        assert stop(up) == 0
        assert not gc.is_running() or gc.status() == psutil.STATUS_ZOMBIE
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_gc_leaves_it_out(tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "env":
        monkeypatch.setenv("LINKEDBLOB_NO_GC", "1")
    up, _log = start_up(tmp_path, *(["--no-gc"] if how == "flag" else []))
    try:
        assert set(kinds(up)) == {"blob", "link", "gateway"}
        assert stop(up) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
