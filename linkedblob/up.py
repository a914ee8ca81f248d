"""``linkedblob up``: all three services on one machine with the embedded defaults, and the
garbage collector (``serve gc``) beside them unless ``--no-gc``.

Each service runs as its own process (its own gRPC server and its own core's worth of Python),
exactly as ``linkedblob serve ...`` would run it: blobsvc on the filesystem under DATA/blobs,
linksvc on the SQLite file DATA/linkedblob.db (migrated on start), and the gateway in front.
blobsvc and the gateway share a grant secret (LINKEDBLOB_GRANT_SECRET when set, so that
`linkedblob gc` / `fsck` run by hand can sign their blobsvc calls too; else one made for the
run), handed over in the environment, never on a command line, where ps would show it. So the
gateway offers clients direct access to blobsvc (linkedblob.grants) at blobsvc's address; the
collector gets it the same way, to sign its own blobsvc calls. The collector runs every
--gc-interval with a grace period of --gc-grace.
Ctrl-C or SIGTERM stops them all cleanly; if one dies, the others are stopped too.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from linkedblob.config import (
    BLOB_PORT,
    GATEWAY_PORT,
    LINK_PORT,
    add_duration_option,
    add_option,
    env_name,
)

_READY = re.compile(r"^linkedblob (\w+) listening on (\S+)$")
# The variable both `serve blob` and `serve gateway` read their --grant-secret from.
GRANT_SECRET_ENV = env_name("--grant-secret")


def register(commands: Any) -> None:
    up = commands.add_parser("up", help="run blobsvc, linksvc and the gateway on this machine")
    add_option(up, "--data", default="data", help="directory for blobs and the SQLite database")
    add_option(up, "--host", default="127.0.0.1", help="address the services listen on")
    add_option(up, "--port", type=int, default=GATEWAY_PORT, help="gateway port (0: any free)")
    add_option(up, "--blob-port", type=int, default=BLOB_PORT, help="blobsvc port (0: any free)")
    add_option(up, "--link-port", type=int, default=LINK_PORT, help="linksvc port (0: any free)")
    add_option(up, "--enable-delete", action="store_true", help="allow DeleteBlob")
    add_option(up, "--log-format", default="json", choices=["json", "text"], help="log format")
    add_duration_option(
        up, "--gc-interval", default="1h", help="time between two garbage-collection runs"
    )
    add_duration_option(
        up,
        "--gc-grace",
        default="24h",
        help="how long an unreferenced blob is kept before garbage collection deletes it",
    )
    add_option(up, "--no-gc", action="store_true", help="run no garbage collector")
    up.set_defaults(handler=run)


class Child:
    """One service process, started with `linkedblob serve ...`, and its ready address."""

    def __init__(self, kind: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.kind = kind
        cmd = [sys.executable, "-m", "linkedblob.cli", "serve", kind, *argv]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, **env} if env else None,
        )
        self.address = self._wait_ready()
        # Keep draining stdout so the child can never block on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = _READY.match(line.strip())
            if m and m.group(1) == self.kind:
                return m.group(2)
            sys.stdout.write(line)
        code = self.proc.wait()
        raise SystemExit(f"linkedblob {self.kind} exited with {code} before it was ready")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(line)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    if not is_loopback(args.host):
        # Zero-config is for one developer's machine: on any other address the services would
        # serve everyone who reaches them.
        print(
            f"linkedblob up: refusing to serve on {args.host} without authentication; "
            "`up` is for loopback (127.0.0.1, ::1) — run the services with `linkedblob serve` "
            "and an authentication configuration to serve a network",
            file=sys.stderr,
        )
        return 2
    data = Path(args.data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    common = ["--host", args.host, "--log-format", args.log_format]
    # On loopback only this machine's users reach the services: they serve openly.
    serving = [*common, "--open"]
    granting = {GRANT_SECRET_ENV: os.environ.get(GRANT_SECRET_ENV) or secrets.token_urlsafe(32)}
    children: list[Child] = []

    def stop_all(sig: int = signal.SIGTERM) -> None:
        for child in reversed(children):
            if child.proc.poll() is None:
                child.proc.send_signal(sig)

    # SIGINT from a terminal reaches the children too (same process group); SIGTERM to `up`
    # alone is forwarded.
    signal.signal(signal.SIGTERM, lambda *_: stop_all())
    try:
        children.append(
            Child(
                "blob",
                [*serving, "--port", str(args.blob_port), "--data", str(data / "blobs")],
                granting,
            )
        )
        db_url = f"sqlite:///{data / 'linkedblob.db'}"
        children.append(
            Child("link", [*serving, "--port", str(args.link_port), "--db", db_url, "--migrate"])
        )
        gateway_argv = [
            *serving,
            "--port",
            str(args.port),
            "--blob-addr",
            children[0].address,
            "--link-addr",
            children[1].address,
            "--blob-public-addr",
            children[0].address,
        ]
        if args.enable_delete:
            gateway_argv.append("--enable-delete")
        children.append(Child("gateway", gateway_argv, granting))
        gateway = children[-1].address
        if not args.no_gc:
            gc_argv = [
                *common,
                "--port",
                "0",
                "--link-addr",
                children[1].address,
                "--blob-addr",
                children[0].address,
                "--interval",
                str(args.gc_interval),
                "--grace",
                str(args.gc_grace),
            ]
            children.append(Child("gc", gc_argv, granting))
        print(
            f"linkedblob is up: gateway {gateway} (blobsvc {children[0].address}, "
            f"linksvc {children[1].address}{'' if args.no_gc else ', gc running'}), "
            f"data in {data}\n"
            f"  try: LINKEDBLOB_ADDR={gateway} linkedblob push myrepo FILE",
            flush=True,
        )
        while all(c.proc.poll() is None for c in children):
            time.sleep(0.2)
        failed = [c.kind for c in children if c.proc.returncode not in (None, 0)]
        if failed:
            print(f"linkedblob up: {', '.join(failed)} stopped; stopping the rest", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        stop_all()
        for child in children:
            try:
                child.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.proc.kill()
    return (
        1
        if any(c.proc.returncode not in (0, -signal.SIGINT, -signal.SIGTERM) for c in children)
        else 0
    )


if os.name != "posix":  # pragma: no cover
    raise ImportError("linkedblob up needs a POSIX system")
