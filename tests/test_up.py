"""`linkedblob up` as a user runs it: all three services from one command, used through the CLI
(push, ls, pull with --addr), then stopped with Ctrl-C (SIGINT to its process group): every
process exits cleanly and none is left behind."""

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

from linkedblob.client import Client
from linkedblob.config import MiB

_UP = re.compile(r"^linkedblob is up: gateway (\S+) \(blobsvc (\S+),")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linkedblob.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_up_push_ls_pull_and_ctrl_c(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    stderr = open(tmp_path / "up.log", "w")  # noqa: SIM115 - closed below
    ports = ["--port", "0", "--blob-port", "0", "--link-port", "0"]
    up = subprocess.Popen(
        [sys.executable, "-m", "linkedblob.cli", "up", "--data", str(data_dir), *ports],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,  # its own process group, as a terminal would give it
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        address = ""
        deadline = time.monotonic() + 60
        while not address:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "not up in 60 s"
            with contextlib.suppress(queue.Empty):
                m = _UP.match(lines.get(timeout=0.2))
                address, blob_address = (m.group(1), m.group(2)) if m else ("", "")
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) == 4  # blobsvc, linksvc, gateway and the collector
        # blobsvc and the gateway share a grant secret made for the run, in their environment
        # and never on a command line (ps shows those).
        kinds = {c.cmdline()[c.cmdline().index("serve") + 1]: c for c in children}
        secret = kinds["blob"].environ().get("LINKEDBLOB_GRANT_SECRET", "")
        assert len(secret) >= 32
        assert kinds["gateway"].environ().get("LINKEDBLOB_GRANT_SECRET") == secret
        assert not any(secret in " ".join(c.cmdline()) for c in children)
        with Client(address) as client:  # direct access offered, at blobsvc's address
            located = client.push("demo/direct", os.urandom(2 * MiB))
            _desc, access = client.locate("demo/direct", located.digest)
            assert access.address == blob_address

        payload = os.urandom(3 * MiB + 1)
        src = tmp_path / "in.bin"
        src.write_bytes(payload)
        pushed = cli("push", "demo/app", str(src), "--addr", address)
        assert pushed.returncode == 0, pushed.stderr
        digest = pushed.stdout.strip()
        listed = cli("ls", "demo/app", "--addr", address)
        assert listed.returncode == 0 and listed.stdout.split("\t")[0] == digest
        assert cli("ls", "--addr", address).stdout.split() == ["demo/app", "demo/direct"]
        out = tmp_path / "out.bin"
        pulled = cli("pull", "demo/app", digest, "-o", str(out), "--addr", address)
        assert pulled.returncode == 0, pulled.stderr
        assert out.read_bytes() == payload
        assert (data_dir / "linkedblob.db").exists()

        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C
        assert up.wait(timeout=60) == 0
        for child in children:
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        stderr.close()
