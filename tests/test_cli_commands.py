"""The client commands of the CLI (push, pull, stat, mount, ls, rm) as subprocesses against a
real gateway, blobsvc and linksvc (SQLite)."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from linkedblob import exitcodes
from linkedblob.config import MiB
from tests.stack import Stack, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("sqlite", tmp_path_factory.mktemp("cli")) as s:
        yield s


def cli(
    *args: str,
    addr: str | None = None,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "linkedblob.cli", *args]
    if addr is not None:
        argv += ["--addr", addr]
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def ok(*args: str, addr: str, stdin: bytes | None = None) -> str:
    out = cli(*args, addr=addr, stdin=stdin)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stderr == b""  # no progress bar off a terminal, no noise
    return out.stdout.decode()


def test_push_stat_pull_mount_ls_rm(stack: Stack, tmp_path: Path) -> None:
    addr = stack.address
    repo, other = f"cli/{secrets.token_hex(4)}", f"cli/{secrets.token_hex(4)}"
    data = os.urandom(2 * MiB + 9)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    src = tmp_path / "in.bin"
    src.write_bytes(data)

    assert ok("push", repo, str(src), "--media-type", "application/x-test", addr=addr) == (
        f"{digest}\n"
    )
    assert ok("push", repo, str(src), "--resumable", addr=addr) == f"{digest}\n"
    assert ok("stat", repo, digest, addr=addr) == f"{digest}\t{len(data)}\tapplication/x-test\n"

    out = tmp_path / "out.bin"
    ok("pull", repo, digest, "-o", str(out), addr=addr)
    assert out.read_bytes() == data
    ranged = cli("pull", repo, digest, "-o", "-", "--offset", "5", "--length", "10", addr=addr)
    assert ranged.returncode == 0 and ranged.stdout == data[5:15]

    assert ok("mount", other, digest, "--from", repo, addr=addr) == f"{digest}\n"
    assert ok("ls", other, addr=addr) == f"{digest}\t{len(data)}\tapplication/x-test\n"
    repos = ok("ls", addr=addr).split()
    assert repo in repos and other in repos

    small = b"from stdin"
    small_digest = f"sha256:{hashlib.sha256(small).hexdigest()}"
    assert ok("push", repo, "-", addr=addr, stdin=small) == f"{small_digest}\n"
    assert ok("ls", repo, addr=addr).count("\n") == 2

    ok("rm", other, digest, addr=addr)
    gone = cli("stat", other, digest, addr=addr)
    assert gone.returncode == exitcodes.NOT_FOUND
    assert gone.stderr.decode().strip() == (
        f"linkedblob stat: NOT_FOUND BLOB_UNKNOWN: blob {digest} is not linked in {other}"
    )


def test_failures_are_one_line_with_the_reason(stack: Stack, tmp_path: Path) -> None:
    addr = stack.address
    repo = f"cli/{secrets.token_hex(4)}"
    invalid, not_found, usage = exitcodes.INVALID, exitcodes.NOT_FOUND, exitcodes.USAGE
    zero = "sha256:" + "0" * 64
    cases = [
        (("stat", repo, "sha256:nope"), "INVALID_ARGUMENT DIGEST_INVALID", invalid),
        (("stat", "Bad Name", zero), "INVALID_ARGUMENT NAME_INVALID", invalid),
        (("pull", repo, zero, "-o", str(tmp_path / "x")), "BLOB_UNKNOWN", not_found),
        (("mount", repo, zero, "--from", "cli/nobody"), "BLOB_UNKNOWN", not_found),
        (("push", repo, str(tmp_path / "missing.bin")), "No such file", usage),
    ]
    for args, expected, status in cases:
        out = cli(*args, addr=addr)
        assert out.returncode == status, args
        lines = out.stderr.decode().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, lines)
        assert lines[0].startswith(f"linkedblob {args[0]}: ")
    assert not (tmp_path / "x").exists()


def test_the_address_comes_from_the_environment(stack: Stack) -> None:
    repo = f"cli/{secrets.token_hex(4)}"
    out = cli("ls", repo, env={"LINKEDBLOB_ADDR": stack.address})
    assert out.returncode == 0 and out.stdout == b""


def test_an_unreachable_gateway(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    out = cli("ls", addr=dead)
    assert out.returncode == exitcodes.RETRY
    assert out.stderr.decode().startswith("linkedblob ls: UNAVAILABLE")
